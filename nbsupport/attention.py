"""Attention building blocks (Chapter 1), reused by UMONS (Chapters 3-4) and MESM (Chapters 5-6).

Conventions: masks are boolean with **True = may attend**, the convention of
``torch.nn.functional.scaled_dot_product_attention``. A key mask of shape ``(batch, n_keys)`` is
broadcast over queries; a full mask of shape ``(batch, n_queries, n_keys)`` is used as given.

A query row whose keys are *all* masked has no well-defined softmax. Here such a row gets all-zero
weights and therefore a zero output vector (PyTorch's fused kernel returns NaN there); this keeps
padded queries from poisoning gradients.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "masked_softmax", "additive_attention", "site_scores", "scaled_dot_product_attention", "AdditiveAttention",
    "MultiHeadAttention", "PositionwiseFeedForward", "TransformerEncoderBlock", "key_padding_mask",
    "ReferenceLayerNorm", "layer_norm", "LAYERNORM_KINDS", "ALL_MASKED",
]

#: LayerNorm variants: PyTorch's (biased variance, eps inside the square root) and the one of the
#: UMONS reference code (unbiased std, eps added to the std), see :class:`ReferenceLayerNorm`.
LAYERNORM_KINDS = ("torch", "reference")


def key_padding_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean mask (batch, max_len), True on the first ``lengths[b]`` positions (the real tokens)."""
    lengths = torch.as_tensor(lengths)
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _expand_mask(mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a key mask (B, K) or a full mask (B, Q, K) / (B, H, Q, K) to the scores' shape."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if mask.dim() == 2 and scores.dim() >= 3:  # (B, K) -> (B, 1.., K)
        mask = mask.view(mask.shape[0], *([1] * (scores.dim() - 2)), mask.shape[1])
    while mask.dim() < scores.dim():  # (B, Q, K) -> (B, 1, Q, K) for heads
        mask = mask.unsqueeze(1)
    return mask


#: What a query row whose keys are all masked gets: zero weights (the book) or uniform weights over
#: every key (the UMONS reference code, which fills masked scores with -1e9 before the softmax).
ALL_MASKED = ("zero", "uniform")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None,
                   all_masked: str = "zero") -> torch.Tensor:
    """Softmax over the last axis that gives masked keys exactly zero weight.

    Rows whose keys are all masked return zeros (not NaN). Bahdanau et al. 2015, eq. 6; Vaswani et
    al. 2017, eq. 1. ``all_masked="uniform"`` is the UMONS reference code's
    ``masked_fill(mask, -1e9)``: the same weights wherever a row has a real key, and
    ``1 / n_keys`` on every key of a row that has none (Chapters 3-4).
    """
    if all_masked not in ALL_MASKED:
        raise ValueError(f"masked_softmax: parameter 'all_masked' must be one of {ALL_MASKED}, "
                         f"got {all_masked!r}")
    mask = _expand_mask(mask, scores)
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if all_masked == "uniform":  # the reference's fill: exp(-1e9 - max) is exactly 0 in float32
        return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    any_key = mask.any(dim=-1, keepdim=True)
    scores = torch.where(any_key, scores, torch.zeros_like(scores))  # avoid softmax of all -inf
    weights = torch.softmax(scores, dim=-1)
    return torch.where(mask & any_key, weights, torch.zeros_like(weights))


def scaled_dot_product_attention(query, keys, values, mask=None):
    """Scaled dot-product attention ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017, eq. 1).

    query (..., Q, d), keys (..., K, d), values (..., K, d_v); mask True = may attend.
    Returns ``(output (..., Q, d_v), weights (..., Q, K))``.
    """
    scores = query @ keys.transpose(-2, -1) / math.sqrt(query.shape[-1])  # (..., Q, K)
    weights = masked_softmax(scores, mask)
    return weights @ values, weights


def additive_attention(query, keys, values, mask=None, *, w_query=None, w_key=None, v=None):
    """Additive (Bahdanau) attention ``score = v^T tanh(W_q q + W_k k)`` (Bahdanau et al. 2015,
    eq. 6).

    query (B, Q, d_q) or (B, d_q); keys (B, K, d_k); values (B, K, d_v). Without projection
    matrices the query and keys must share a size and the score is ``sum(tanh(q + k))`` (the
    parameter-free form used to explain the idea in Chapter 1); :class:`AdditiveAttention` holds
    learned ``W_q, W_k, v`` (MESM's cross-modal attention, Chapter 6).
    Returns ``(output, weights)`` with the query axis dropped when ``query`` had none.
    """
    squeeze = query.dim() == keys.dim() - 1
    if squeeze:
        query = query.unsqueeze(-2)
    q = query if w_query is None else w_query(query)
    k = keys if w_key is None else w_key(keys)
    hidden = torch.tanh(q.unsqueeze(-2) + k.unsqueeze(-3))  # (B, Q, K, h)
    scores = hidden.sum(-1) if v is None else v(hidden).squeeze(-1)  # (B, Q, K)
    weights = masked_softmax(scores, mask)
    out = weights @ values
    if squeeze:
        return out.squeeze(-2), weights.squeeze(-2)
    return out, weights


