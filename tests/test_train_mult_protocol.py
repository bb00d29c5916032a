"""MulT's training protocol (Tsai et al. 2019, src/train.py and src/eval_metrics.py) against a loop
written out by hand with PyTorch's own pieces: one output, L1 loss, Adam, gradient clipping,
ReduceLROnPlateau on the validation loss, the epoch with the lowest validation loss kept."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from nbsupport import metrics, train


class _Score(nn.Module):
    modalities = "L"

    def __init__(self, n_out=1):
        super().__init__()
        self.lin = nn.Linear(4, n_out)

    def forward(self, batch):
        return self.lin(batch["x"])


def _batches(seed, n=3, b=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, 4, generator=g)
        s = torch.clamp(x[:, 0] * 2 + 0.3 * torch.randn(b, generator=g), -3, 3)
        s[0] = 0.0  # a zero label: dropped by Acc-2's non-zero convention
        out.append({"x": x, "sentiment": s, "ids": [f"u{len(out)}-{i}" for i in range(b)]})
    return out


def _by_hand(model, train_batches, valid_batches, epochs, lr, factor, patience, clip=1.0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)
    l1 = nn.L1Loss()
    best, best_state = float("inf"), None
    for _ in range(epochs):
        model.train()
        for b in train_batches:
            opt.zero_grad()
            loss = l1(model(b)[:, 0], b["sentiment"])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model(b)[:, 0] for b in valid_batches])
            truth = torch.cat([b["sentiment"] for b in valid_batches])
            val = float(l1(preds, truth))
        sched.step(val)
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, best


def test_mult_protocol_is_the_hand_written_loop():
    from nbsupport.train import PROTOCOLS, TrainProtocol

    train_b, valid_b = _batches(0), _batches(1)
    torch.manual_seed(3)
    ours, ref = _Score(), _Score()
    ref.load_state_dict(ours.state_dict())
    # a short plateau patience and a high rate, so the decay happens inside 8 epochs
    proto = TrainProtocol.named("mult", plateau=(0.1, 1))
    res = train.fit(ours, train_b, valid_b, task="sentiment2", epochs=8, lr=0.3, device="cpu", protocol=proto,
                    progress=False)
    ref, best = _by_hand(ref, train_b, valid_b, 8, 0.3, 0.1, 1)
    for k, v in ref.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k], v, atol=1e-6), k
    assert res.best_score == pytest.approx(best, abs=1e-6) and res.monitor == "loss"
    assert PROTOCOLS["mult"].plateau == (0.1, 20) and PROTOCOLS["mult"].sentiment_head == "score"


def test_mult_protocol_resumes_its_plateau_schedule(tmp_path):
    from nbsupport.train import TrainProtocol

    train_b, valid_b = _batches(0), _batches(1)
    proto = TrainProtocol.named("mult", plateau=(0.1, 1))
    torch.manual_seed(3)
    whole, split = _Score(), _Score()
    split.load_state_dict(whole.state_dict())
    a = train.fit(whole, train_b, valid_b, task="sentiment2", epochs=6, lr=0.3, device="cpu", protocol=proto,
                  progress=False)
    train.fit(split, train_b, valid_b, task="sentiment2", epochs=3, lr=0.3, device="cpu", protocol=proto,
              progress=False, checkpoint_dir=tmp_path)
    b = train.fit(split, train_b, valid_b, task="sentiment2", epochs=6, lr=0.3, device="cpu", protocol=proto,
                  progress=False, checkpoint_dir=tmp_path)
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k


def test_score_outputs_are_scored_as_mults_evaluation_does():
    labels = torch.tensor([-2.6, -0.4, 0.0, 0.2, 1.4, 3.0, -1.0])
    scores = torch.tensor([[-3.4], [0.3], [0.6], [0.0], [1.6], [2.4], [-0.5]])
    out = train.compute_metrics(scores, labels, "sentiment2")
    p, t = scores[:, 0].numpy(), labels.numpy()
    nz = t != 0  # eval_mosei_senti(exclude_zero=True): (pred > 0) == (truth > 0) on non-zero truths
    assert out["acc2"] == pytest.approx(np.mean((p[nz] > 0) == (t[nz] > 0)))  # 0.0 predicted counts negative
    a7 = np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(t, -3, 3)))
    assert train.compute_metrics(scores, labels, "sentiment7")["acc7"] == pytest.approx(a7)
    assert out["mae"] == pytest.approx(np.mean(np.abs(p - t)), abs=1e-6)
    assert metrics.is_score_output(scores) and not metrics.is_score_output(torch.zeros(7, 2))
    assert train.n_outputs("sentiment2", head="score") == 1 and train.n_outputs("emotion", 6, head="score") == 6
    assert train.n_outputs("sentiment7") == 7
    with pytest.raises(ValueError, match="sentiment_head"):
        train.TrainProtocol(sentiment_head="regression")
    with pytest.raises(ValueError, match="plateau"):
        train.TrainProtocol(plateau=(2.0, 1))


def test_mult_is_trained_by_its_own_protocol_under_paper():
    from nbsupport.models.baselines import MulT

    model = MulT("LA", {"L": 4, "A": 3}, 1, dim=8, heads=2, cross_layers=1, self_layers=1)
    assert train.resolve_protocol("paper", model) == "mult"
