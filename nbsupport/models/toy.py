"""A toy "find the cue word" task for Chapter 1: why attention pooling beats mean pooling.

Each sequence holds ``seq_len`` random filler tokens; in half of them one *cue* token (one of
``n_cues`` emotion words) is planted at a random position and the label is 1. Mean pooling dilutes
the single cue by ``1/seq_len``; attention pooling (a learned query scoring every position,
Bahdanau et al. 2015) can put its weight on it. Chapter 1 trains both and compares accuracy.
"""
from __future__ import annotations

import torch
from torch import nn

from nbsupport.attention import additive_attention, key_padding_mask

__all__ = ["cue_word_task", "PoolingClassifier", "train_pooling_classifier"]


def cue_word_task(n: int, seq_len: int = 20, vocab: int = 50, n_cues: int = 3, seed: int = 0):
    """Return ``(tokens (n, seq_len) long, lengths (n,), labels (n,) float, cue_pos (n,) long or -1)``.

    Token ids ``1..n_cues`` are cue words, ``0`` is padding, the rest filler. Lengths vary between
    ``seq_len // 2`` and ``seq_len`` so that masks matter.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
    tokens = torch.randint(n_cues + 1, vocab, (n, seq_len), generator=g)
    mask = key_padding_mask(lengths, seq_len)
    tokens = tokens.masked_fill(~mask, 0)
    labels = (torch.rand(n, generator=g) < 0.5).float()
    cue_pos = (torch.rand(n, generator=g) * lengths).long()
    cue_tok = torch.randint(1, n_cues + 1, (n,), generator=g)
    rows = labels.bool()
    tokens[rows, cue_pos[rows]] = cue_tok[rows]
    cue_pos = torch.where(rows, cue_pos, torch.full_like(cue_pos, -1))
    return tokens, lengths, labels, cue_pos


class PoolingClassifier(nn.Module):
    """Embedding -> pooling over positions -> linear logit.

    Word vectors are frozen and unit-length. ``pooling="mean"`` averages the real tokens; ``pooling="attention"`` uses additive attention of a
    learned query over the tokens (Bahdanau et al. 2015, eq. 6), the idea UMONS's glimpse and MESM's
    cross-modal attention build on. The last attention weights are kept in ``self.weights``.
    """

    def __init__(self, vocab: int, dim: int = 16, pooling: str = "attention"):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        # frozen unit-length word vectors, like pretrained GloVe vectors: a classifier cannot simply
        # blow up the cue words' norm, so pooling has to find them
        vectors = torch.nn.functional.normalize(torch.randn(vocab, dim), dim=-1)
        vectors[0] = 0
        self.embed = nn.Embedding.from_pretrained(vectors, freeze=True, padding_idx=0)
        self.query = nn.Parameter(torch.randn(dim) * 0.1)
        self.w_key = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)
        self.weights = None

    def forward(self, tokens, lengths):
        x = self.embed(tokens)  # (B, T, dim)
        mask = key_padding_mask(lengths, tokens.shape[1])
        if self.pooling == "mean":
            pooled = (x * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1)
        else:
            query = self.query.expand(x.shape[0], -1)  # (B, dim)
            pooled, self.weights = additive_attention(query, x, x, mask, w_key=self.w_key)
        return self.out(pooled).squeeze(-1)


def train_pooling_classifier(pooling: str, data, test, *, epochs: int = 30, dim: int = 16, lr: float = 0.03,
                             seed: int = 0, vocab: int = 50):
    """Train a :class:`PoolingClassifier` full-batch with Adam and return ``(model, test_accuracy, losses)``.

    A dozen lines of plain PyTorch: the book's shared trainer (``nbsupport.train``, Chapter 3) is for
    the emotion models; this toy needs none of its machinery.
    """
    torch.manual_seed(seed)
    model = PoolingClassifier(vocab, dim, pooling)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tokens, lengths, labels, _ = data
    losses = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(tokens, lengths), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        t_tokens, t_lengths, t_labels, _ = test
        accuracy = ((model(t_tokens, t_lengths) > 0).float() == t_labels).float().mean().item()
    return model, accuracy, losses
