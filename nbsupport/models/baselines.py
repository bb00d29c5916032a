"""Two-phase baselines on hand-crafted features: LF-LSTM, LF-Transformer and MulT (Chapter 7).

MESM's first claim (Dai, Cahyawijaya et al., NAACL 2021, Sec. 1 and Table 2) is that learning from
raw inputs end-to-end beats the *two-phase* pipeline: features are extracted first by fixed tools
(word vectors, MFCC/prosody statistics, facial geometry/HOG; ``nbsupport.data.handcrafted_dataset``)
and only then a model is trained on them. The paper compares against three such models:

* **LF-LSTM** (late-fusion LSTM): one bidirectional LSTM per modality over its feature sequence, the
  final forward/backward states concatenated across modalities, then an MLP (:class:`LFLSTM`);
* **LF-Transformer**: one transformer encoder per modality, pooled, concatenated (:class:`LFTransformer`);
* **MulT** (Tsai et al., "Multimodal Transformer for Unaligned Multimodal Language Sequences", ACL
  2019): for every *target* modality, crossmodal transformers in which each *other* modality provides
  the keys and values, then a self-attention transformer over the concatenated crossmodal outputs,
  and a linear head over the concatenation of all targets (:class:`MulT`, :class:`CrossmodalBlock`).

All three read the ``collate_umons`` batch keys (``text``/``audio``/``video`` (B, L, D) with boolean
masks ``*_mask`` True = real) and return logits (B, n_outputs); any subset of "LAV" works, and
padding never changes the output (LSTMs run on packed sequences, attention masks padded keys, pooling
is masked). Inputs are standardised with per-feature mean/std measured on the training split
(:meth:`fit_input_stats`), because raw MFCCs (~-300) and geometry ratios (~0.1) differ in scale by
orders of magnitude.

Chapter 7 trains them with :func:`nbsupport.protocol.train_and_test` (the same trainer, thresholds and metrics for every model,
FE2E/MESM included) and :func:`model_macs` (MACs per utterance, for the table's compute column).
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Mapping

import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from nbsupport.attention import MultiHeadAttention, PositionwiseFeedForward, TransformerEncoderBlock, key_padding_mask
from nbsupport.models.umons import MODALITY_KEYS, input_dims_from, masked_feature_moments
from nbsupport import flops
from nbsupport.base import ParameterError, check_modalities, to_device

__all__ = ["LFLSTM", "LFTransformer", "MulT", "CrossmodalBlock", "BASELINES", "build_baseline",
           "sinusoidal_positions", "fairseq_positions", "MULT_REFERENCE", "LF_LSTM_REFERENCE", "LogitFusion",
           "LF_TRANSFORMER_REFERENCE", "masked_mean", "input_dims_from", "model_macs", "emotion_table"]


# ------------------------------------------------------------------------------------------------
# Small shared pieces (``input_dims_from`` is UMONS' own: the same collate_umons batch keys)
# ------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over time of the real positions only: x (B, L, D), mask (B, L) True = real -> (B, D).

    A sequence with no real position gives the zero vector."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))  # garbage (even inf/NaN) in padding -> 0
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal position encodings (Vaswani et al. 2017, Sec. 3.5), (length, dim); used by MulT too."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    angle = pos / torch.pow(10000.0, i / dim)  # (L, ceil(dim/2))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


def fairseq_positions(x: torch.Tensor) -> torch.Tensor:
    """The sinusoidal positions of the MulT reference code (fairseq/tensor2tensor form; Chapter 7):
    ``[sin(p w_i), cos(p w_i)]`` (sines then cosines, not interleaved) with ``w_i = 10000^(-i / (D/2 - 1))``
    and positions ``p = 1 .. L``; a position whose *first feature* is exactly 0 is taken for padding and
    gets the zero vector (p = 0 row zeroed). x (B, L, D) -> (B, L, D), no gradient."""
    b, length, dim = x.shape
    half = dim // 2
    rate = math.log(10000) / (half - 1) if half > 1 else 0.0
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -rate)  # (half,)
    pos = torch.arange(1, length + 1, dtype=torch.float32, device=x.device)[:, None] * freq[None]  # (L, half)
    table = torch.cat([torch.sin(pos), torch.cos(pos)], 1)  # (L, 2 * half)
    if dim % 2:
        table = torch.cat([table, table.new_zeros(length, 1)], 1)
    real = (x[..., 0] != 0).to(table.dtype)[..., None]  # (B, L, 1): the reference's padding test
    return (table[None] * real).to(x.dtype).detach()


def _check_modalities(name: str, modalities: str, input_dims: Mapping[str, int]) -> str:
    try:  # distinct letters from L, A, V (the notebooks' rule); returned in "LAV" order
        modalities = check_modalities("modalities", modalities)
    except ParameterError as err:
        raise ValueError(f"{name}: {err}") from None
    missing = [m for m in modalities if m not in input_dims]
    if missing:
        raise ValueError(f"{name}: parameter 'input_dims' has no size for modality {', '.join(missing)} "
                         f"(expected e.g. {{'L': 384, 'A': 33, 'V': 356}}, got {dict(input_dims)})")
    return modalities


class _LateFusionBase(nn.Module):
    """Shared plumbing of the Chapter 7 baselines: modality subset, input standardisation, batch checks."""

    def __init__(self, modalities: str, input_dims: Mapping[str, int]):
        super().__init__()
        self.modalities = _check_modalities(type(self).__name__, modalities, input_dims)
        self.input_dims = {m: int(input_dims[m]) for m in self.modalities}
        for m in self.modalities:  # per-feature standardisation, measured on the training split
            self.register_buffer(f"mean_{m}", torch.zeros(self.input_dims[m]))
            self.register_buffer(f"std_{m}", torch.ones(self.input_dims[m]))

    @torch.no_grad()
    def fit_input_stats(self, loader: Iterable) -> "_LateFusionBase":
        """Set each modality's per-feature mean/std from the real (unpadded) positions of ``loader``'s
        batches (the training split; :func:`nbsupport.models.umons.masked_feature_moments`, a std below
        1e-6 replaced by 1). Two-phase pipelines standardise their features like this (Chapter 7)."""
        for m, (mean, std, n) in masked_feature_moments(loader, self.modalities, self._raw).items():
            if n == 0:
                raise ValueError(f"{type(self).__name__}.fit_input_stats: no real position of modality {m} in the loader")
            getattr(self, f"mean_{m}").copy_(mean.float())
            getattr(self, f"std_{m}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())
        return self

    def _raw(self, batch: Mapping[str, torch.Tensor], m: str):
        key = MODALITY_KEYS[m]
        if key not in batch or f"{key}_mask" not in batch:
            raise KeyError(f"{type(self).__name__}: modality '{m}' needs batch keys '{key}' and '{key}_mask' "
                           f"(collate_umons output); batch has {sorted(batch)}")
        x, mask = batch[key], batch[f"{key}_mask"].bool()
        if x.dim() != 3 or x.shape[-1] != self.input_dims[m]:
            raise ValueError(f"{type(self).__name__}: batch['{key}'] must be (B, L, {self.input_dims[m]}), "
                             f"got {tuple(x.shape)}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"{type(self).__name__}: batch['{key}_mask'] must be {tuple(x.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        return x, mask

    def _inputs(self, batch: Mapping[str, torch.Tensor], m: str):
        """Standardised features with padding set to 0 (garbage, even NaN, cannot leak): (B, L, D), mask (B, L)."""
        x, mask = self._raw(batch, m)
        x = (x.float() - getattr(self, f"mean_{m}")) / getattr(self, f"std_{m}")
        return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x)), mask


def _fusion_head(in_dim: int, hidden: int, n_outputs: int, dropout: float) -> nn.Sequential:
    """Late-fusion classifier over the concatenated modality vectors: MLP with one hidden layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, n_outputs))