class ReferenceLayerNorm(nn.Module):
    """LayerNorm as the UMONS reference code writes it (Delbrouck et al. 2020; Chapters 3-4):

    ``weight * (x - mean) / (std + eps) + bias`` with the *unbiased* standard deviation over the last
    axis and ``eps`` (1e-6) added to the std, where :class:`torch.nn.LayerNorm` divides by
    ``sqrt(biased var + eps)``. Same parameters (``weight``, ``bias``), so the two swap freely; the
    outputs differ by a factor ``sqrt((n-1)/n)`` (plus the eps terms). Written by hand because no
    library layer has this form.
    """

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased (n - 1)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def layer_norm(size: int, kind: str = "torch") -> nn.Module:
    """A LayerNorm of ``kind`` (:data:`LAYERNORM_KINDS`): ``"torch"`` = :class:`torch.nn.LayerNorm`
    (the book's default), ``"reference"`` = :class:`ReferenceLayerNorm` (UMONS's code; Chapters 3-4)."""
    if kind == "torch":
        return nn.LayerNorm(size)
    if kind == "reference":
        return ReferenceLayerNorm(size)
    raise ValueError(f"layer_norm: parameter 'kind' must be one of {', '.join(LAYERNORM_KINDS)}, "
                     f"got {kind!r}")


