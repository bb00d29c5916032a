"""FE2E and MESM: end-to-end emotion recognition from raw text, faces and mel-spectrograms (Ch. 5-6).

Dai, Cahyawijaya et al., "Multimodal End-to-End Sparse Model for Emotion Recognition", NAACL 2021.

One class, :class:`EndToEndModel`, implements both models of the paper, built from one
:class:`MesmConfig` (:func:`FE2E` and :func:`MESM` set its switches below):

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

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from nbsupport import flops
from nbsupport import sparse as sparse_lib  # "sparse" is also a constructor flag below
from nbsupport.base import count_parameters, to_device
from nbsupport.attention import AdditiveAttention, TransformerEncoderBlock, masked_softmax
from nbsupport.models.text import TextEncoder

__all__ = [
    "EndToEndModel", "FE2E", "MESM", "MesmConfig", "DenseStem", "VisualPathway", "run_block",
    "sparse_backend_name", "INPUT_KEYS", "INPUT_SIZES", "ATTENTION_GRAD", "REFERENCE_SWITCHES",
    "REFERENCE_BUGS", "SITE_ORDERS", "reference_site_order", "paper_parameter_count", "LayerRecord",
    "is_extractor_layer", "extractor_macs", "PAPER_SIZES",
]

#: Batch keys (``collate_mesm``) of each non-text modality: (inputs, mask).
INPUT_KEYS = {"V": ("faces", "faces_mask"), "A": ("mel", "mel_mask")}
#: (H, W) of one face crop and one mel piece (Dai et al. 2021, Sec. 3.1): the flatten head's grid size.
INPUT_SIZES = {"V": (48, 48), "A": (128, 32)}
#: How the cross-modal attention acts: reweight the features (book) or only select (reference code).
ATTENTION_GRAD = ("reweight", "none")
#: Which sites the features entering the first sparse block land on: their own ("matched", book) or,
#: as the reference code does, the sites sorted by (y, x, frame) (``reference_site_order``).
SITE_ORDERS = ("matched", "reference")


def reference_site_order(s: "sparse_lib.SparseTensor") -> "sparse_lib.SparseTensor":
    """The MESM reference code's first-block bug (``src/models/sparse_e2e.py``; Ch. 6).

    Faces and mel alike, SparseConvNet's input is built from ``locations =
    attn.permute(1, 2, 0).nonzero()`` -- the kept sites sorted by (y, x, frame) -- and
    ``features = x[bs, :, y, x]`` with ``bs, y, x = attn.nonzero()`` -- sorted by (frame, y, x);
    ``InputLayer`` pairs row i with row i. ``s`` holds the kept sites in (frame, y, x) order with
    their own features (:func:`nbsupport.sparse.to_sparse`); the result keeps the features in that
    order and puts them on the sites sorted by (y, x, frame): the same sites, nearly every one
    holding another site's features. Blocks 2 and 3 read both from one tensor.
    """
    c = s.coords  # (N, 3) (frame, y, x), row-major order
    h, w = s.spatial_shape
    order = torch.argsort((c[:, 1] * w + c[:, 2]) * max(s.batch_size, 1) + c[:, 0])  # (y, x, frame)
    return sparse_lib.SparseTensor(s.features, c[order], s.spatial_shape, s.batch_size)


# --------------------------------------------------------------------------------------------------
# CNN pieces: the blocks themselves live in nbsupport.sparse (dense and sparse twins, shared names)
# --------------------------------------------------------------------------------------------------
def sparse_backend_name(device: torch.device | str = "cpu") -> str:
    """Name of the sparse-convolution backend MESM's blocks use on ``device`` (printed by Chapter 6)."""
    return sparse_lib.sparse_backend(torch.device(device))


class DenseStem(nn.Module):
    """MESM's dense CNN stage (Dai et al. 2021, Sec. 3.1, Ch. 5): conv 5x5, BN, ReLU, max-pool 2,
    then two VGG blocks of ``channels`` without pooling. (N,in_channels,H,W) -> (N,C,H/2,W/2).
    ``in_channels``: 1 (grey faces, mel pieces) or 3 (the reference's RGB faces); ``bias``:
    convolutions with a bias, as the reference code (a no-op before BatchNorm)."""

    def __init__(self, channels: int = 64, in_channels: int = 1, bias: bool = False):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, channels, 5, padding=2, bias=bias)
        self.bn0 = nn.BatchNorm2d(channels)
        vgg = sparse_lib.DenseVggBlock
        self.vgg = nn.Sequential(vgg(channels, channels, pool=False, bias=bias),
                                 vgg(channels, channels, pool=False, bias=bias))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2)  # (N, C, H/2, W/2)
        return self.vgg(x)


