"""FE2E and MESM: end-to-end emotion recognition from raw text, faces and mel-spectrograms (Ch. 5-6).

Dai, Cahyawijaya et al., "Multimodal End-to-End Sparse Model for Emotion Recognition", NAACL 2021.

One class, :class:`EndToEndModel`, implements both models of the paper:

* **FE2E** (``attention=False, sparse=False``; Sec. 3.1): per visual modality (48x48 face crops every
  500 ms = ``"V"``, 128x32 mel-spectrogram pieces = ``"A"``, each treated as a one-channel image) a
  dense CNN stage (conv 5x5-64, BN, ReLU, max-pool 2, two VGG blocks of 64 without pooling), three VGG
  blocks (128, 256, 512: two 3x3 convs + BN/ReLU, 2x2 max-pool), global average pooling per frame or
  piece, a linear map to ``dim`` = 64, and a transformer (4 layers, 4 heads, CLS token, padding mask)
  over the frames/pieces; the text CLS vector of a pretrained encoder (:mod:`nbsupport.models.text`);
  one linear head per modality; fusion = learned weighted sum of the per-modality logits (weights
  softmax-normalised).
* **MESM** (``attention=True, sparse=True, top_p=0.7``; Sec. 3.2-3.3): before each of the three blocks
  a cross-modal additive attention (:class:`nbsupport.attention.AdditiveAttention`) from the text CLS
  vector scores every active spatial site of every frame/piece (all sites before the first block),
  softmax over the sites of each frame/piece; top-p (nucleus) selection keeps, per frame/piece, the
  smallest set of sites, highest first, whose attention mass reaches ``top_p``; the block then runs
  as a *sparse* block (submanifold 3x3 convs + sparse 2x2 max-pool, :mod:`nbsupport.sparse`) over the
  kept sites only.

**How the attention modulates the features** (our decision; the paper says it multiplies the feature
map by the attention scores). Softmax scores are ~1/n_sites, so multiplying by them would shrink the
features by a factor of hundreds. We multiply each site's features by ``attention * n_active`` (n_active
= the number of active sites of that frame/piece), which is 1 everywhere when the attention is
uniform, keeps the paper's "features times scores" form, and lets the loss reach the attention
parameters. With ``top_p = 1.0`` every active site is kept, so MESM(top_p=1) computes exactly
"FE2E with attention" (``attention=True, sparse=False``); with ``attention=False`` no site is
reweighted or dropped and the sparse blocks at full density equal the dense ones (tests).

Padding frames/pieces (``faces_mask``/``mel_mask`` False) never enter the CNN (only real frames are
gathered, so batch-norm statistics ignore them) and are masked in the transformer: they cannot change
the outputs. After each forward pass ``model.last_maps[m]`` holds, per block, the attention map, the
kept mask and the active mask on that block's grid for every real frame/piece (CPU tensors; the
active/kept site counts are their sums); Chapter 6 plots them and :mod:`nbsupport.interpret` measures
them against the corpus' cue regions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport import sparse as sparse_lib  # "sparse" is also a constructor flag below
from nbsupport.attention import AdditiveAttention, TransformerEncoderBlock
from nbsupport.models.text import TextEncoder

__all__ = [
    "EndToEndModel", "FE2E", "MESM", "DenseStem", "VisualPathway", "run_block",
    "sparse_backend_name", "INPUT_KEYS", "LayerRecord", "is_extractor_layer", "extractor_macs", "SMOKE_SIZES", "PAPER_SIZES",
]

#: Batch keys (``collate_mesm``) of each non-text modality: (inputs, mask).
INPUT_KEYS = {"V": ("faces", "faces_mask"), "A": ("mel", "mel_mask")}


# --------------------------------------------------------------------------------------------------
# CNN pieces: the blocks themselves live in nbsupport.sparse (dense and sparse twins, shared names)
# --------------------------------------------------------------------------------------------------
def sparse_backend_name(device: torch.device | str = "cpu") -> str:
    """Name of the sparse-convolution backend MESM's blocks use on ``device`` (printed by Chapter 6)."""
    return sparse_lib.sparse_backend(torch.device(device))


