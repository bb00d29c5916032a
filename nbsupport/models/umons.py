"""UMONS transformers (Delbrouck et al., Challenge-HML @ ACL 2020): Chapters 3 and 4.

* :class:`GlimpseLayer` -- attention flattening: an MLP scores every position into ``G`` glimpses, a
  masked softmax over positions turns each score column into weights, and the ``G`` weighted sums
  are either kept as a sequence of ``G`` vectors (the per-block glimpse) or concatenated and
  projected back to ``hidden_size`` (the final glimpse of size 1). The idea comes from MCAN's
  "attentional reduction" (Yu et al. 2019) that UMONS reuses.
* :class:`CoAttentionBlock` -- modular co-attention: a non-linguistic sequence ``y`` attends to itself
  and then to the language sequence ``x``: ``y = LayerNorm(y + MHA(y, x, x))``, then the MLP.
* :class:`UmonsTransformer` -- any combination of L, A, V. One modality: a plain stack of post-LN
  self-attention + MLP blocks (the monomodal encoder, Chapter 3). Several: one stack per modality,
  A and V attend to L in every layer, a glimpse layer closes every block but the last (Chapter 4).
  Classification (both): a glimpse of size 1 per modality, the vectors summed, LayerNorm, Linear.

Inputs are the UMONS batch dict of ``nbsupport.data.collate_umons``: ``text`` (B, Lt, Dw) word
vectors -> LSTM; ``audio`` (B, La, 80) mel frames and ``video`` (B, Lv, Dv) frame features -> linear
adapters; ``*_mask`` (B, L) True on real positions. Every modality is cut or padded to ``seq_len``
positions (the paper's 60): the per-block glimpse keeps ``seq_len`` glimpse vectors and adds them
back to the sequence, so the sequence length is fixed by the configuration. Padded positions are
zeroed after the adapters and masked in every attention, so they never change an output.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from nbsupport.attention import (ALL_MASKED, LAYERNORM_KINDS, MultiHeadAttention, PositionwiseFeedForward,
                                 TransformerEncoderBlock, layer_norm, masked_softmax)
from nbsupport.base import ParameterError, check_modalities, count_parameters
from nbsupport.data.features import split_words

__all__ = ["UmonsConfig", "BOOK_CONFIG_AT_PAPER_SIZES", "REFERENCE_SWITCHES", "REFERENCE_BUGS",
           "paper_parameter_count",
           "GlimpseLayer", "CoAttentionBlock", "ModalityAdapter",
           "UmonsTransformer", "MODALITY_KEYS", "input_dims_from", "masked_feature_moments", "utterance_words"]

#: Modality letter -> batch field (its mask is ``<field>_mask``).
MODALITY_KEYS = {"L": "text", "A": "audio", "V": "video"}


@dataclass(frozen=True)
class UmonsConfig:
    """Hyper-parameters with the paper's names (Delbrouck et al. 2020, Sec. 4): defaults = paper sizes.

    Two regularisers that are not in the paper, both off by default (Chapter 4):
    ``input_dropout`` -- feature dropout on each modality's (standardised) input features in training;
    ``aux_weight`` -- weight of the per-modality auxiliary heads (deep supervision: every modality's
    final glimpse vector must predict the labels alone, through the shared LayerNorm + classifier),
    see :meth:`UmonsTransformer.auxiliary_loss`.

    Fidelity switches (Chapters 3-4, "Differences from the authors' code"). The defaults are the book's
    model; :meth:`paper` sets every one to what the authors' code (Model_LA / Model_LAV) does:

    ``block_residual`` -- wrap each whole block in one more residual, ``x = SA(x) + x`` and
    ``y = SGA(y, x) + y``, around the sublayer residuals (reference: True; book: False).
    ``lang_from_block_input`` -- audio/video attend to the language sequence that *entered* the block
    (reference: True) instead of the language output of the same layer (book: False).
    ``glimpse_hidden`` -- hidden size of every glimpse MLP: ``"hidden"`` (book) or ``"ff"`` (reference).
    ``final_glimpse_mult`` -- the final glimpse projects to ``mult * hidden_size``, and the final
    LayerNorm and classifier work on that size (reference: 2; book: 1).
    ``layernorm`` -- ``"torch"`` (book) or ``"reference"`` (unbiased std, eps added to the std).
    ``mask_every_layer`` -- padding masks in every attention and glimpse (book: True) or, as the
    reference does, only in the first layer with an unmasked final glimpse (False).
    ``zero_padding`` -- padded positions are set to 0 before and after the input adapters (book:
    True). False zeroes nothing: the adapters read the padded inputs as the batch holds them
    (standardised; ``collate_umons`` pads with zeros, as the reference's data) and their outputs at
    padded positions are kept, as the reference code does.

    Bugs of the reference code, each a switch that is off (book behaviour) by default and on in
    ``UmonsConfig.paper(reference_bugs=True)`` (:data:`REFERENCE_BUGS`):

    ``video_glimpse_mask`` -- ``"video"`` (book) or ``"audio"``: Model_LAV masks the video stream's
    block glimpse with the *audio* mask (``self.att_vid(z, y_mask)``), so when the audio and video
    lengths differ the video glimpse weighs the wrong positions (needs A and V).
    ``pad_token`` -- ``"zero"`` (book: the language LSTM reads zero vectors at padded positions) or
    ``"learned"``: the reference's LSTM reads the embedding row of token id 0 there, a trained vector
    (set from the 'UNK' word vector by an off-by-one in its tokenizer); here a learned vector
    ``adapters["L"].pad_vector`` (input size, initialised N(0, 1) in standardised units).
    ``all_masked`` -- ``"zero"`` (book) or ``"uniform"``: an attention row with no real key (an item
    whose audio is all padding) gets uniform weights from the reference's ``-1e9`` fill
    (:func:`nbsupport.attention.masked_softmax`).
    """

    hidden_size: int = 512
    ff_size: int = 1024
    layers: int = 4
    heads: int = 4
    dropout: float = 0.1
    seq_len: int = 60
    aux_weight: float = 0.0
    input_dropout: float = 0.0
    block_residual: bool = False
    lang_from_block_input: bool = False
    glimpse_hidden: str = "hidden"
    final_glimpse_mult: int = 1
    layernorm: str = "torch"
    mask_every_layer: bool = True
    zero_padding: bool = True
    video_glimpse_mask: str = "video"
    pad_token: str = "zero"
    all_masked: str = "zero"

    def __post_init__(self):
        for name in ("hidden_size", "ff_size", "layers", "heads", "seq_len", "final_glimpse_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UmonsConfig: parameter '{name}' must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.heads:
            raise ValueError(f"UmonsConfig: parameter 'hidden_size'={self.hidden_size} must be divisible by "
                             f"'heads'={self.heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"UmonsConfig: parameter 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.input_dropout) < 1.0:
            raise ValueError(f"UmonsConfig: parameter 'input_dropout' must be in [0, 1), got {self.input_dropout!r}")
        if not float(self.aux_weight) >= 0.0 or not math.isfinite(float(self.aux_weight)):
            raise ValueError(f"UmonsConfig: parameter 'aux_weight' must be a finite number >= 0, "
                             f"got {self.aux_weight!r}")
        for name in ("block_residual", "lang_from_block_input", "mask_every_layer", "zero_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UmonsConfig: parameter '{name}' must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.glimpse_hidden not in ("hidden", "ff"):
            raise ValueError(f"UmonsConfig: parameter 'glimpse_hidden' must be 'hidden' or 'ff', "
                             f"got {self.glimpse_hidden!r}")
        for name, allowed in (("video_glimpse_mask", ("video", "audio")), ("pad_token", ("zero", "learned")),
                              ("all_masked", ALL_MASKED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"UmonsConfig: parameter '{name}' must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.layernorm not in LAYERNORM_KINDS:
            raise ValueError(f"UmonsConfig: parameter 'layernorm' must be one of "
                             f"{', '.join(LAYERNORM_KINDS)}, got {self.layernorm!r}")

    @classmethod
    def paper(cls, reference_bugs: bool = False, **overrides) -> "UmonsConfig":
        """The authors' network (jbdel/MOSEI_UMONS, Model_LA / Model_LAV, run as its README says:
        hidden 512, ff 1024, 4 layers, 4 heads, dropout 0.1, 60 positions) with every fidelity switch
        at the reference behaviour (Chapters 3-4). ``reference_bugs=True`` also switches on the
        reference code's bugs (:data:`REFERENCE_BUGS`): the network exactly as its code runs.
        ``overrides`` change single fields (e.g. sizes)."""
        bugs = REFERENCE_BUGS if reference_bugs else {}
        return cls(**{**asdict(BOOK_CONFIG_AT_PAPER_SIZES), **REFERENCE_SWITCHES, **bugs, **overrides})


#: The *book's* model at the paper's sizes (hidden 512, ff 1024, 4 layers, 4 heads, dropout 0.1, 60
#: positions) with the book's switches; the authors' network is :meth:`UmonsConfig.paper`.
BOOK_CONFIG_AT_PAPER_SIZES = UmonsConfig(512, 1024, 4, 4, 0.1, 60)
#: The fidelity switches at the reference code's behaviour (see :class:`UmonsConfig`).
REFERENCE_SWITCHES = dict(block_residual=True, lang_from_block_input=True, glimpse_hidden="ff",
                          final_glimpse_mult=2, layernorm="reference", mask_every_layer=False,
                          zero_padding=False)
#: The reference code's bugs (see :class:`UmonsConfig`), on in ``UmonsConfig.paper(reference_bugs=True)``.
REFERENCE_BUGS = dict(video_glimpse_mask="audio", pad_token="learned", all_masked="uniform")


class GlimpseLayer(nn.Module):
    """Attention flattening with ``glimpses`` glimpses (UMONS Sec. 3; MCAN's attentional reduction).

    ``scores = MLP(x)`` (B, T, G); ``w = softmax_T(scores)`` with padded positions at weight 0;
    ``g_k = sum_t w[t, k] x_t``. ``merge=True``: ``Linear(concat_k g_k)`` -> (B, out_size or
    hidden); ``merge=False``: the glimpses as a sequence (B, G, hidden). The last weights (B, G, T)
    are kept in ``self.weights``. ``all_masked``: see :func:`nbsupport.attention.masked_softmax`.
    """

    def __init__(self, hidden_size: int, glimpses: int = 1, mlp_size: int | None = None,
                 dropout: float = 0.0, merge: bool = True, out_size: int | None = None,
                 all_masked: str = "zero"):
        super().__init__()
        self.glimpses, self.merge, self.all_masked = glimpses, merge, all_masked
        mlp_size = mlp_size or hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_size, glimpses))
        # merged output size: hidden (book) or 2 * hidden (UMONS reference's final glimpse)
        self.proj = nn.Linear(glimpses * hidden_size, out_size or hidden_size) if merge else None
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.mlp(x).transpose(1, 2)  # (B, G, T)
        weights = masked_softmax(scores, mask, self.all_masked)  # mask (B, T): over glimpses too
        self.weights = weights.detach()
        glimpses = weights @ x  # (B, G, hidden)
        if not self.merge:
            return glimpses
        return self.proj(glimpses.flatten(1))  # (B, G*hidden) -> (B, hidden)


class CoAttentionBlock(nn.Module):
    """Modular co-attention for a non-linguistic modality (UMONS Sec. 3, after MCAN's SGA unit):

    ``y = LN(y + SA(y)); y = LN(y + MHA(y, x, x)); y = LN(y + MLP(y))`` with ``x`` the language;
    ``norm`` is the LayerNorm kind (:func:`nbsupport.attention.layer_norm`).
    ``self.cross.weights`` (B, heads, Ty, Tx) holds the last co-attention map (frames -> words).
    """

    def __init__(self, hidden_size: int, heads: int, ff_size: int, dropout: float = 0.0,
                 norm: str = "torch", all_masked: str = "zero"):
        super().__init__()
        self.self_att = MultiHeadAttention(hidden_size, heads, dropout, all_masked)
        self.cross = MultiHeadAttention(hidden_size, heads, dropout, all_masked)
        self.ff = PositionwiseFeedForward(hidden_size, ff_size, dropout)
        self.norms = nn.ModuleList([layer_norm(hidden_size, norm) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, y_mask, x, x_mask):
        """y (B, Ty, hidden), x (B, Tx, hidden); masks (B, T), True = real -> (B, Ty, hidden)."""
        y = self.norms[0](y + self.dropout(self.self_att(y, y, y, y_mask)))
        y = self.norms[1](y + self.dropout(self.cross(y, x, x, x_mask)))
        return self.norms[2](y + self.dropout(self.ff(y)))


class ModalityAdapter(nn.Module):
    """Input adapter: word vectors -> LSTM (language), frame features -> Linear (audio, video); UMONS Sec. 3.

    Output (B, seq_len, hidden) with padded positions set to 0 (unless ``zero_padding=False``, which
    zeroes neither the padded inputs nor the outputs), and the mask (B, seq_len). ``pad_token="learned"``
    (language only): padded positions of the LSTM's input hold the learned ``pad_vector``. The LSTM
    runs left to right, so padding after an utterance cannot change its real positions.
    ``input_dropout``: feature dropout on the standardised inputs in training (identity in eval).
    """

    def __init__(self, modality: str, in_dim: int, hidden_size: int, seq_len: int, input_dropout: float = 0.0,
                 zero_padding: bool = True, pad_token: str = "zero"):
        super().__init__()
        self.zero_padding = zero_padding
        # the reference's language LSTM reads a trained pad-token embedding at padded positions
        self.pad_vector = nn.Parameter(torch.randn(in_dim)) if pad_token == "learned" and modality == "L" else None
        self.input_dropout = nn.Dropout(input_dropout)
        self.modality, self.seq_len = modality, seq_len
        self.net = nn.LSTM(in_dim, hidden_size, batch_first=True) if modality == "L" else nn.Linear(in_dim, hidden_size)
        self.in_dim = in_dim
        # per-feature standardisation (training-set mean/std, see fit_input_normalisation); identity by default
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor):
        field = MODALITY_KEYS[self.modality]
        if feats.dim() != 3 or feats.shape[-1] != self.in_dim:
            raise ValueError(f"UmonsTransformer: batch field {field!r} must have shape (batch, length, "
                             f"{self.in_dim}), got {tuple(feats.shape)}")
        feats, mask = feats[:, : self.seq_len], mask[:, : self.seq_len].to(torch.bool)  # cut to seq_len
        pad = self.seq_len - feats.shape[1]
        if pad:
            feats = F.pad(feats, (0, 0, 0, pad))  # (B, seq_len, in_dim)
            mask = F.pad(mask, (0, pad), value=False)
        feats = (feats.float() - self.in_mean) / self.in_std
        if self.zero_padding:  # padding never enters; dropout keeps zeros 0
            feats = feats * mask.unsqueeze(-1)
        if self.pad_vector is not None:  # reference: the pad token's embedding at every padded position
            feats = torch.where(mask.unsqueeze(-1), feats, self.pad_vector.to(feats.dtype))
        feats = self.input_dropout(feats)
        h = self.net(feats)[0] if self.modality == "L" else self.net(feats)  # (B, seq_len, hidden)
        # zero_padding=False (UMONS reference): padded positions keep the adapter's output of zero features
        return (h * mask.unsqueeze(-1) if self.zero_padding else h), mask


class UmonsTransformer(nn.Module):
    """UMONS monomodal encoder (one modality) or multimodal joint-encoding transformer (L + A and/or V).

    ``model(batch) -> logits`` (B, n_outputs). ``modalities`` is a string over L, A, V; with more than
    one it must contain L, which the others attend to. ``input_dims`` maps letters to feature sizes
    (defaults: text 300, audio 80, video 512 as in the paper). After every forward,
    :meth:`attention_maps` returns the glimpse weights per modality and co-attention maps per layer.
    """

    #: :data:`nbsupport.train.PROTOCOLS` entry of the authors' training code (``fit(protocol="paper")``).
    paper_protocol = "umons"

    def __init__(self, modalities: str = "LAV", n_outputs: int = 6, config: UmonsConfig | None = None,
                 input_dims: Mapping[str, int] | None = None, **config_kw):
        super().__init__()
        if config is None:
            config = UmonsConfig(**config_kw)
        elif config_kw:
            raise ValueError("UmonsTransformer: give either 'config' or keyword hyper-parameters, not both")
        try:  # distinct letters from L, A, V, put in "LAV" order (the notebooks' own rule)
            modalities = check_modalities("modalities", modalities)
        except ParameterError as err:
            raise ValueError(f"UmonsTransformer: {err}") from None
        if len(modalities) > 1 and "L" not in modalities:
            raise ValueError(f"UmonsTransformer: multimodal 'modalities' must include 'L' (A and V attend to "
                             f"language), got {modalities!r}")
        dims = {"L": 300, "A": 80, "V": 512, **dict(input_dims or {})}
        self.config, self.modalities, self.n_outputs = config, modalities, n_outputs
        c = config
        ln = c.layernorm
        glimpse_mlp = c.ff_size if c.glimpse_hidden == "ff" else c.hidden_size
        h, ff, heads, p = c.hidden_size, c.ff_size, c.heads, c.dropout
        self.adapters = nn.ModuleDict({m: ModalityAdapter(m, dims[m], h, c.seq_len, float(c.input_dropout),
                                                          c.zero_padding, c.pad_token) for m in modalities})
        am = c.all_masked
        self.multimodal = len(modalities) > 1
        if not self.multimodal:
            self.blocks = nn.ModuleList([TransformerEncoderBlock(h, heads, ff, p, ln, am)
                                         for _ in range(c.layers)])
        else:
            self.lang_blocks = nn.ModuleList([TransformerEncoderBlock(h, heads, ff, p, ln, am)
                                              for _ in range(c.layers)])
            self.co_blocks = nn.ModuleDict({m: nn.ModuleList([CoAttentionBlock(h, heads, ff, p, ln, am)
                                                              for _ in range(c.layers)])
                                            for m in modalities if m != "L"})
            # a glimpse layer closes every block but the last: seq_len glimpses added back to the sequence
            self.block_glimpses = nn.ModuleDict({m: nn.ModuleList([GlimpseLayer(h, c.seq_len, glimpse_mlp,
                                                                                dropout=p, merge=False,
                                                                                all_masked=am)
                                                                   for _ in range(c.layers - 1)])
                                                 for m in modalities})
            self.block_norms = nn.ModuleDict({m: nn.ModuleList([layer_norm(h, ln) for _ in range(c.layers - 1)])
                                              for m in modalities})
        out = c.final_glimpse_mult * c.hidden_size  # 2 * hidden in the reference code
        self.final_glimpse = nn.ModuleDict({m: GlimpseLayer(c.hidden_size, 1, glimpse_mlp, dropout=c.dropout,
                                                            merge=True, out_size=out, all_masked=am)
                                            for m in modalities})
        self.norm = layer_norm(out, ln)
        self.classifier = nn.Linear(out, n_outputs)
        self.dropout = nn.Dropout(c.dropout)
        self._glimpse_vectors: dict | None = None  # final glimpse per modality of the last forward

    def _inputs(self, batch: Mapping[str, torch.Tensor]):
        seqs, masks = {}, {}
        for m in self.modalities:
            field = MODALITY_KEYS[m]
            if field not in batch:
                raise KeyError(f"UmonsTransformer: batch has no field {field!r} needed by modality {m!r}; "
                               f"fields: {sorted(batch)}")
            feats = batch[field]
            mask = batch.get(f"{field}_mask")
            if mask is None:
                mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            seqs[m], masks[m] = self.adapters[m](feats, mask)
        return seqs, masks

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch: UMONS batch dict -> logits (B, n_outputs). The switches of :class:`UmonsConfig`
        choose between the book's wiring and the reference code's (block residual, language of the
        block input, masks in the first layer only)."""
        c = self.config
        z, masks = self._inputs(batch)  # each (B, seq_len, hidden)
        for i in range(c.layers):
            # the reference code masks the first layer only
            mk = masks if c.mask_every_layer or i == 0 else dict.fromkeys(masks)
            if not self.multimodal:
                m = self.modalities
                h = self.blocks[i](z[m], mk[m])
                z[m] = h + z[m] if c.block_residual else h
                continue
            lang_in = z["L"]  # the language sequence entering block i
            h = self.lang_blocks[i](lang_in, mk["L"])
            z["L"] = h + lang_in if c.block_residual else h
            lang = lang_in if c.lang_from_block_input else z["L"]
            for m in self.co_blocks:
                h = self.co_blocks[m][i](z[m], mk[m], lang, mk["L"])
                z[m] = h + z[m] if c.block_residual else h
            if i < c.layers - 1:
                for m in self.modalities:  # z = LN(z + glimpses(z)), (B, seq_len, hidden)
                    # reference bug (Model_LAV): the video glimpse is masked with the audio mask
                    wrong = m == "V" and c.video_glimpse_mask == "audio" and "A" in mk
                    g = self.block_glimpses[m][i](z[m], mk["A"] if wrong else mk[m])
                    z[m] = self.block_norms[m][i](z[m] + self.dropout(g))
        # the reference's final glimpse has no mask
        final_masks = masks if c.mask_every_layer else dict.fromkeys(masks)
        # each (B, mult * hidden)
        vectors = {m: self.final_glimpse[m](z[m], final_masks[m]) for m in self.modalities}
        self._glimpse_vectors = vectors if self.training else None  # kept for auxiliary_loss only
        fused = sum(vectors.values())  # (B, mult*hidden)
        return self.classifier(self.norm(fused))  # (B, n_outputs)

    def auxiliary_loss(self, batch: Mapping[str, torch.Tensor], criterion) -> torch.Tensor | None:
        """Per-modality auxiliary heads (deep supervision; hook of :func:`nbsupport.train.fit`, Chapter 4).

        ``aux_weight * mean_m criterion(classifier(LN(g^m)))`` over the final glimpse vectors
        ``g^m`` (B, hidden) of the last training forward (the same ``batch``), with the main head's
        LayerNorm and classifier shared by every modality. Each stream must then carry the labels on its
        own, so the joint model cannot lean on the modality it overfits first. ``criterion``: logits
        (B, n_outputs) -> scalar loss with the batch's targets bound. None when ``aux_weight`` is 0, the
        model has one modality, or no training forward preceded the call.
        """
        if not self.config.aux_weight or not self.multimodal or self._glimpse_vectors is None:
            return None
        losses = [criterion(self.classifier(self.norm(g))) for g in self._glimpse_vectors.values()]
        self._glimpse_vectors = None  # one auxiliary loss per forward
        return float(self.config.aux_weight) * torch.stack(losses).mean()

    @torch.no_grad()
    def attention_maps(self) -> dict:
        """Maps of the last forward, for plotting (Chapters 3-4), all on CPU:

        ``glimpse``: {modality: (B, seq_len)} final glimpse weights over tokens / frames;
        ``self_attention``: {modality: [layer -> (B, heads, T, T)]};
        ``coattention``: {"A"/"V": [layer -> (B, heads, T_frames, T_words)]} frames attending to words.
        """
        out = {"glimpse": {m: g.weights[:, 0].cpu() for m, g in self.final_glimpse.items() if g.weights is not None},
               "self_attention": {}, "coattention": {}}
        if not self.multimodal:
            out["self_attention"][self.modalities] = [b.attention.weights.cpu() for b in self.blocks
                                                      if b.attention.weights is not None]
        else:
            out["self_attention"]["L"] = [b.attention.weights.cpu() for b in self.lang_blocks
                                          if b.attention.weights is not None]
            for m, blocks in self.co_blocks.items():
                out["self_attention"][m] = [b.self_att.weights.cpu() for b in blocks if b.self_att.weights is not None]
                out["coattention"][m] = [b.cross.weights.cpu() for b in blocks if b.cross.weights is not None]
        return out

    @torch.no_grad()
    def fit_input_normalisation(self, loader) -> "UmonsTransformer":
        """Set every adapter's per-feature mean/std from the real (unmasked) positions of ``loader``.

        The word vectors, HOG and mel features come at very different scales (per-feature std from
        0.05 to 0.25 on the synthetic corpus); standardising them with training statistics, as
        pre-extracted features usually are, lets one learning rate suit every modality
        (:func:`masked_feature_moments`; std floored at 1e-3). Stored as buffers, so they travel with
        the checkpoint. A batch without ``<field>_mask`` counts every position as real.
        """
        def read(batch, m):
            field = MODALITY_KEYS[m]
            return batch[field], batch.get(f"{field}_mask")

        for m, (mean, std, n) in masked_feature_moments(loader, self.modalities, read).items():
            if n < 2:
                raise ValueError(f"UmonsTransformer.fit_input_normalisation: fewer than 2 real positions of "
                                 f"{MODALITY_KEYS[m]!r} in the loader")
            ad = self.adapters[m]
            ad.in_mean.copy_(mean.float().to(ad.in_mean.device))
            ad.in_std.copy_(std.clamp(min=1e-3).float().to(ad.in_std.device))
        return self

    def describe(self) -> dict:
        """UMONS configuration (Delbrouck et al. 2020, Sec. 4), modalities and trainable parameter count
        (:func:`nbsupport.base.count_parameters`; printed by Chapter 4)."""

        return {"modalities": self.modalities, **asdict(self.config), "n_params": count_parameters(self)}


def paper_parameter_count(modalities: str = "LAV", n_outputs: int = 6,
                          input_dims: Mapping[str, int] | None = None, config: UmonsConfig | None = None) -> int:
    """Trainable parameters of the UMONS paper preset (:meth:`UmonsConfig.paper`, the authors' Model_LA /
    Model_LAV) for ``modalities``, without the word-embedding table (the book feeds word vectors to the
    LSTM). Defaults: GloVe 300-d words, 80 mel bins, 512-d video features, 6 emotions. ``config``: another
    network at these inputs, e.g. :data:`BOOK_CONFIG_AT_PAPER_SIZES` (the book's switches at the paper's
    sizes). Printed by Chapters 3-4, e.g. ``paper_parameter_count("LA")``; pinned by a test that derives
    it from layer sizes."""

    return count_parameters(UmonsTransformer(modalities, n_outputs, config=config or UmonsConfig.paper(),
                                             input_dims=input_dims))


# ------------------------------------------------------------------------------------------------
# Chapter helpers: train one UMONS model and report it with the shared metric names
# ------------------------------------------------------------------------------------------------
def input_dims_from(batch: Mapping[str, torch.Tensor]) -> dict:
    """Feature sizes of a ``collate_umons`` batch, e.g. {"L": Dw, "A": 80, "V": Dv} for UMONS (Chapters 3-4)
    or {"L": 384, "A": 33, "V": 356} for the two-phase baselines (Chapter 7); read from the data."""
    return {m: int(batch[f].shape[-1]) for m, f in MODALITY_KEYS.items() if f in batch}


@torch.no_grad()
def masked_feature_moments(loader: Iterable, modalities: Iterable[str],
                           read: Callable[[Mapping, str], tuple]) -> dict:
    """Per-feature mean and (population) std of each modality over the real positions of ``loader``.

    The training-set standardisation of pre-extracted features used by UMONS (Chapters 3-4) and by the
    two-phase baselines (Chapter 7). ``read(batch, m) -> (x (B, L, D), mask (B, L) or None)``; a None
    mask counts every position. Sums and sums of squares are accumulated in float64 on the CPU, and
    ``std = sqrt(max(E[x^2] - mean^2, 0))``. Returns ``{m: (mean (D,), std (D,), n_real)}`` (float64;
    mean and std are None when ``n_real`` is 0); each caller applies its own std floor and error.
    """
    modalities = list(modalities)
    sums = {m: [0.0, 0.0, 0] for m in modalities}
    for batch in loader:
        for m in modalities:
            x, mask = read(batch, m)
            x = x[mask.to(x.device).bool()] if mask is not None else x.reshape(-1, x.shape[-1])  # (n_real, D)
            x = x.double().cpu()
            sums[m][0] += x.sum(0)
            sums[m][1] += (x * x).sum(0)
            sums[m][2] += x.shape[0]
    out = {}
    for m, (s1, s2, n) in sums.items():
        if n == 0:
            out[m] = (None, None, 0)
            continue
        mean = s1 / n
        out[m] = (mean, (s2 / n - mean * mean).clamp(min=0).sqrt(), n)
    return out


def utterance_words(dataset, uid: str, seq_len: int) -> list[str]:
    """The words of utterance ``uid`` of a ``umons_dataset`` split, in the order UMONS' LSTM reads them
    (at most ``seq_len``): the token labels of the Chapter 3-4 glimpse and co-attention plots."""

    raw = dataset.raw
    return split_words(raw.texts[raw.ids.index(uid)])[:seq_len]