def run_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor | None, site_order: str = "matched"):
    """Run one of the three VGG blocks on a dense grid ``x`` (N,C,H,W) and a kept-site mask (N,H,W).

    Sparse block: only the kept sites go in (``to_sparse``), the pooled sparse output is scattered back
    to a zero-filled grid (N,C',H/2,W/2) with its active mask (the ``"dense"`` hand-off between blocks,
    :attr:`VisualPathway._block_handoff`; MESM keeps the sites sparse between blocks instead). Dense block:
    the dropped sites are zeroed (no compute saving) and every output site is active.
    ``site_order="reference"``: the sparse block's input sites are scrambled as the reference code's
    first block (:func:`reference_site_order`). Returns ``(y, active_out)``.
    """
    if isinstance(block, sparse_lib.SparseVggBlock):
        s = sparse_lib.to_sparse(x, keep)
        out = block(reference_site_order(s) if site_order == "reference" else s)
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

    Dense stem, three VGG blocks (sparse and attention-gated for MESM), a per-frame head, then a
    transformer with a CLS token over the frames/pieces. ``forward(images (B,T,H,W), mask (B,T),
    text (B,d_text))`` -> (B, dim). Sizes and switches come from one :class:`MesmConfig` (the fields below;
    see :meth:`MesmConfig.paper` for the reference values):
    ``head`` -- ``"pool"`` (book: average over the active sites, Linear to ``dim``) or ``"flatten"``
    (reference: flatten the final ``C x H/16 x W/16`` grid, Linear to ``flatten_hidden``, ReLU, Linear
    to ``dim``; needs ``input_size``); ``positions`` -- ``"learned"`` (book) or ``"none"`` (reference);
    ``attention_hidden`` -- an int, or ``"channels"`` (reference: 64, 128, 256 = each block's input
    channels); ``attention_grad`` -- ``"reweight"`` (book: features times ``attention * n_active``, so
    the attention learns) or ``"none"`` (reference: the attention only selects, receives no gradient and
    keeps its initial weights); ``in_channels`` 1 or 3 (RGB faces; grey input is repeated to 3);
    ``conv_bias``/``score_bias`` -- the reference's (functionally inert) biases; ``cls_std`` -- the CLS
    vector's initial std (reference: 1, an ``nn.Embedding``); ``sparse_bn_eps`` / ``sparse_conv_init``
    -- the sparse blocks' BatchNorm eps and weight initialisation (SparseConvNet: 1e-4 and He-normal
    ``"he"``; book: PyTorch's 1e-5 and ``"torch"``); ``site_order`` -- ``"reference"`` reproduces the
    reference code's first-block bug (:func:`reference_site_order`).
    """

    def __init__(self, text_dim: int, config: "MesmConfig | None" = None, *, input_size: tuple | None = None,
                 in_channels: int = 1):
        """One modality's pathway from ``config`` (:class:`MesmConfig`: sizes and switches; None = its
        defaults), ``input_size`` (H, W; needed by ``head="flatten"``) and ``in_channels`` (1, or 3 for
        RGB faces). Built in the order the parameters draw their random initial values: stem, blocks,
        cross-modal attention, projection head, CLS and positions, transformer."""
        super().__init__()
        c = config if config is not None else MesmConfig()
        self.attention, self.top_p, self.site_order = c.attention, c.top_p, c.site_order
        self.attention_grad, self.head, self.in_channels = c.attention_grad, c.head, in_channels
        chans = [c.stem_channels, *c.block_channels]
        self.stem = DenseStem(c.stem_channels, in_channels, c.conv_bias)
        self.blocks = self._build_blocks(c, chans)
        hidden = [chans[i] if c.attention_hidden == "channels" else int(c.attention_hidden)
                  for i in range(len(c.block_channels))]
        self.cross_attention = nn.ModuleList(
            [AdditiveAttention(text_dim, chans[i], hidden[i], c.score_bias) for i in range(len(c.block_channels))]
        ) if c.attention else None
        self.proj = self._build_head(c, chans, input_size)
        self.dim = c.dim
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        # learned positions over frames/pieces (book); the reference has none (its positional encoding
        # is commented out), then at most 512 frames/pieces are still accepted
        self.position = nn.Parameter(torch.zeros(1, 512, c.dim)) if c.positions == "learned" else None
        nn.init.normal_(self.cls, std=c.cls_std)
        if self.position is not None:
            nn.init.normal_(self.position, std=0.02)
        self.encoder = nn.ModuleList([TransformerEncoderBlock(c.dim, c.heads, c.ff_size, c.dropout)
                                      for _ in range(c.layers)])
        self.records: list[LayerRecord] = []
        # A test seam, not a setting: how sparse blocks pass their sites on. "sparse" (always, outside the
        # tests) keeps a SparseTensor from block to block (attention and top-p on the active sites only);
        # "dense" scatters each block's output to a zero-filled grid and gathers the kept sites again,
        # which tests/test_mesm.py sets to show both give the same outputs and gradients.
        self._block_handoff = "sparse"

    @staticmethod
    def _build_blocks(c: "MesmConfig", chans: list) -> nn.ModuleList:
        """The three VGG blocks: sparse (MESM; SparseConvNet's BatchNorm eps and He initialisation when the
        config asks for them, and no convolution bias, as in the reference) or dense (FE2E)."""
        n = len(c.block_channels)
        if not c.sparse:
            return nn.ModuleList([sparse_lib.DenseVggBlock(chans[i], chans[i + 1], bias=c.conv_bias)
                                  for i in range(n)])
        blocks = [sparse_lib.SparseVggBlock(chans[i], chans[i + 1]) for i in range(n)]
        for unit in (u for b in blocks for u in (b.conv1, b.conv2)):
            unit.bn.eps = float(c.sparse_bn_eps)  # SparseConvNet's BatchNormReLU: 1e-4
            if c.sparse_conv_init == "he":  # SparseConvNet: N(0, 2 / fan_in), fan_in = C_in * 3 * 3
                fan_in = unit.conv.in_channels * unit.conv.kernel_size ** 2
                nn.init.normal_(unit.conv.weight, 0.0, math.sqrt(2.0 / fan_in))
        return nn.ModuleList(blocks)

    @staticmethod
    def _build_head(c: "MesmConfig", chans: list, input_size) -> nn.Module:
        """Per-frame head to ``dim``: pool the active sites then Linear (book), or flatten the final grid
        then an MLP (reference, ``head="flatten"``, which needs ``input_size``)."""
        if c.head != "flatten":
            return nn.Linear(chans[-1], c.dim)
        grid = [int(s) // 2 ** (1 + len(c.block_channels)) for s in input_size]
        return nn.Sequential(nn.Linear(chans[-1] * grid[0] * grid[1], c.flatten_hidden), nn.ReLU(),
                             nn.Linear(c.flatten_hidden, c.dim))

    def _select(self, i: int, x: torch.Tensor, active: torch.Tensor, query: torch.Tensor, *,
                sparse_out: bool = False):
        """Cross-modal attention + top-p before block ``i``.

        Returns (reweighted x, kept mask, attention); ``sparse_out=True`` returns the kept sites
        only, as a SparseTensor, scaled after the gather (same products, a fraction of the work)."""
        n, c, h, w = x.shape
        keys = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # (N*H*W, C) one key per spatial site
        frame = torch.arange(n, device=x.device).repeat_interleave(h * w)  # (N*H*W,)
        act = active.flatten(1)  # (N, H*W)
        # (N, H*W) softmax over the active sites; no gradient when the attention only selects
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.attention_grad == "reweight"):
            scores = self.cross_attention[i](query, keys, frame=frame).view(n, h * w)
            weights = masked_softmax(scores, act)
        keep = sparse_lib.top_p_mask(weights, self.top_p) & act
        keep, weights = keep.view(n, h, w), weights.view(n, h, w)
        if sparse_out:  # the kept sites' keys are their features (to_sparse(x, keep), gathered once)
            s = sparse_lib.SparseTensor(keys[keep.flatten()], keep.nonzero(), (h, w), n)
        if self.attention_grad == "none":  # reference: the kept sites go on unchanged, only selected
            return (s if sparse_out else x), keep, weights
        # book: attention * n_active, 1 when uniform
        scale = weights * act.sum(1).to(weights.dtype).view(n, 1, 1)
        if sparse_out:  # MESM's sparse blocks: gather the kept sites first, then scale them
            return s.replace(s.features * scale[keep][:, None]), keep, weights
        return x * scale[:, None], keep, weights

    def _select_sparse(self, i: int, s: "sparse_lib.SparseTensor", query: torch.Tensor):
        """:meth:`_select` on the active sites of a sparse tensor (same numbers, work only where active):
        returns (kept and reweighted sparse tensor, attention (M,) per active site, kept mask (M,))."""
        att = self.cross_attention[i]
        frame = s.coords[:, 0]  # (M,) frame/piece of every active site
        n = s.batch_size
        learn = self.attention_grad == "reweight"  # "none": the reference's attention gets no gradient
        # additive attention v^T tanh(W_q q + W_k k) per active site (AdditiveAttention's own layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and learn):
            scores = att(query, s.features, frame=frame)  # (M,)
        # softmax over the active sites of each frame: torch has no segment softmax, so max-shift by hand
        top = scores.new_full((n,), -float("inf")).scatter_reduce(0, frame, scores.detach(), "amax")
        e = torch.exp(scores - top[frame])
        weights = e / e.new_zeros(n).index_add(0, frame, e)[frame]  # (M,)
        keep = sparse_lib.top_p_mask_segments(weights, frame, self.top_p)
        if not learn:  # reference: the kept sites go on unchanged
            return s.select(keep), weights, keep
        n_active = torch.bincount(frame, minlength=n).to(weights.dtype)  # (N,) active sites per frame
        scaled = s.replace(s.features * (weights * n_active[frame])[:, None])  # attention * n_active
        return scaled.select(keep), weights, keep

    def _blocks_sparse(self, x: torch.Tensor, query: torch.Tensor, frames_cpu: torch.Tensor) -> torch.Tensor:
        """The three sparse blocks with sites kept sparse between them (``_block_handoff="sparse"``):
        x (N, C0, H, W) from the stem -> (N, C) mean of the last block's features over its active sites."""
        n = x.shape[0]
        s = None
        for i, block in enumerate(self.blocks):
            if s is None:  # first block: every site of the stem's map is active
                active = torch.ones(n, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
                if self.attention:
                    s_in, keep, attn = self._select(0, x, active, query, sparse_out=True)
                else:
                    keep, attn = active, torch.zeros(active.shape, device=x.device)
                    s_in = sparse_lib.to_sparse(x, keep)
            else:
                h, w = s.spatial_shape
                b, yy, xx = s.coords[:, 0], s.coords[:, 1], s.coords[:, 2]
                active = torch.zeros(n, h, w, dtype=torch.bool, device=x.device)
                active[b, yy, xx] = True
                attn = torch.zeros(n, h, w, device=x.device)
                if self.attention:
                    s_in, weights, kept = self._select_sparse(i, s, query)
                    attn[b, yy, xx] = weights.detach().to(attn.dtype)
                    keep = torch.zeros_like(active)
                    keep[b, yy, xx] = kept  # sites are distinct: each cell written once
                else:
                    s_in, keep = s, active
            self.records.append(LayerRecord(attn.detach().cpu(), keep.detach().cpu(), active.detach().cpu(),
                                            frames_cpu))
            if i == 0 and self.site_order == "reference":  # the reference code's block-1 bug
                s_in = reference_site_order(s_in)
            s = block(s_in)  # SparseTensor on the pooled grid
        if self.head == "flatten":  # reference: the whole final grid, zeros at inactive sites
            return s.dense().flatten(1)  # (N, C*h*w)
        frame = s.coords[:, 0]
        sums = s.features.new_zeros(n, s.features.shape[1]).index_add(0, frame, s.features)  # (N, C)
        counts = torch.bincount(frame, minlength=n).clamp_min(1).to(sums.dtype)
        return sums / counts[:, None]  # mean over active sites (0 for a frame with none, like the dense path)

    def extract(self, x: torch.Tensor, query: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """The feature extractor after the stem (what MESM makes sparse, Ch. 6; timed by the benchmarks):
        x (N, C0, H, W) stem output, query (N, d_text) text vector per frame -> (N, C) mean of the last
        block's features over its active sites (``head="flatten"``: the whole last grid, (N, C*h*w)). Fills :attr:`records` (``frame_index`` (N, 2) goes into
        them; default: frame i of utterance 0)."""
        if self._block_handoff not in ("sparse", "dense"):
            raise ValueError(f"VisualPathway: '_block_handoff' must be 'sparse' or 'dense', "
                             f"got {self._block_handoff!r}")
        if frame_index is None:
            frame_index = torch.stack([torch.zeros(x.shape[0], dtype=torch.long), torch.arange(x.shape[0])], 1)
        frames_cpu = frame_index.cpu()  # shared by the records of every block
        self.records = []
        sparse_blocks = len(self.blocks) > 0 and isinstance(self.blocks[0], sparse_lib.SparseVggBlock)
        if self._block_handoff == "sparse" and sparse_blocks:
            return self._blocks_sparse(x, query, frames_cpu)
        active = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
        for i, block in enumerate(self.blocks):
            if self.attention:
                x, keep, attn = self._select(i, x, active, query)
            else:
                keep, attn = active, torch.zeros(active.shape, device=x.device)
            self.records.append(LayerRecord(attn.detach().cpu(), keep.detach().cpu(), active.detach().cpu(),
                                            frames_cpu))
            x, active = run_block(block, x, keep, self.site_order if i == 0 else "matched")  # (N, C', H/2, W/2)
        if self.head == "flatten":  # reference: the whole final grid, zeros at inactive sites
            return x.flatten(1)  # (N, C*h*w)
        a = active[:, None].to(x.dtype)
        return (x * a).sum((2, 3)) / a.sum((2, 3)).clamp_min(1.0)  # (N, C) mean over active sites

    def forward(self, images: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, T, H, W), mask (B, T) True on real frames/pieces, text (B, d_text) CLS -> (B, dim)."""
        b, t = images.shape[:2]
        if t > 512:  # checked before any CNN work
            raise ValueError(f"VisualPathway: at most 512 frames/pieces, got {t}")
        frame_index = mask.nonzero()  # (N, 2): (batch, frame) of every real frame/piece
        x = images[frame_index[:, 0], frame_index[:, 1]].to(text.dtype)  # (N, H, W) or (N, 3, H, W)
        x = x.unsqueeze(1) if x.dim() == 3 else x  # (N, C_in, H, W)
        if x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ValueError(f"VisualPathway: images must have 1 or {self.in_channels} channels, got "
                                 f"shape {tuple(images.shape)}")
            x = x.expand(-1, self.in_channels, -1, -1)  # grey crops repeated on the RGB stem's channels
        query = text[frame_index[:, 0]]  # (N, d_text): the utterance's CLS vector for each frame
        if x.shape[0] > 0:
            feats = self.proj(self.extract(self.stem(x), query, frame_index.cpu()))  # (N, dim)
        else:
            self.records = []
            feats = images.new_zeros(0, self.dim, dtype=text.dtype)
        return self.encode_frames(feats, frame_index, mask)

    def encode_frames(self, feats: torch.Tensor, frame_index: torch.Tensor, mask: torch.Tensor):
        """The per-modality transformer (Ch. 5): one vector per real frame/piece, feats (N, dim) at
        ``frame_index`` (N, 2) = (batch, frame), mask (B, T) -> the CLS output (B, dim)."""
        b, t = mask.shape
        seq = feats.new_zeros(b, t, feats.shape[-1])
        seq[frame_index[:, 0], frame_index[:, 1]] = feats  # (B, T, dim); padding rows stay zero
        if self.position is not None:
            seq = seq + self.position[:, :t]
        seq = torch.cat([self.cls.expand(b, -1, -1), seq], dim=1)  # (B, 1+T, dim)
        keep = torch.cat([mask.new_ones(b, 1), mask.bool()], dim=1)  # the CLS token is never masked
        for layer in self.encoder:
            seq = layer(seq, keep)
        return seq[:, 0]  # (B, dim): CLS output


@dataclass(frozen=True)
class MesmConfig:
    """Hyper-parameters and fidelity switches of FE2E / MESM (Dai et al. 2021; Chapters 5-6), built in one
    line: ``MesmConfig.paper("MESM").build("LAV")`` or ``MESM("LAV", config=cfg, text_model=...)``.

    Defaults = the book's model at the paper's sizes; ``attention``/``sparse``/``top_p`` choose FE2E
    (False/False/1.0) or MESM (:meth:`mesm`). Sizes: ``stem_channels``, ``block_channels``, ``dim``,
    ``layers``, ``heads``, ``ff_size`` (None = 4 * dim), ``dropout``, ``attention_hidden`` (an int or
    ``"channels"``), ``text_lr_scale`` (text encoder's learning rate / ``lr``). Fidelity switches (book
    value first, reference second; see :class:`VisualPathway` and :class:`EndToEndModel`): ``positions``
    learned/none, ``head`` pool/flatten (with ``input_sizes``, ``flatten_hidden``), ``attention_grad``
    reweight/none, ``face_channels`` 1/3, ``conv_bias`` and ``score_bias`` False/True, ``cls_std``
    0.02/1.0, ``fusion`` softmax/linear, ``head_dropout`` True/False, ``text_head_lr`` full/text,
    ``sparse_bn_eps`` 1e-5/1e-4 and ``sparse_conv_init`` torch/he (SparseConvNet's BatchNorm and
    initialisation). The reference code's bug, off unless asked for: ``site_order`` matched/reference
    (:func:`reference_site_order`).
    """

    stem_channels: int = 64
    block_channels: tuple = (128, 256, 512)
    dim: int = 64
    layers: int = 4
    heads: int = 4
    ff_size: int | None = None
    dropout: float = 0.1
    attention: bool = False
    sparse: bool = False
    top_p: float = 1.0
    attention_hidden: int | str = 64
    text_lr_scale: float = 0.1
    positions: str = "learned"
    head: str = "pool"
    input_sizes: Mapping | None = None
    flatten_hidden: int = 1024
    attention_grad: str = "reweight"
    face_channels: int = 1
    conv_bias: bool = False
    score_bias: bool = False
    cls_std: float = 0.02
    fusion: str = "softmax"
    head_dropout: bool = True
    text_head_lr: str = "full"
    sparse_bn_eps: float = 1e-5
    sparse_conv_init: str = "torch"
    site_order: str = "matched"

    def __post_init__(self):
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        for name in ("stem_channels", "dim", "layers", "heads", "flatten_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MesmConfig: parameter '{name}' must be an integer >= 1, got {value!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"MesmConfig: parameter 'top_p' must be in (0, 1], got {self.top_p!r}")
        if not float(self.sparse_bn_eps) > 0.0:
            raise ValueError(f"MesmConfig: parameter 'sparse_bn_eps' must be > 0, got {self.sparse_bn_eps!r}")
        for name, allowed in (("positions", ("learned", "none")), ("head", ("pool", "flatten")),
                              ("attention_grad", ATTENTION_GRAD), ("fusion", ("softmax", "linear")),
                              ("face_channels", (1, 3)), ("text_head_lr", ("full", "text")),
                              ("sparse_conv_init", ("torch", "he")), ("site_order", SITE_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MesmConfig: parameter '{name}' must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        ah = self.attention_hidden
        if ah != "channels" and (isinstance(ah, bool) or not isinstance(ah, int) or ah < 1):
            raise ValueError(f"MesmConfig: parameter 'attention_hidden' must be an integer >= 1 or "
                             f"'channels', got {ah!r}")

    # -- the two models of the paper, and the authors' code --
    def fe2e(self) -> "MesmConfig":
        """The same sizes and switches as FE2E: dense blocks, no attention, no selection."""
        return replace(self, attention=False, sparse=False, top_p=1.0)

    def mesm(self, top_p: float | None = None) -> "MesmConfig":
        """The same sizes and switches as MESM: attention, top-p (``top_p``, default: this config's), sparse blocks."""
        return replace(self, attention=True, sparse=True, top_p=self.top_p if top_p is None else float(top_p))

    @classmethod
    def paper(cls, model: str = "MESM", reference_bugs: bool = False, **overrides) -> "MesmConfig":
        """The authors' network (wenliangdai/Multimodal-End2end-Sparse, ``MME2E`` / ``MME2E_Sparse`` run as
        its README says: transformer dim 64, 4 layers, 4 heads, ``-st=0.8`` for MESM) with every fidelity
        switch at the reference (:data:`REFERENCE_SWITCHES`; Chapters 5-6). ``model``: "MESM" (top_p 0.8)
        or "FE2E". ``reference_bugs=True`` also switches on the reference code's bug
        (:data:`REFERENCE_BUGS`: block 1's scrambled sites). ``overrides`` change single fields."""
        if model not in ("FE2E", "MESM"):
            raise ValueError(f"MesmConfig.paper: parameter 'model' must be 'FE2E' or 'MESM', got {model!r}")
        base = cls(**PAPER_SIZES, **REFERENCE_SWITCHES)
        base = base.mesm(0.8) if model == "MESM" else base.fe2e()
        return replace(base, **(REFERENCE_BUGS if reference_bugs else {}), **overrides)

    @classmethod
    def from_parameters(cls, params: Mapping, **overrides) -> "MesmConfig":
        """The sizes and switches found in a chapter's parameters (``run.params``; Chapters 5-6), the
        model choice (attention, sparse, top_p) left to :meth:`fe2e` / :meth:`mesm`."""
        skip = {"attention", "sparse", "top_p"}
        names = {f.name for f in fields(cls)} - skip
        return cls(**{k: v for k, v in params.items() if k in names}, **overrides)

    def build(self, modalities: str = "LAV", n_outputs: int = 6, *, text_model: str | None = None,
              tiny_text: bool = False, text_encoder: nn.Module | None = None) -> "EndToEndModel":
        """:class:`EndToEndModel` from this config and a text encoder (see :class:`EndToEndModel`)."""
        return EndToEndModel(modalities, n_outputs, config=self, text_model=text_model, tiny_text=tiny_text,
                             text_encoder=text_encoder)

    def as_dict(self) -> dict:
        """The fields as a plain dict (``metrics.json``, sweeps)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


#: The fidelity switches at the MESM reference code's behaviour: PyTorch's default feed-forward size 2048,
#: no positions, flatten + MLP(1024) head, attention hidden = the block's input channels (64/128/256) with
#: a scoring bias, attention used only to select (no gradient), RGB faces, conv biases in the dense layers,
#: CLS initialised N(0, 1), no dropout before the heads, unnormalised Linear(3, 1) fusion, text head at the
#: text encoder's learning rate, SparseConvNet's BatchNorm eps 1e-4 and He-normal initialisation.
REFERENCE_SWITCHES = dict(ff_size=2048, positions="none", head="flatten", flatten_hidden=1024,
                          attention_hidden="channels", score_bias=True, attention_grad="none", face_channels=3,
                          conv_bias=True, cls_std=1.0, head_dropout=False, fusion="linear", text_head_lr="text",
                          dropout=0.1, text_lr_scale=0.1, sparse_bn_eps=1e-4, sparse_conv_init="he")
#: The reference code's bugs, on in ``MesmConfig.paper(reference_bugs=True)``.
REFERENCE_BUGS = dict(site_order="reference")


# --------------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------------
class EndToEndModel(nn.Module):
    """FE2E / MESM (Dai et al. 2021; Ch. 5-6): ``model(batch) -> logits (B, n_outputs)``.

    ``modalities``: any subset of "LAV" containing "L". ``text_model``: '' / None = bundled
    all-MiniLM-L6-v2, an HF id (local cache) or folder; ``tiny_text=True`` a small random BERT;
    ``text_encoder``: a ready text module. Everything else comes from ``config``, one
    :class:`MesmConfig` (None = its defaults): its ``attention``/``sparse``/``top_p`` switch between
    FE2E and MESM (see module docstring; :func:`FE2E` and :func:`MESM` set them), ``text_lr_scale``
    sets the text encoder's learning rate relative to ``lr`` in :meth:`param_groups` (MESM trains it at
    lr/10), and the sizes (``stem_channels``, ``block_channels``, ``dim``, ``layers``, ``heads``)
    default to the paper's.

    Fidelity switches (fields of :class:`MesmConfig`; defaults = the book's model, :meth:`MesmConfig.paper` = the
    authors' code, Ch. 5-6):
    ``ff_size`` (None = 4 * dim; reference 2048), ``positions``, ``head``/``input_sizes``/
    ``flatten_hidden``, ``attention_hidden``, ``attention_grad``, ``face_channels``, ``conv_bias``,
    ``score_bias``, ``cls_std`` (see :class:`VisualPathway`); ``fusion`` -- ``"softmax"`` (book:
    softmax-normalised modality weights) or ``"linear"`` (reference: an unnormalised
    ``Linear(n_modalities, 1, bias=False)`` over the per-modality logits; one modality: its logits);
    ``head_dropout`` -- dropout before the per-modality heads (book: True; reference: none);
    ``text_head_lr`` -- ``"full"`` (book) or ``"text"`` (reference: the text head trains at the text
    encoder's reduced learning rate).
    """

    #: :data:`nbsupport.train.PROTOCOLS` entry of the authors' training code (``fit(protocol="paper")``).
    paper_protocol = "mesm"

    def __init__(self, modalities: str = "LAV", n_outputs: int = 6, *, config: "MesmConfig | None" = None,
                 text_model: str | None = None, tiny_text: bool = False, text_encoder: nn.Module | None = None):
        super().__init__()
        if config is not None and not isinstance(config, MesmConfig):
            raise TypeError(f"EndToEndModel: parameter 'config' must be a MesmConfig, got {type(config).__name__}")
        c = self.config = config if config is not None else MesmConfig()
        if not isinstance(modalities, str) or not modalities or set(modalities) - set("LAV") or "L" not in modalities:
            raise ValueError(f"EndToEndModel: parameter 'modalities' must be letters from 'LAV' including 'L' "
                             f"(text drives the model), got {modalities!r}")
        if c.top_p < 1.0 and not c.attention:
            raise ValueError("EndToEndModel: parameter 'top_p' < 1 needs attention=True (the attention chooses the sites)")
        sizes = {**INPUT_SIZES, **dict(c.input_sizes or {})}
        if c.head == "flatten":
            for m in modalities:
                if m != "L" and any(int(v) % 2 ** (1 + len(c.block_channels)) for v in sizes[m]):
                    raise ValueError(f"EndToEndModel: parameter 'input_sizes'[{m!r}]={sizes[m]} must be "
                                     f"divisible by {2 ** (1 + len(c.block_channels))} for head='flatten'")
        self.modalities = "".join(m for m in "LAV" if m in modalities)
        self.attention, self.text_lr_scale = c.attention, c.text_lr_scale
        self.fusion_kind, self.head_dropout, self.text_head_lr = c.fusion, c.head_dropout, c.text_head_lr
        self.text = text_encoder if text_encoder is not None else TextEncoder(text_model or None, tiny=tiny_text)
        text_dim = self.text.hidden_size
        self.dropout = nn.Dropout(c.dropout)
        self.pathways = nn.ModuleDict({
            m: VisualPathway(text_dim, c, input_size=sizes[m], in_channels=c.face_channels if m == "V" else 1)
            for m in self.modalities if m != "L"})
        self.heads = nn.ModuleDict({m: nn.Linear(text_dim if m == "L" else c.dim, n_outputs) for m in self.modalities})
        if c.fusion == "softmax":
            self.fusion = nn.Parameter(torch.zeros(len(self.modalities)))  # softmax -> modality weights
        else:  # reference: Linear(n_modalities, 1, bias=False) over the stacked logits, weights unnormalised
            self.fusion = nn.Linear(len(self.modalities), 1, bias=False)

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
        """The learned modality weights of the late fusion: softmax-normalised (book) or the raw weights of
        the reference's ``Linear(n_modalities, 1)`` (``fusion="linear"``)."""
        if self.fusion_kind == "linear":
            w = self.fusion.weight.detach()[0]
        else:
            w = torch.softmax(self.fusion.detach(), 0)
        return {m: float(w[i]) for i, m in enumerate(self.modalities)}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for :func:`nbsupport.train.fit`: text encoder at ``lr * text_lr_scale`` (with
        the text head too when ``text_head_lr="text"``, as the reference code)."""
        text = list(self.text.parameters())
        if self.text_head_lr == "text":
            text += list(self.heads["L"].parameters())
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
            vec = self.dropout(vec) if self.head_dropout else vec  # the reference has no dropout here
            logits[m] = self.heads[m](vec)  # (B, n_outputs)
        stacked = torch.stack([logits[m] for m in self.modalities], 0)  # (M, B, n_outputs)
        if self.fusion_kind == "linear":  # reference: sum_m w_m * logits_m, w unnormalised
            if len(self.modalities) == 1:
                return stacked[0]
            # (B, n_outputs, M) -> (B, n_outputs)
            return self.fusion(stacked.permute(1, 2, 0)).squeeze(-1)
        w = torch.softmax(self.fusion, 0)  # (M,)
        return (w[:, None, None] * stacked).sum(0)


def FE2E(modalities: str = "LAV", n_outputs: int = 6, *, config: "MesmConfig | None" = None,
         text_model: str | None = None, tiny_text: bool = False,
         text_encoder: nn.Module | None = None) -> EndToEndModel:
    """FE2E (Dai et al. 2021, Sec. 3.1; Ch. 5): dense CNNs, no cross-modal selection. ``config``: a
    :class:`MesmConfig` for the sizes and switches (None = its defaults; its attention/sparse/top_p
    are set to FE2E's); the text arguments as :class:`EndToEndModel`'s."""
    config = config if config is not None else MesmConfig()
    return config.fe2e().build(modalities, n_outputs, text_model=text_model, tiny_text=tiny_text,
                               text_encoder=text_encoder)


def MESM(modalities: str = "LAV", n_outputs: int = 6, top_p: float = 0.7, *,
         config: "MesmConfig | None" = None, text_model: str | None = None, tiny_text: bool = False,
         text_encoder: nn.Module | None = None) -> EndToEndModel:
    """MESM (Dai et al. 2021, Sec. 3.2-3.3; Ch. 6): cross-modal attention, top-p selection, sparse blocks.
    ``config``: a :class:`MesmConfig` for the sizes and switches (None = its defaults; attention and
    sparse blocks switched on, ``top_p`` set); the text arguments as :class:`EndToEndModel`'s."""
    config = config if config is not None else MesmConfig()
    return config.mesm(top_p).build(modalities, n_outputs, text_model=text_model, tiny_text=tiny_text,
                                    text_encoder=text_encoder)


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

    if isinstance(batches, dict):
        batches = [batches]
    tables = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in batches:
        tables.append(flops.count_macs(model, to_device(batch, device), include=is_extractor_layer))
    model.train(was_training)
    table = pd.concat(tables, ignore_index=True).groupby(["layer", "kind"], as_index=False, sort=False).sum(
        numeric_only=True)
    table["density"] = table["sites"] / table["dense_sites"].where(table["dense_sites"] > 0)
    out = flops.summarize_macs(table)
    out["table"] = table
    return out


# --------------------------------------------------------------------------------------------------
# Chapter plumbing: data loaders and sizes
# --------------------------------------------------------------------------------------------------
#: The paper's sizes (Dai et al. 2021, Sec. 4.2).
PAPER_SIZES = dict(stem_channels=64, block_channels=(128, 256, 512), dim=64, layers=4, heads=4)


#: ALBERT-base-v2, the reference's text encoder (Lan et al. 2020): sizes of its Hugging Face configuration.
ALBERT_BASE = dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                   type_vocab_size=2)


def paper_parameter_count(model: str = "MESM", modalities: str = "LAV", n_outputs: int = 6,
                          text_dim: int = ALBERT_BASE["hidden_size"]) -> dict:
    """Parameter counts of the FE2E or MESM paper preset (Chapters 5-6), without any word-embedding table.

    ``non_text``: everything but the text encoder, with the text CLS vector of width ``text_dim`` (768,
    ALBERT-base-v2's) feeding the text head and the cross-modal attention; ``text_encoder``: ALBERT-base-v2
    built from its configuration (:data:`ALBERT_BASE`; random weights, nothing is downloaded) without its
    word-embedding table; ``total``: both. Pinned by a test that derives ``non_text`` from layer sizes.
    """
    from transformers import AlbertConfig, AlbertModel  # local: transformers costs ~0.6 s to import

    if model not in ("FE2E", "MESM"):
        raise ValueError(f"paper_parameter_count: parameter 'model' must be 'FE2E' or 'MESM', got {model!r}")

    class _Width(nn.Module):  # only carries the CLS width; this model is counted, never run
        hidden_size = text_dim

    net = MesmConfig.paper(model).build(modalities, n_outputs, text_encoder=_Width())
    albert = AlbertModel(AlbertConfig(**ALBERT_BASE))
    text = count_parameters(albert) - albert.embeddings.word_embeddings.weight.numel()
    non_text = count_parameters(net)
    return {"non_text": non_text, "text_encoder": text, "total": non_text + text}