class DenseStem(nn.Module):
    """MESM's dense CNN stage (Dai et al. 2021, Sec. 3.1, Ch. 5): conv 5x5, BN, ReLU, max-pool 2,
    then two VGG blocks of ``channels`` without pooling. (N,1,H,W) -> (N,C,H/2,W/2)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv0 = nn.Conv2d(1, channels, 5, padding=2, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.vgg = nn.Sequential(sparse_lib.DenseVggBlock(channels, channels, pool=False),
                                 sparse_lib.DenseVggBlock(channels, channels, pool=False))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2)  # (N, C, H/2, W/2)
        return self.vgg(x)


def run_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor | None):
    """Run one of the three VGG blocks on a dense grid ``x`` (N,C,H,W) and a kept-site mask (N,H,W).

    Sparse block: only the kept sites go in (``to_sparse``), the pooled sparse output is scattered back
    to a zero-filled grid (N,C',H/2,W/2) with its active mask. Dense block: the dropped sites are zeroed
    (no compute saving) and every output site is active. Returns ``(y, active_out)``.
    """
    if isinstance(block, sparse_lib.SparseVggBlock):
        out = block(sparse_lib.to_sparse(x, keep))
        y = out.dense()  # (N, C', H/2, W/2), zeros at inactive sites
        active = torch.zeros(y.shape[0], y.shape[2], y.shape[3], dtype=torch.bool, device=y.device)
        active[out.coords[:, 0], out.coords[:, 1], out.coords[:, 2]] = True
        return y, active
    if keep is not None:
        x = x * keep[:, None].to(x.dtype)
    y = block(x)  # (N, C', H/2, W/2)
    return y, torch.ones(y.shape[0], y.shape[2], y.shape[3], dtype=torch.bool, device=y.device)


# --------------------------------------------------------------------------------------------------
# One visual pathway (faces or mel pieces)
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What one block saw in the last forward pass (for plots, FLOPs and interpretability, Ch. 6).

    attention (N,H,W) float (zeros when attention is off), kept (N,H,W) bool, active (N,H,W) bool (the
    sites alive before selection), ``frame_index`` (N,2) long = (batch, frame/piece) of each row.
    """

    attention: torch.Tensor
    kept: torch.Tensor
    active: torch.Tensor
    frame_index: torch.Tensor


class VisualPathway(nn.Module):
    """Faces or mel pieces -> one vector per utterance (Dai et al. 2021, Fig. 2; Ch. 5-6).

    Dense stem, three VGG blocks (sparse and attention-gated for MESM), global average pooling over the
    active sites of each frame/piece, linear to ``dim``, then a transformer with a CLS token over the
    frames/pieces. ``forward(images (B,T,H,W), mask (B,T), text (B,d_text))`` -> (B, dim).
    """

    def __init__(self, text_dim: int, *, stem_channels: int = 64, block_channels=(128, 256, 512),
                 dim: int = 64, layers: int = 4, heads: int = 4, ff_size: int | None = None,
                 dropout: float = 0.1, attention: bool = False, sparse: bool = False, top_p: float = 1.0,
                 attention_hidden: int = 64):
        super().__init__()
        self.attention, self.top_p = attention, top_p
        self.stem = DenseStem(stem_channels)
        chans = [stem_channels, *block_channels]
        block = sparse_lib.SparseVggBlock if sparse else sparse_lib.DenseVggBlock
        self.blocks = nn.ModuleList([block(chans[i], chans[i + 1]) for i in range(len(block_channels))])
        self.cross_attention = nn.ModuleList(
            [AdditiveAttention(text_dim, chans[i], attention_hidden) for i in range(len(block_channels))]
        ) if attention else None
        self.proj = nn.Linear(chans[-1], dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 512, dim))  # learned positions over frames/pieces
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        self.encoder = nn.ModuleList([TransformerEncoderBlock(dim, heads, ff_size, dropout) for _ in range(layers)])
        self.records: list[LayerRecord] = []

    def _select(self, i: int, x: torch.Tensor, active: torch.Tensor, query: torch.Tensor):
        """Cross-modal attention + top-p before block ``i``.

        Returns (reweighted x, kept mask, attention)."""
        n, c, h, w = x.shape
        keys = x.flatten(2).transpose(1, 2)  # (N, H*W, C) one key per spatial site
        act = active.flatten(1)  # (N, H*W)
        # (N, H*W) softmax over the active sites
        _, weights = self.cross_attention[i](query, keys, keys, mask=act)
        keep = sparse_lib.top_p_mask(weights, self.top_p) & act
        # attention * n_active: 1 when uniform
        scale = weights * act.sum(1, keepdim=True).to(weights.dtype)
        x = x * scale.view(n, 1, h, w)
        return x, keep.view(n, h, w), weights.view(n, h, w)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, T, H, W), mask (B, T) True on real frames/pieces, text (B, d_text) CLS -> (B, dim)."""
        b, t = images.shape[:2]
        if t > self.position.shape[1]:  # checked before any CNN work
            raise ValueError(f"VisualPathway: at most {self.position.shape[1]} frames/pieces, got {t}")
        frame_index = mask.nonzero()  # (N, 2): (batch, frame) of every real frame/piece
        x = images[frame_index[:, 0], frame_index[:, 1]].unsqueeze(1).to(text.dtype)  # (N, 1, H, W)
        query = text[frame_index[:, 0]]  # (N, d_text): the utterance's CLS vector for each frame
        self.records = []
        if x.shape[0] > 0:
            x = self.stem(x)  # (N, C0, H/2, W/2)
            active = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
            frames_cpu = frame_index.cpu()  # shared by the records of every block
            for i, block in enumerate(self.blocks):
                if self.attention:
                    x, keep, attn = self._select(i, x, active, query)
                else:
                    keep, attn = active, torch.zeros(active.shape, device=x.device)
                self.records.append(LayerRecord(attn.detach().cpu(), keep.detach().cpu(), active.detach().cpu(),
                                                frames_cpu))
                x, active = run_block(block, x, keep)  # (N, C_{i+1}, H/2, W/2)
            a = active[:, None].to(x.dtype)
            pooled = (x * a).sum((2, 3)) / a.sum((2, 3)).clamp_min(1.0)  # (N, C) mean over active sites
            feats = self.proj(pooled)  # (N, dim)
        else:
            feats = images.new_zeros(0, self.proj.out_features, dtype=text.dtype)
        return self.encode_frames(feats, frame_index, mask)

    def encode_frames(self, feats: torch.Tensor, frame_index: torch.Tensor, mask: torch.Tensor):
        """The per-modality transformer (Ch. 5): one vector per real frame/piece, feats (N, dim) at
        ``frame_index`` (N, 2) = (batch, frame), mask (B, T) -> the CLS output (B, dim)."""
        b, t = mask.shape
        seq = feats.new_zeros(b, t, feats.shape[-1])
        seq[frame_index[:, 0], frame_index[:, 1]] = feats  # (B, T, dim); padding rows stay zero
        seq = seq + self.position[:, :t]
        seq = torch.cat([self.cls.expand(b, -1, -1), seq], dim=1)  # (B, 1+T, dim)
        keep = torch.cat([mask.new_ones(b, 1), mask.bool()], dim=1)  # the CLS token is never masked
        for layer in self.encoder:
            seq = layer(seq, keep)
        return seq[:, 0]  # (B, dim): CLS output


# --------------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------------
class EndToEndModel(nn.Module):
    """FE2E / MESM (Dai et al. 2021; Ch. 5-6): ``model(batch) -> logits (B, n_outputs)``.

    ``modalities``: any subset of "LAV" containing "L". ``text_model``: '' / None = bundled
    all-MiniLM-L6-v2, an HF id (local cache) or folder; ``tiny_text=True`` a small random BERT.
    ``attention``/``sparse``/``top_p`` switch between FE2E and MESM (see module docstring).
    ``text_lr_scale`` sets the text encoder's learning rate relative to ``lr`` in :meth:`param_groups`
    (MESM trains it at lr/10). Sizes (``stem_channels``, ``block_channels``, ``dim``, ``layers``,
    ``heads``) default to the paper's.
    """

    def __init__(self, modalities: str = "LAV", n_outputs: int = 6, *, text_model: str | None = None,
                 tiny_text: bool = False, text_encoder: nn.Module | None = None, stem_channels: int = 64,
                 block_channels=(128, 256, 512), dim: int = 64, layers: int = 4, heads: int = 4,
                 ff_size: int | None = None, dropout: float = 0.1, attention: bool = False,
                 sparse: bool = False, top_p: float = 1.0, attention_hidden: int = 64,
                 text_lr_scale: float = 0.1):
        super().__init__()
        if not isinstance(modalities, str) or not modalities or set(modalities) - set("LAV") or "L" not in modalities:
            raise ValueError(f"EndToEndModel: parameter 'modalities' must be letters from 'LAV' including 'L' "
                             f"(text drives the model), got {modalities!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"EndToEndModel: parameter 'top_p' must be in (0, 1], got {top_p!r}")
        if top_p < 1.0 and not attention:
            raise ValueError("EndToEndModel: parameter 'top_p' < 1 needs attention=True (the attention chooses the sites)")
        self.modalities = "".join(m for m in "LAV" if m in modalities)
        self.attention, self.text_lr_scale = attention, text_lr_scale
        self.text = text_encoder if text_encoder is not None else TextEncoder(text_model or None, tiny=tiny_text)
        text_dim = self.text.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.pathways = nn.ModuleDict({m: VisualPathway(
            text_dim, stem_channels=stem_channels, block_channels=tuple(block_channels), dim=dim, layers=layers,
            heads=heads, ff_size=ff_size, dropout=dropout, attention=attention, sparse=sparse, top_p=top_p,
            attention_hidden=attention_hidden) for m in self.modalities if m != "L"})
        self.heads = nn.ModuleDict({m: nn.Linear(text_dim if m == "L" else dim, n_outputs) for m in self.modalities})
        self.fusion = nn.Parameter(torch.zeros(len(self.modalities)))  # softmax -> modality weights

    # -- top_p can be changed on a trained model (the sweep and the widget of Ch. 6) --
    @property
    def top_p(self) -> float:
        return next(iter(self.pathways.values())).top_p if self.pathways else 1.0

    @top_p.setter
    def top_p(self, value: float) -> None:
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"EndToEndModel: 'top_p' must be in (0, 1], got {value!r}")
        if value < 1.0 and not self.attention:
            raise ValueError("EndToEndModel: 'top_p' < 1 needs a model built with attention=True")
        for p in self.pathways.values():
            p.top_p = float(value)

    @property
    def last_maps(self) -> dict[str, list[LayerRecord]]:
        """Per modality ("V", "A"), per block: the :class:`LayerRecord` of the last forward pass."""
        return {m: p.records for m, p in self.pathways.items()}

    def fusion_weights(self) -> dict[str, float]:
        """The learned, softmax-normalised modality weights of the late fusion."""
        w = torch.softmax(self.fusion.detach(), 0)
        return {m: float(w[i]) for i, m in enumerate(self.modalities)}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for :func:`nbsupport.train.fit`: text encoder at ``lr * text_lr_scale``."""
        text = list(self.text.parameters())
        ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": text, "lr": lr * self.text_lr_scale}]

    def forward(self, batch: dict) -> torch.Tensor:
        """batch = ``collate_mesm`` output -> fused logits (B, n_outputs)."""
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise KeyError(f"EndToEndModel: batch is missing '{key}' "
                               f"(expected the collate_mesm keys)")
        cls = self.text(batch["input_ids"], batch["attention_mask"])  # (B, d_text)
        logits = {}
        for m in self.modalities:
            if m == "L":
                vec = cls
            else:
                x_key, m_key = INPUT_KEYS[m]
                if x_key not in batch or m_key not in batch:
                    raise KeyError(f"EndToEndModel: modality '{m}' needs batch keys "
                                   f"'{x_key}' and '{m_key}'")
                vec = self.pathways[m](batch[x_key], batch[m_key].bool(), cls)
            logits[m] = self.heads[m](self.dropout(vec))  # (B, n_outputs)
        w = torch.softmax(self.fusion, 0)  # (M,)
        stacked = torch.stack([logits[m] for m in self.modalities], 0)  # (M, B, n_outputs)
        return (w[:, None, None] * stacked).sum(0)