# ------------------------------------------------------------------------------------------------
# LF-LSTM
# ------------------------------------------------------------------------------------------------
class LogitFusion(nn.Module):
    """The late fusion of MESM's two-phase baselines (``lf_rnn.py``, ``lf_transformer.py``; Chapter 7):
    per modality ``Linear(w, h) -> ReLU -> Linear(h, n_outputs)`` on its vector of width ``w``, then an
    unnormalised ``Linear(M, 1)`` over the stacked logits (one modality: its logits).
    ``widths``: {modality: (w, h)}."""

    def __init__(self, widths: Mapping[str, tuple], n_outputs: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(w, h), nn.ReLU(), nn.Linear(h, n_outputs))
                                    for m, (w, h) in widths.items()})
        self.weighted_fusion = nn.Linear(len(widths), 1, bias=False)

    def forward(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.stack([self.heads[m](v) for m, v in vectors.items()], -1)  # (B, n_outputs, M)
        return logits[..., 0] if logits.shape[-1] == 1 else self.weighted_fusion(logits).squeeze(-1)


def _check_choices(owner: str, **choices) -> None:
    """A switch must take one of its values: ``name=(value, allowed)`` (booleans only True/False)."""
    for name, (value, allowed) in choices.items():
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ValueError(f"{owner}: parameter '{name}' must be one of {allowed}, got {value!r}")


def _late_fusion(owner, fusion, width, hidden, widths, n_outputs, dropout):
    """The book's concatenation + MLP (``fusion="features"``) or the reference's :class:`LogitFusion`."""
    if fusion == "logits":
        return LogitFusion(widths, n_outputs)
    if width == "features":
        raise ValueError(f"{owner}: a width of 'features' needs fusion='logits' (the reference's heads)")
    return _fusion_head(sum(w for w, _ in widths.values()), hidden, n_outputs, dropout)


class LFLSTM(_LateFusionBase):
    """LF-LSTM (the late-fusion LSTM baseline of MESM's Table 2; Chapter 7).

    Per modality m: a biLSTM over the *packed* real positions (prefix masks, as ``collate_umons``
    makes them); the vector is ``[h_fwd(T_m); h_bwd(1)]`` of the last layer, (B, 2H); late fusion:
    concatenation, then an MLP. Switches (:data:`LF_LSTM_REFERENCE` = MESM's ``lf_rnn.py``):
    ``hidden="features"``; ``readout="padded"`` (the padded sequence: text reads the output at the
    last padded step, audio/video the final states); ``fusion="logits"`` (:class:`LogitFusion`).
    """

    def __init__(self, modalities: str = "LAV", input_dims: Mapping[str, int] | None = None,
                 n_outputs: int = 6, *, hidden: int | str = 64, layers: int = 1,
                 dropout: float = 0.1, readout: str = "packed", fusion: str = "features"):
        super().__init__(modalities, input_dims or {})
        _check_choices("LFLSTM", readout=(readout, ("packed", "padded")),
                       fusion=(fusion, ("features", "logits")))
        self.hidden, self.readout = hidden, readout
        width = {m: self.input_dims[m] if hidden == "features" else hidden for m in self.modalities}
        self.lstms = nn.ModuleDict({
            m: nn.LSTM(self.input_dims[m], width[m], num_layers=layers, batch_first=True,
                       bidirectional=True, dropout=dropout if layers > 1 else 0.0)
            for m in self.modalities})
        self.head = _late_fusion("LFLSTM", fusion, hidden, hidden,  # widths: (vector, head hidden)
                                 {m: (2 * width[m], width[m]) for m in width}, n_outputs, dropout)

    def encode(self, batch: Mapping[str, torch.Tensor], m: str) -> torch.Tensor:
        """Final forward and backward states of modality ``m``'s biLSTM, (B, 2 * hidden)."""
        x, mask = self._inputs(batch, m)
        if self.readout == "padded":  # the reference: the padded sequence, padding included
            out, (h_n, _) = self.lstms[m](x)
            return out[:, -1] if m == "L" else torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H)
        lengths = mask.sum(1)
        if not torch.equal(mask, key_padding_mask(lengths, mask.shape[1])):
            raise ValueError(f"LFLSTM: batch['{MODALITY_KEYS[m]}_mask'] must be a prefix mask "
                             "(real positions first, then padding), as collate_umons makes it")
        # an empty sequence reads one zero vector (padding was zeroed) instead of failing in pack
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), True, enforce_sorted=False)
        _, (h_n, _) = self.lstms[m](packed)  # h_n (layers * 2, B, H), in the original batch order
        return torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        vectors = {m: self.encode(batch, m) for m in self.modalities}  # each (B, 2H)
        if isinstance(self.head, LogitFusion):
            return self.head(vectors)
        return self.head(torch.cat(list(vectors.values()), dim=-1))  # (B, M * 2H) -> logits