class AdditiveAttention(nn.Module):
    """Learned additive attention (Bahdanau et al. 2015): ``v^T tanh(W_q q + W_k k) (+ b)``; used
    for MESM's text-to-image/spectrogram cross-modal attention (Dai et al. 2021, Sec. 3.2).

    ``score_bias=True`` adds the scalar bias ``b`` of the MESM reference code's scoring layer (it
    shifts every score of a softmax equally, so it changes the parameter count, never a weight).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden: int, score_bias: bool = False):
        super().__init__()
        self.w_query = nn.Linear(query_dim, hidden, bias=False)
        self.w_key = nn.Linear(key_dim, hidden, bias=True)
        self.v = nn.Linear(hidden, 1, bias=score_bias)

    def forward(self, query, keys, values=None, mask=None, *, frame=None):
        """query (B, d_q) or (B, Q, d_q); keys (B, K, d_k) -> (output, weights).

        With ``frame`` (M,) long: ``keys`` (M, d_k) are the packed sites of B frames, site m
        belonging to frame ``frame[m]``, and ``query`` (B, d_q) holds one query per frame; returns
        the unnormalised scores (M,) ``v^T tanh(W_q q_frame + W_k k + b_k) (+ b)`` (MESM's sites
        before the per-frame softmax and top-p, Chapter 6), computed by :func:`site_scores`."""
        if frame is not None:
            scores = site_scores(keys, self.w_query(query) + self.w_key.bias, self.w_key.weight,
                                 self.v.weight[0], frame)
            return scores if self.v.bias is None else scores + self.v.bias
        return additive_attention(query, keys, keys if values is None else values, mask,
                                  w_query=self.w_query, w_key=self.w_key, v=self.v)


def _tanh_(t: torch.Tensor) -> torch.Tensor:
    # tanh in place: NumPy's SIMD kernel on CPU (float32: ~10x PyTorch's there), PyTorch's elsewhere
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        a = t.numpy()
        np.tanh(a, out=a)
        return t
    return t.tanh_()


#: Sites per chunk of :func:`site_scores`: a (1024, hidden) buffer is small enough for the heap to reuse.
_SITE_CHUNK = 1024


def _chunks(m: int):
    return ((s, min(m, s + _SITE_CHUNK)) for s in range(0, m, _SITE_CHUNK))


def _hidden(keys, q_frames, w_key, frame, s, e):
    # tanh(q_frames[frame] + W_k k) of sites s..e, in a fresh (e - s, hidden) buffer
    h = q_frames.index_select(0, frame[s:e])
    return _tanh_(h.addmm_(keys[s:e], w_key.t()))


class _SiteScores(torch.autograd.Function):
    """Additive scores of packed sites, chunk by chunk: the (M, hidden) activations are never held
    whole; the backward pass recomputes each chunk's (cheaper than storing it: fresh large tensors
    cost page faults on CPU)."""

    @staticmethod
    def forward(ctx, keys, q_frames, w_key, v, frame):
        out = keys.new_empty(keys.shape[0])
        for s, e in _chunks(keys.shape[0]):
            torch.mv(_hidden(keys, q_frames, w_key, frame, s, e), v, out=out[s:e])
        ctx.save_for_backward(keys, q_frames, w_key, v, frame)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        keys, q_frames, w_key, v, frame = ctx.saved_tensors
        grad_keys_t = keys.new_empty(keys.shape[1], keys.shape[0])  # (d_k, M): mm writes it fastest
        grad_w_t = w_key.new_zeros(w_key.shape[1], w_key.shape[0])  # (d_k, hidden)
        grad_v, grad_q = torch.zeros_like(v), torch.zeros_like(q_frames)
        for s, e in _chunks(keys.shape[0]):
            h, g = _hidden(keys, q_frames, w_key, frame, s, e), grad[s:e]
            grad_v.addmv_(h.t(), g)
            gh = h.square_().neg_().add_(1).mul_(v).mul_(g[:, None])  # g * v * (1 - tanh^2)
            torch.mm(w_key.t(), gh.t(), out=grad_keys_t[:, s:e])
            grad_w_t.addmm_(keys[s:e].t(), gh)
            grad_q.index_add_(0, frame[s:e], gh)
        return grad_keys_t.t(), grad_q, grad_w_t.t(), grad_v, None


def site_scores(keys: torch.Tensor, q_frames: torch.Tensor, w_key: torch.Tensor, v: torch.Tensor,
                frame: torch.Tensor) -> torch.Tensor:
    """Additive attention scores ``v^T tanh(q_frames[frame] + W_k k)`` of packed sites (Bahdanau et
    al. 2015, eq. 6; MESM's cross-modal attention, Dai et al. 2021, Sec. 3.2; Chapter 6).

    keys (M, d_k); q_frames (N, hidden) the projected query plus key bias of each frame; w_key
    (hidden, d_k); v (hidden,); frame (M,) long, the frame of each site. Returns (M,). The same
    numbers as the composed layers (tested against :func:`additive_attention`), computed in chunks
    of sites whose activations the backward pass recomputes instead of storing: on CPU, where fresh
    large tensors cost page faults and PyTorch's tanh is slow, this is several times faster."""
    if keys.dim() != 2 or frame.shape != keys.shape[:1]:
        raise ValueError(f"site_scores: 'keys' must be (M, d_k) and 'frame' (M,), got "
                         f"{tuple(keys.shape)} and {tuple(frame.shape)}")
    return _SiteScores.apply(keys, q_frames, w_key, v, frame.long())


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, Sec. 3.2.2): ``h`` scaled dot-product attentions
    over learned projections, concatenated and projected. Called as ``mha(query, key, value,
    mask=None)``; stores the last attention weights (batch, heads, Q, K) in ``self.weights``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, all_masked: str = "zero"):
        super().__init__()
        self.all_masked = all_masked  # see masked_softmax
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim={dim} must be divisible by heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.weights: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, heads, T, head_dim)
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, mask=None):
        q = self._split(self.q_proj(query))  # (B, heads, Tq, d/heads)
        k, v = self._split(self.k_proj(key)), self._split(self.v_proj(value))  # (B, heads, Tk, ...)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, heads, Q, K)
        weights = masked_softmax(scores, mask, self.all_masked)
        self.weights = weights.detach()
        out = self.dropout(weights) @ v  # (B, heads, Q, head_dim)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.dim)
        return self.out_proj(out)


class PositionwiseFeedForward(nn.Module):
    """The transformer MLP ``W_2 ReLU(W_1 x)`` (Vaswani et al. 2017, eq. 2)."""

    def __init__(self, dim: int, ff_size: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, ff_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_size, dim))

    def forward(self, x):
        return self.net(x)


class TransformerEncoderBlock(nn.Module):
    """Post-LN encoder block ``x = LayerNorm(x + MHA(x)); x = LayerNorm(x + MLP(x))`` as in UMONS
    (Delbrouck et al. 2020, Sec. 2) and the original transformer (Vaswani et al. 2017, Sec. 3.1).
    ``norm``: the LayerNorm kind (:func:`layer_norm`; ``"reference"`` = UMONS's code);
    ``all_masked``: see :func:`masked_softmax`."""

    def __init__(self, dim: int, heads: int, ff_size: int | None = None, dropout: float = 0.0,
                 norm: str = "torch", all_masked: str = "zero"):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, dropout, all_masked)
        self.norm1 = layer_norm(dim, norm)
        self.ff = PositionwiseFeedForward(dim, ff_size or 4 * dim, dropout)
        self.norm2 = layer_norm(dim, norm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        """x (B, T, dim); mask (B, T) True on real positions."""
        x = self.norm1(x + self.dropout(self.attention(x, x, x, mask)))
        return self.norm2(x + self.dropout(self.ff(x)))