def FE2E(modalities: str = "LAV", n_outputs: int = 6, **kwargs) -> EndToEndModel:
    """FE2E (Dai et al. 2021, Sec. 3.1; Ch. 5): dense CNNs, no cross-modal selection."""
    return EndToEndModel(modalities, n_outputs, attention=False, sparse=False, **kwargs)


def MESM(modalities: str = "LAV", n_outputs: int = 6, top_p: float = 0.7, **kwargs) -> EndToEndModel:
    """MESM (Dai et al. 2021, Sec. 3.2-3.3; Ch. 6): cross-modal attention, top-p selection, sparse blocks."""
    return EndToEndModel(modalities, n_outputs, attention=True, sparse=True, top_p=top_p, **kwargs)


# --------------------------------------------------------------------------------------------------
# Measuring the model as it ran: MACs of the feature extractor, and the top-p sweep (Chapter 6)
# --------------------------------------------------------------------------------------------------
def is_extractor_layer(name: str) -> bool:
    """Layers counted as MESM's *feature extractor*: the CNN stems, the three blocks and the cross-modal
    attention that chooses the sites (its cost is MESM's overhead, so it is counted too)."""
    return name.startswith("pathways.") and any(p in name for p in (".stem.", ".blocks.", ".cross_attention."))


def extractor_macs(model: EndToEndModel, batches) -> dict:
    """Multiply-accumulates of the feature extractor over ``batches`` (a batch dict or an iterable of
    them) as it actually ran (:mod:`nbsupport.flops`): ``macs`` (kept sites), ``dense_macs`` (what FE2E
    would spend on the same inputs), their ``ratio``, and the per-layer ``table`` (Dai et al. 2021, Sec. 4)."""
    from nbsupport import flops
    from nbsupport.base import to_device

    if isinstance(batches, dict):
        batches = [batches]
    tables = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in batches:
        tables.append(flops.count_macs(model, to_device(batch, device), include=is_extractor_layer))
    model.train(was_training)
    import pandas as pd

    table = pd.concat(tables, ignore_index=True).groupby(["layer", "kind"], as_index=False, sort=False).sum(
        numeric_only=True)
    table["density"] = table["sites"] / table["dense_sites"].where(table["dense_sites"] > 0)
    out = flops.summarize_macs(table)
    out["table"] = table
    return out


# --------------------------------------------------------------------------------------------------
# Chapter plumbing: data loaders and sizes
# --------------------------------------------------------------------------------------------------
#: Model sizes of a smoke run (same code path, tiny tensors).
SMOKE_SIZES = dict(stem_channels=8, block_channels=(8, 16, 16), dim=16, layers=1, heads=2, attention_hidden=16)
#: The paper's sizes (Dai et al. 2021, Sec. 4.2).
PAPER_SIZES = dict(stem_channels=64, block_channels=(128, 256, 512), dim=64, layers=4, heads=4)