# ------------------------------------------------------------------------------------------------
# LF-Transformer
# ------------------------------------------------------------------------------------------------
class LFTransformer(_LateFusionBase):
    """LF-Transformer (late-fusion transformer baseline of MESM's Table 2; Chapter 7).

    Per modality m: a linear map to ``dim``, sinusoidal positions (Vaswani et al. 2017, Sec. 3.5),
    ``layers`` :class:`nbsupport.attention.TransformerEncoderBlock` with the padding mask, and masked
    mean pooling over the real positions, (B, dim). Late fusion: concatenation, then an MLP.

    Fidelity switches (book value first; :data:`LF_TRANSFORMER_REFERENCE` = MESM's ``lf_transformer.py``):
    ``dim`` an int or ``"features"`` (no input projection: each transformer as wide as its features);
    ``heads`` an int or one per modality; ``positions`` "sinusoidal" or "none"; ``pooling`` "mean" or
    "cls" (a learned CLS vector, initial std 1, prepended and never masked; its output is read);
    ``text_mask`` -- False: the language transformer attends to padding too (the reference passes no
    lengths for text); ``fusion`` "features" or "logits" (per modality ``Linear(d, d // 2) -> ReLU ->
    Linear(d // 2, n_outputs)``, then an unnormalised ``Linear(M, 1)``).
    """

    def __init__(self, modalities: str = "LAV", input_dims: Mapping[str, int] | None = None, n_outputs: int = 6, *,
                 dim: int | str = 64, layers: int = 2, heads: int | Mapping[str, int] = 4, ff_size: int | None = None,
                 dropout: float = 0.1, positions: str = "sinusoidal", pooling: str = "mean", text_mask: bool = True,
                 fusion: str = "features"):
        super().__init__(modalities, input_dims or {})
        if dim == "features" and fusion != "logits":  # checked before any layer is built
            raise ValueError("LFTransformer: a width of 'features' needs fusion='logits' (the reference's heads)")
        _check_choices("LFTransformer", positions=(positions, ("sinusoidal", "none")),
                       pooling=(pooling, ("mean", "cls")), fusion=(fusion, ("features", "logits")),
                       text_mask=(text_mask, (True, False)))
        self.dim, self.positions, self.pooling, self.text_mask = dim, positions, pooling, text_mask
        width = {m: self.input_dims[m] if dim == "features" else int(dim) for m in self.modalities}
        n_heads = {m: heads[m] if isinstance(heads, Mapping) else heads for m in self.modalities}
        # no projection when each transformer is as wide as its features (the reference)
        self.proj = nn.ModuleDict({m: nn.Linear(self.input_dims[m], width[m]) for m in self.modalities
                                   if dim != "features"})
        self.encoders = nn.ModuleDict({m: nn.ModuleList([TransformerEncoderBlock(width[m], n_heads[m],
                                                                                 ff_size or 2 * width[m], dropout)
                                                         for _ in range(layers)]) for m in self.modalities})
        if pooling == "cls":  # an nn.Embedding(1, d) in the reference: initial std 1
            self.cls = nn.ParameterDict({m: nn.Parameter(torch.randn(width[m])) for m in self.modalities})
        self.head = _late_fusion("LFTransformer", fusion, dim, dim if dim != "features" else 0,
                                 {m: (width[m], width[m] // 2) for m in self.modalities}, n_outputs, dropout)

    def encode(self, batch: Mapping[str, torch.Tensor], m: str) -> torch.Tensor:
        """Modality ``m``'s transformer read out (masked mean, or the CLS output), (B, width)."""
        x, mask = self._inputs(batch, m)
        h = self.proj[m](x) if m in self.proj else x  # (B, L, width)
        if self.positions == "sinusoidal":
            h = h + sinusoidal_positions(x.shape[1], h.shape[-1], x.device)
        attend = mask if (self.text_mask or m != "L") else torch.ones_like(mask)
        if self.pooling == "cls":
            h = torch.cat([self.cls[m].expand(h.shape[0], 1, -1), h], 1)  # (B, 1 + L, width)
            attend = torch.cat([attend.new_ones(h.shape[0], 1), attend], 1)
        for block in self.encoders[m]:
            h = block(h, attend)
        return h[:, 0] if self.pooling == "cls" else masked_mean(h, mask)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        vectors = {m: self.encode(batch, m) for m in self.modalities}
        if isinstance(self.head, LogitFusion):
            return self.head(vectors)
        return self.head(torch.cat(list(vectors.values()), dim=-1))


#: LF-Transformer as MESM's ``lf_transformer.py`` (``LF_Transformer``) builds it with ``main.py``'s defaults
#: (2 layers; heads 4, 2, 5; PyTorch's encoder layer: feed-forward 2048, post-LayerNorm):
#: ``LFTransformer("LAV", dims, n, **LF_TRANSFORMER_REFERENCE)``.
LF_TRANSFORMER_REFERENCE = dict(dim="features", layers=2, heads={"L": 4, "A": 2, "V": 5}, ff_size=2048,
                                positions="none", pooling="cls", text_mask=False, fusion="logits")


# ------------------------------------------------------------------------------------------------
# MulT
# ------------------------------------------------------------------------------------------------
class CrossmodalBlock(nn.Module):
    """One crossmodal attention layer of MulT (Tsai et al. 2019, Sec. 3.2, eq. 4), pre-LayerNorm
    form:

    ``Z^ = Z + MHA(LN_q(Z), LN_kv(S), LN_kv(S))`` -- target sequence Z (queries) attends to the
    source modality S (keys/values), masked on S's padding; ``Z' = Z^ + FF(LN_ff(Z^))``.
    With ``source=None`` it is a self-attention layer (the source is Z itself, LN_q used for
    both), the form of MulT's self-attention transformers. ``kv_norm="shared"``: one LayerNorm
    for queries and keys/values, as the reference code (``layer_norms[0]`` on all three); a
    self-attention layer never needs the second one, so MulT builds those shared.
    """

    def __init__(self, dim: int, heads: int, ff_size: int | None = None, dropout: float = 0.0,
                 kv_norm: str = "separate"):
        super().__init__()
        _check_choices("CrossmodalBlock", kv_norm=(kv_norm, ("separate", "shared")))
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if kv_norm == "separate" else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = PositionwiseFeedForward(dim, ff_size or 4 * dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, target, target_mask=None, source=None, source_mask=None, attn_mask=None):
        """target (B, Lt, dim); source (B, Ls, dim) or None (self-attention); masks (B, L) True
        = real; ``attn_mask`` (B, Lt, Ls), if given, replaces the key mask (MulT's reference
        switches). Returns (B, Lt, dim); padded target rows are computed but never read."""
        q = self.norm_q(target)
        if source is None:
            kv, kv_mask = q, target_mask
        else:
            kv, kv_mask = (self.norm_kv or self.norm_q)(source), source_mask
        if attn_mask is not None:
            kv_mask = attn_mask
        z = target + self.dropout(self.attention(q, kv, kv, kv_mask))
        return z + self.dropout(self.ff(self.norm_ff(z)))


class MulT(_LateFusionBase):
    """MulT-style crossmodal transformer (Tsai et al. 2019; MESM's strongest two-phase baseline, Ch. 7).

    1. Each modality is projected to ``dim`` (MulT's temporal Conv1d with kernel 1 = a linear map, so
       padding cannot leak into real positions) and gets sinusoidal positions.
    2. For each target modality b and each other modality a, a crossmodal transformer a -> b of
       ``cross_layers`` :class:`CrossmodalBlock` (queries from b, keys/values from a's low-level
       features, a's padding masked), then a final LayerNorm.
    3. The crossmodal outputs of target b are concatenated on the feature axis, (B, L_b, (M-1) * dim),
       and go through ``self_layers`` self-attention blocks (MulT's Sec. 3.3); with a single modality
       the self-attention runs on its own projection.
    4. Each target sequence is pooled by a masked mean over its real positions (MulT reads the last
       element; with padding at the end, the mean is the padding-safe choice), the targets are
       concatenated, and MulT's residual MLP ``h + W2 ReLU(W1 h)`` and a linear layer give the logits.

    Fidelity switches (book value first; :data:`MULT_REFERENCE` = the authors' ``MULTModel`` run with
    its defaults, Chapter 7): ``entry`` -- "book" (positions added once after the projection) or
    "reference" (every transformer scales its inputs by sqrt(width) and adds :func:`fairseq_positions` at
    entry, to the queries and to the keys/values); ``kv_norm`` -- "separate" LayerNorms for queries and
    keys/values, or one "shared"; ``proj_bias`` -- the input projection's bias (reference: none);
    ``mask_padding`` -- padded keys masked (reference: no padding mask); ``future_mask`` -- the
    reference's default ``attn_mask``: query i sees keys j < i + 1 + |L_k - L_q|; ``pooling`` -- "mean"
    over real positions or the "last" position of the padded sequence (reference).
    """

    #: ``fit(protocol="paper")`` trains MulT as its code does (:data:`nbsupport.train.PROTOCOLS` "mult")
    paper_protocol = "mult"

    def __init__(self, modalities: str = "LAV", input_dims: Mapping[str, int] | None = None, n_outputs: int = 6, *,
                 dim: int = 32, heads: int = 4, cross_layers: int = 2, self_layers: int = 1,
                 ff_size: int | None = None, dropout: float = 0.1, entry: str = "book", kv_norm: str = "separate",
                 proj_bias: bool = True, mask_padding: bool = True, future_mask: bool = False,
                 pooling: str = "mean"):
        super().__init__(modalities, input_dims or {})
        _check_choices("MulT", entry=(entry, ("book", "reference")), pooling=(pooling, ("mean", "last")),
                       kv_norm=(kv_norm, ("separate", "shared")), proj_bias=(proj_bias, (True, False)),
                       mask_padding=(mask_padding, (True, False)), future_mask=(future_mask, (True, False)))
        self.dim, self.entry, self.pooling = dim, entry, pooling
        self.mask_padding, self.future_mask = mask_padding, future_mask
        n_src = max(len(self.modalities) - 1, 1)
        tdim = dim * n_src
        if tdim % heads:
            raise ValueError(f"MulT: (number of modalities - 1) * dim = {tdim} must be divisible by heads={heads}")
        self.proj = nn.ModuleDict({m: nn.Linear(self.input_dims[m], dim, bias=proj_bias) for m in self.modalities})
        self.cross = nn.ModuleDict({f"{a}2{b}": nn.ModuleList([CrossmodalBlock(dim, heads, ff_size, dropout, kv_norm)
                                                               for _ in range(cross_layers)])
                                    for b in self.modalities for a in self.modalities if a != b})
        self.cross_norm = nn.ModuleDict({k: nn.LayerNorm(dim) for k in self.cross})
        # self-attention layers read one sequence: one LayerNorm serves queries and keys/values
        self.self_attn = nn.ModuleDict({b: nn.ModuleList([CrossmodalBlock(tdim, heads, ff_size, dropout, "shared")
                                                          for _ in range(self_layers)]) for b in self.modalities})
        self.self_norm = nn.ModuleDict({b: nn.LayerNorm(tdim) for b in self.modalities})
        out_dim = tdim * len(self.modalities)
        self.proj1, self.proj2 = nn.Linear(out_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.out = nn.Linear(out_dim, n_outputs)
        self.dropout = nn.Dropout(dropout)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """A transformer's entry: the reference scales by sqrt(width) and adds its positions; the book
        added its positions once after the projection."""
        if self.entry == "book":
            return x
        return math.sqrt(x.shape[-1]) * x + fairseq_positions(x)

    def _attn_mask(self, q_mask: torch.Tensor, k_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, Lq, Lk) allowed keys under the switches, or None for the plain key-padding mask."""
        if self.mask_padding and not self.future_mask:
            return None
        b, lq, lk = q_mask.shape[0], q_mask.shape[1], k_mask.shape[1]
        allowed = k_mask[:, None, :].expand(b, lq, lk) if self.mask_padding else k_mask.new_ones(b, lq, lk)
        if self.future_mask:  # the reference's buffered_future_mask
            i = torch.arange(lq, device=k_mask.device)[:, None]
            j = torch.arange(lk, device=k_mask.device)[None, :]
            allowed = allowed & (j < i + 1 + abs(lk - lq))
        return allowed

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        seqs = {}
        for m in self.modalities:
            x, mask = self._inputs(batch, m)
            z = self.proj[m](x)  # (B, L_m, dim)
            seqs[m] = (z + sinusoidal_positions(x.shape[1], self.dim, x.device) if self.entry == "book" else z, mask)
        pooled = []
        for b in self.modalities:
            zb, mb = seqs[b]
            parts = []
            for a in self.modalities:
                if a == b:
                    continue
                za, ma = seqs[a]
                z, kv, am = self._enter(zb), self._enter(za), self._attn_mask(mb, ma)
                for block in self.cross[f"{a}2{b}"]:
                    z = block(z, mb, kv, ma, attn_mask=am)  # queries from b, keys/values from a's low-level features
                parts.append(self.cross_norm[f"{a}2{b}"](z))
            h = torch.cat(parts, dim=-1) if parts else zb  # (B, L_b, (M-1) * dim)
            h, am = self._enter(h), self._attn_mask(mb, mb)
            for block in self.self_attn[b]:
                h = block(h, mb, attn_mask=am)
            h = self.self_norm[b](h)
            pooled.append(h[:, -1] if self.pooling == "last" else masked_mean(h, mb))  # (B, (M-1) * dim)
        h = torch.cat(pooled, dim=-1)  # (B, M * (M-1) * dim)
        h = h + self.proj2(self.dropout(torch.relu(self.proj1(h))))
        return self.out(h)


#: LF-LSTM as MESM's ``lf_rnn.py`` (``LF_RNN``) builds it: ``LFLSTM("LAV", dims, n, **LF_LSTM_REFERENCE)``.
LF_LSTM_REFERENCE = dict(hidden="features", layers=1, readout="padded", fusion="logits")

#: MulT as the authors' ``MULTModel`` builds it with ``main.py``'s defaults (yaohungt/Multimodal-Transformer:
#: d = 30 per modality, 5 heads, ``nlevels`` 5 crossmodal layers, max(5, 3) = 5 self-attention layers,
#: ``attn_mask`` on): ``MulT("LAV", dims, n, **MULT_REFERENCE)`` (Chapter 7).
MULT_REFERENCE = dict(dim=30, heads=5, cross_layers=5, self_layers=5, entry="reference", kv_norm="shared",
                      proj_bias=False, mask_padding=False, future_mask=True, pooling="last")


#: Chapter 7's baseline names (metrics.json ``model`` field) -> classes.
BASELINES = {"LF-LSTM": LFLSTM, "LF-Transformer": LFTransformer, "MulT": MulT}


def build_baseline(name: str, modalities: str, input_dims: Mapping[str, int], n_outputs: int = 6, **sizes) -> nn.Module:
    """Build one of :data:`BASELINES` by its table name ("LF-LSTM", "LF-Transformer", "MulT")."""
    if name not in BASELINES:
        raise ValueError(f"build_baseline: parameter 'name' must be one of {', '.join(BASELINES)}, got {name!r}")
    return BASELINES[name](modalities, input_dims, n_outputs, **sizes)


# ------------------------------------------------------------------------------------------------
# Chapter plumbing: loaders, one training protocol for every model, MACs, the paper-style table
# ------------------------------------------------------------------------------------------------
def _lstm_macs(lstm: nn.LSTM, steps: int) -> int:
    """MACs of an LSTM over ``steps`` real time steps: per step and direction 4 gates of
    ``H * (I + H)`` (input and recurrent matrix-vector products)."""
    dirs = 2 if lstm.bidirectional else 1
    total = 0
    for layer in range(lstm.num_layers):
        in_size = lstm.input_size if layer == 0 else lstm.hidden_size * dirs
        total += steps * dirs * 4 * lstm.hidden_size * (in_size + lstm.hidden_size)
    return total


@torch.no_grad()
def model_macs(model: nn.Module, items: Iterable[Mapping], collate, *, device="cpu") -> float:
    """Mean MACs per utterance of a whole baseline model, run one utterance at a time (no padding):
    linear layers through :class:`nbsupport.flops.MacCounter`, LSTMs by the gate formula, and the two
    attention matmuls ``QK^T`` and ``AV`` (``2 * Q * K * dim``) of every :class:`MultiHeadAttention`
    (Chapter 7's compute column for the two-phase models; hand-crafted extraction is not counted)."""

    extra = []

    def lstm_hook(mod, inputs, output):
        data = inputs[0]
        steps = data.data.shape[0] if hasattr(data, "batch_sizes") else data.shape[0] * data.shape[1]
        extra.append(_lstm_macs(mod, steps))

    def attn_hook(mod, inputs, output):
        q, k = inputs[0], inputs[1]
        extra.append(2 * q.shape[0] * q.shape[1] * k.shape[1] * mod.dim)

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.LSTM):
            handles.append(mod.register_forward_hook(lstm_hook))
        elif isinstance(mod, MultiHeadAttention):
            handles.append(mod.register_forward_hook(attn_hook))
    was_training = model.training
    model.eval()
    total, n = 0, 0
    try:
        with flops.MacCounter(model) as mc:
            for item in items:
                model(to_device(collate([item]), device))
                n += 1
        total = mc.total + sum(extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("model_macs: parameter 'items' yielded no utterance")
    return total / n


def emotion_table(rows: Iterable[Mapping], emotions: list[str]):
    """The paper's main-table layout (Dai et al. 2021, Table 2) from metric rows: one row per model,
    per-emotion ``Acc``/``WAcc``/``F1`` columns (in %), their averages, parameters and MACs."""
    out = []
    for r in rows:
        line = {"model": r["model"]}
        for k, emo in enumerate(emotions):
            line[(emo, "Acc")] = 100 * r[f"acc_{k}"]
            line[(emo, "WAcc")] = 100 * r[f"wacc_{k}"]
            line[(emo, "F1")] = 100 * r[f"f1_{k}"]
        line[("Average", "Acc")] = 100 * r["acc"]
        line[("Average", "WAcc")] = 100 * r["wacc"]
        line[("Average", "F1")] = 100 * r["f1"]
        line[("", "#params (M)")] = r["n_params"] / 1e6
        line[("", "MACs (M)")] = r["macs"] / 1e6 if r.get("macs") is not None else float("nan")
        out.append(line)
    df = pd.DataFrame(out).set_index("model")
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    return df
