"""Tests of nbsupport.train (the shared trainer): loss weights, seeding, resume, early stopping."""
import numpy as np
import pytest
import torch
from torch import nn

from nbsupport import train


class TinyNet(nn.Module):
    """A small MLP over batch['x'] with dropout (so that RNG handling matters for exact resume)."""

    def __init__(self, d_in=8, n_out=6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, n_out))

    def forward(self, batch):
        return self.net(batch["x"])


def _items(n=48, seed=0, d_in=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 6, generator=g)
    emo = (x @ w > 0.5).float()
    sent = torch.clamp(x[:, 0] * 2, -3, 3)
    return [{"ids": f"u{i}", "x": x[i], "emotion": emo[i], "sentiment": sent[i]} for i in range(n)]


def _collate(items):
    return {"ids": [it["ids"] for it in items], "x": torch.stack([it["x"] for it in items]),
            "emotion": torch.stack([it["emotion"] for it in items]),
            "sentiment": torch.stack([it["sentiment"] for it in items])}


def _loaders(seed=0):
    tr = train.make_loader(_items(48, 1), batch_size=8, shuffle=True, seed=seed, collate_fn=_collate)
    va = train.make_loader(_items(24, 2), batch_size=8, shuffle=False, collate_fn=_collate)
    return tr, va


def _fit(epochs=4, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyNet()
    tr, va = _loaders(seed)
    return train.fit(model, tr, va, epochs=epochs, lr=1e-2, seed=seed, device="cpu", progress=False, **kw)


def test_pos_weight_is_neg_over_pos_hand_computed():
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.float32)
    # column 0: 1 positive, 3 negatives -> 3; column 1: 1 pos 3 neg -> 3; column 2: 3 pos, 1 neg -> 1/3
    assert torch.allclose(train.pos_weight_from(labels), torch.tensor([3.0, 3.0, 1 / 3]))
    # an emotion without positives gets weight 1
    assert train.pos_weight_from(torch.zeros(5, 2)).tolist() == [1.0, 1.0]


def test_fit_uses_bce_with_the_training_pos_weight():
    tr, _ = _loaders()
    labels = torch.stack([it["emotion"] for it in _items(48, 1)])
    pos = labels.sum(0)
    expected = (48 - pos) / pos
    assert torch.allclose(_spied_pos_weight(tr), expected)


def test_sentiment_classes_hand_computed():
    s = torch.tensor([-3.4, -2.6, -0.4, 0.0, 0.49, 0.51, 2.5, 3.7])
    assert train.sentiment_classes(s, "sentiment7").tolist() == [0, 0, 3, 3, 3, 4, 5, 6]
    assert train.sentiment_classes(s, "sentiment2").tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="sentiment"):
        train.sentiment_classes(torch.tensor([float("nan")]), "sentiment7")


def test_same_seed_same_metrics_and_history():
    a, b = _fit(seed=3), _fit(seed=3)
    assert a.history.drop(columns="seconds").equals(b.history.drop(columns="seconds"))
    assert a.valid_metrics == b.valid_metrics
    c = _fit(seed=4)
    assert not a.history["train_loss"].equals(c.history["train_loss"])


def test_cpu_fit_runs_with_deterministic_algorithms_and_restores_the_setting():
    seen = []
    assert not torch.are_deterministic_algorithms_enabled()
    _fit(epochs=2, callbacks=[lambda epoch, row: seen.append(torch.are_deterministic_algorithms_enabled())])
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"):  # restored also when training fails
        _fit(epochs=1, callbacks=[lambda epoch, row: (_ for _ in ()).throw(RuntimeError("boom"))])
    assert not torch.are_deterministic_algorithms_enabled()
    # inside the context, the accumulating index_put_ (embedding-style backward) repeats bit for bit
    src, idx = torch.randn(30000, 16), torch.randint(0, 500, (30000,))
    with train.cpu_determinism("cpu"):
        sums = [torch.zeros(500, 16).index_put_((idx,), src, accumulate=True) for _ in range(5)]
    assert all(torch.equal(sums[0], x) for x in sums[1:])
    # ... and equals the float64 sum to float32 precision (what it computes, not only that it repeats)
    ref = torch.zeros(500, 16, dtype=torch.float64).index_add_(0, idx, src.double())
    assert torch.allclose(sums[0].double(), ref, atol=1e-4)


def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tmp_path):
    full = _fit(epochs=4, checkpoint_dir=tmp_path / "full")

    def crash(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill after the first epoch")

    with pytest.raises(KeyboardInterrupt):
        _fit(epochs=4, checkpoint_dir=tmp_path / "cut", callbacks=[crash])
    assert (tmp_path / "cut" / "last.pt").exists()
    resumed = _fit(epochs=4, checkpoint_dir=tmp_path / "cut")  # fresh model object, loads last.pt
    cols = [c for c in full.history.columns if c != "seconds"]
    pd_full, pd_res = full.history[cols], resumed.history[cols]
    assert list(pd_res["epoch"]) == [1, 2, 3, 4]
    assert np.allclose(pd_full.to_numpy(float), pd_res.to_numpy(float), atol=0, rtol=0)
    assert full.valid_metrics == resumed.valid_metrics
    for (k, v), (_, w) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k


def test_resume_with_more_epochs_continues(tmp_path):
    full = _fit(epochs=3)
    _fit(epochs=1, checkpoint_dir=tmp_path)
    more = _fit(epochs=3, checkpoint_dir=tmp_path)
    assert np.array_equal(full.history["train_loss"].to_numpy(), more.history["train_loss"].to_numpy())
    assert (tmp_path / "best.pt").exists()


def test_early_stopping_stops():
    # a learning rate so small that the validation metric never improves after epoch 1
    torch.manual_seed(0)
    tr, va = _loaders()
    res = train.fit(TinyNet(), tr, va, epochs=20, lr=1e-12, patience=2, device="cpu", progress=False)
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1


def test_best_weights_are_returned():
    res = _fit(epochs=5)
    tr, va = _loaders()
    again = train.evaluate(res.model, va, task="emotion", device="cpu")
    assert again["wacc"] == pytest.approx(res.valid_metrics["wacc"])
    assert res.history["valid_wacc"].max() == pytest.approx(res.best_score)


@pytest.mark.parametrize("task,n", [("sentiment7", 7), ("sentiment2", 2)])
def test_sentiment_tasks_train_with_cross_entropy(task, n):
    torch.manual_seed(0)
    tr, va = _loaders()
    res = train.fit(TinyNet(n_out=n), tr, va, task=task, epochs=2, device="cpu", progress=False)
    key = "acc7" if task == "sentiment7" else "acc2"
    assert res.monitor == key and 0 <= res.valid_metrics[key] <= 1
    assert train.n_outputs(task) == n


def test_validation_thresholds_are_per_emotion():
    res = _fit(epochs=2, thresholds="validation")
    assert np.asarray(res.thresholds).shape == (6,)


def test_param_groups_are_used():
    class Grouped(TinyNet):
        def param_groups(self, lr):
            return [{"params": self.net[0].parameters(), "lr": lr / 10},
                    {"params": self.net[3].parameters(), "lr": lr}]

    tr, va = _loaders()
    seen = {}
    orig = torch.optim.AdamW.__init__

    def spy(self, params, *a, **k):
        params = list(params)
        seen["lrs"] = [g["lr"] for g in params]
        orig(self, params, *a, **k)

    torch.optim.AdamW.__init__ = spy
    try:
        train.fit(Grouped(), tr, va, epochs=1, lr=1e-2, device="cpu", progress=False)
    finally:
        torch.optim.AdamW.__init__ = orig
    assert seen["lrs"] == pytest.approx([1e-3, 1e-2])


def test_bad_arguments_are_named():
    tr, va = _loaders()
    with pytest.raises(ValueError, match="task"):
        train.fit(TinyNet(), tr, va, task="emotions", epochs=1, device="cpu")
    with pytest.raises(ValueError, match="epochs"):
        train.fit(TinyNet(), tr, va, epochs=0, device="cpu")
    with pytest.raises(ValueError, match="monitor"):
        train.fit(TinyNet(), tr, va, epochs=1, monitor="nope", device="cpu", progress=False)


def _ddp_worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        tr = train.make_loader(_items(48, 1), batch_size=8, shuffle=True, seed=0, collate_fn=_collate)
        va = train.make_loader(_items(21, 2), batch_size=8, shuffle=False, collate_fn=_collate)
        res = train.fit(TinyNet(), tr, va, epochs=2, device="cpu", progress=False, checkpoint_dir=out_dir / "ck")
        logits, _, ids = train.predict(res.model, va, device="cpu")
        torch.save({"logits": logits, "ids": ids, "state": res.model.state_dict()}, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes re-import torch (~15 s on 2 cores)
def test_distributed_two_ranks_gather_in_dataset_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ids"] == r1["ids"] == [f"u{i}" for i in range(21)]  # every item once, in order
    assert torch.equal(r0["logits"], r1["logits"])
    model = TinyNet()
    model.load_state_dict(r0["state"])  # the same predictions from a plain single-process forward
    va = train.make_loader(_items(21, 2), batch_size=8, shuffle=False, collate_fn=_collate)
    single, _, _ = train.predict(model, va, device="cpu")
    assert torch.allclose(single, r0["logits"], atol=1e-6)
    assert (tmp_path / "ck" / "last.pt").exists()


def test_compute_metrics_against_sklearn_and_hand_values():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g)
    labels = (torch.rand(40, 6, generator=g) > 0.6).float()
    out = train.compute_metrics(logits, labels, "emotion")
    pred = (torch.sigmoid(logits) > 0.5).numpy()
    for k in range(6):
        assert out[f"wacc_{k}"] == pytest.approx(balanced_accuracy_score(labels[:, k].numpy(), pred[:, k]))
        assert out[f"f1_{k}"] == pytest.approx(f1_score(labels[:, k].numpy(), pred[:, k]))
    assert out["wacc"] == pytest.approx(np.mean([out[f"wacc_{k}"] for k in range(6)]))
    # sentiment7: predicted classes 0 and 6 -> scores -3, +3; true scores -2.6 (class 0) and 0.4 (class 3)
    logits7 = torch.full((2, 7), -20.0)
    logits7[0, 0] = logits7[1, 6] = 20.0
    s7 = train.compute_metrics(logits7, torch.tensor([-2.6, 0.4]), "sentiment7")
    assert s7["acc7"] == pytest.approx(0.5) and s7["acc2"] == pytest.approx(1.0)
    # sentiment2: class 1 = non-negative; the item with score 0 is dropped by the non-zero acc2
    logits2 = torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    s2 = train.compute_metrics(logits2, torch.tensor([1.0, -1.0, 0.0]), "sentiment2")
    assert s2["acc2"] == pytest.approx(1.0) and s2["acc2_zero"] == pytest.approx(2 / 3)


class AuxNet(nn.Module):
    """Two linear heads over batch['x'] (no dropout); the second one only feeds ``auxiliary_loss``."""

    def __init__(self, weight=0.5):
        super().__init__()
        self.main, self.aux, self.weight, self.calls = nn.Linear(8, 6), nn.Linear(8, 6), weight, 0

    def forward(self, batch):
        return self.main(batch["x"])

    def auxiliary_loss(self, batch, criterion):
        self.calls += 1
        return self.weight * criterion(self.aux(batch["x"]))


def _first_step_grads(model, loader):
    """Gradients seen by the optimiser at the first step of one fit epoch (AdamW.step spied)."""
    seen = {}
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        if not seen:
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return orig(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        train.fit(model, loader, None, epochs=1, lr=1e-2, device="cpu", progress=False, grad_clip=None)
    finally:
        torch.optim.AdamW.step = orig
    return seen


def test_auxiliary_loss_hook_is_added_to_the_training_loss():
    items = _items(8, 1)
    loader = train.make_loader(items, batch_size=8, shuffle=False, collate_fn=_collate)
    torch.manual_seed(0)
    model = AuxNet(weight=0.5)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    grads = _first_step_grads(model, loader)
    assert model.calls == 1  # one training batch, never called for evaluation
    # independent reference: the loss written by hand with PyTorch's BCE and pos_weight = neg/pos
    ref = AuxNet(weight=0.5)
    ref.load_state_dict(init)
    x = torch.stack([it["x"] for it in items])
    y = torch.stack([it["emotion"] for it in items])
    bce = nn.BCEWithLogitsLoss(pos_weight=(8 - y.sum(0)) / y.sum(0))
    (bce(ref.main(x), y) + 0.5 * bce(ref.aux(x), y)).backward()
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
    assert grads["aux.weight"].abs().sum() > 0  # the auxiliary head did receive a gradient
    # a model whose hook returns None trains on the main loss alone
    model = AuxNet(weight=0.5)
    model.load_state_dict(init)
    model.auxiliary_loss = lambda batch, criterion: None
    grads = _first_step_grads(model, loader)
    assert "aux.weight" not in grads
    assert torch.allclose(grads["main.weight"], ref.main.weight.grad, atol=1e-6)


def test_auxiliary_loss_must_be_a_scalar():
    loader = train.make_loader(_items(8, 1), batch_size=8, collate_fn=_collate)
    model = AuxNet()
    model.auxiliary_loss = lambda batch, criterion: torch.ones(3)
    with pytest.raises(ValueError, match="auxiliary_loss must return a scalar"):
        train.fit(model, loader, None, epochs=1, device="cpu", progress=False)


class _LabelledItems(torch.utils.data.Dataset):
    """The items of ``_items`` with a ``label_rows()`` accessor (as ``FeatureDataset`` offers) and a
    count of the items read, to see whether ``fit`` re-reads the training set for ``pos_weight``."""

    def __init__(self, items):
        self.items, self.reads = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads += 1
        return self.items[i]

    def label_rows(self):
        return {"emotion": torch.stack([it["emotion"] for it in self.items]),
                "sentiment": torch.stack([it["sentiment"] for it in self.items])}


def _spied_pos_weight(loader):
    seen = {}
    orig = nn.BCEWithLogitsLoss.__init__

    def spy(self, *a, pos_weight=None, **k):
        seen["pw"] = pos_weight
        orig(self, *a, pos_weight=pos_weight, **k)

    nn.BCEWithLogitsLoss.__init__ = spy
    try:
        train.fit(TinyNet(), loader, None, epochs=1, device="cpu", progress=False)
    finally:
        nn.BCEWithLogitsLoss.__init__ = orig
    return seen["pw"]


def test_pos_weight_from_label_rows_without_reading_the_features():
    items = _items(44, 1)
    labels = torch.stack([it["emotion"] for it in items])
    expected = (44 - labels.sum(0)) / labels.sum(0)  # hand count: negatives / positives
    ds = _LabelledItems(items)
    pw = _spied_pos_weight(train.make_loader(ds, batch_size=8, shuffle=True, collate_fn=_collate))
    assert torch.allclose(pw, expected)
    assert ds.reads == 44  # the training epoch only: the labels came from label_rows()
    # a loader that skips items (drop_last) is counted by a pass over the loader, as before
    ds = _LabelledItems(items)
    pw = _spied_pos_weight(train.make_loader(ds, batch_size=8, shuffle=False, collate_fn=_collate, drop_last=True))
    seen = labels[:40]
    assert torch.allclose(pw, (40 - seen.sum(0)) / seen.sum(0)) and ds.reads == 80


def test_resolve_device_names_the_parameter():
    from nbsupport.base import ParameterError

    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert train.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="'device'"):
            train.resolve_device("cuda")


def test_resume_fresh_moves_the_old_checkpoint_aside_and_trains_from_scratch(tmp_path):
    """resume='fresh' (issue 15): the old last.pt/best.pt are kept under replaced-*/, and the new run is the
    same as a run without any checkpoint, although its settings differ from the old checkpoint's."""
    _fit(epochs=3, seed=1, checkpoint_dir=tmp_path)
    old = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(train.CheckpointError, match="seed"):
        _fit(epochs=2, checkpoint_dir=tmp_path)
    fresh = _fit(epochs=2, checkpoint_dir=tmp_path, resume="fresh")
    plain = _fit(epochs=2)
    assert list(fresh.history["epoch"]) == [1, 2]
    assert np.array_equal(fresh.history["train_loss"].to_numpy(), plain.history["train_loss"].to_numpy())
    (moved,) = tmp_path.glob("replaced-*")
    assert (moved / "last.pt").read_bytes() == old and (moved / "best.pt").exists()
    with pytest.raises(ValueError, match="'resume' must be True, False or 'fresh'"):
        _fit(epochs=1, checkpoint_dir=tmp_path, resume="yes")


def test_checkpoint_loads_with_weights_only(tmp_path):
    """Checkpoints hold tensors and plain containers only: torch.load(weights_only=True) reads them, and
    the fingerprint records the settings of the run (independent of the trainer's own loader)."""
    res = _fit(epochs=2, seed=5, checkpoint_dir=tmp_path, thresholds="validation")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    fp = ckpt["fingerprint"]
    assert fp["seed"] == 5 and fp["lr"] == 1e-2 and fp["task"] == "emotion" and fp["thresholds"] == "validation"
    assert fp["model_parameters"]["net.0.weight"] == [16, 8] and fp["train_data"]["size"] == 48
    assert fp["train_data"]["batch_size"] == 8
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch
    np.testing.assert_allclose(best["thresholds"], res.thresholds)


# ------------------------------------------------------------------ protocols: the book's and the authors'
class LinearNet(nn.Module):
    """No dropout: the loss of an epoch at a negligible learning rate is the loss of the initial weights."""

    def __init__(self, n_out=6):
        super().__init__()
        self.lin = nn.Linear(8, n_out)

    def forward(self, batch):
        return self.lin(batch["x"])


def _bce_by_hand(z, y, pw):
    """-[pw * y * log sigmoid(z) + (1 - y) * log(1 - sigmoid(z))] element-wise, in float64 numpy."""
    z, y = z.astype(np.float64), y.astype(np.float64)
    sig = 1 / (1 + np.exp(-z))
    return -(pw * y * np.log(sig) + (1 - y) * np.log(1 - sig))


@pytest.mark.parametrize("protocol", ["book", "umons"])
def test_loss_of_each_protocol_by_hand(protocol):
    torch.manual_seed(0)
    model = LinearNet()
    tr, va = _loaders()
    items = _items(48, 1)
    x = torch.stack([it["x"] for it in items])
    y = torch.stack([it["emotion"] for it in items]).numpy()
    with torch.no_grad():
        z = model.lin(x).numpy()
    res = train.fit(model, tr, va, epochs=1, lr=1e-12, device="cpu", progress=False, protocol=protocol)
    if protocol == "umons":  # summed BCE, no pos_weight: per item, the sum over its 6 emotions
        expected = _bce_by_hand(z, y, 1.0).sum() / 48
    else:  # mean BCE with pos_weight = neg/pos: per item, the mean over its 6 emotions
        pos = y.sum(0)
        expected = _bce_by_hand(z, y, (48 - pos) / pos).mean()
    assert res.history["train_loss"][0] == pytest.approx(expected, rel=1e-5)


def test_umons_protocol_decays_the_learning_rate_from_the_best_weights(tmp_path, monkeypatch):
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])  # validation never beats epoch 1

    def fake_metrics(logits, labels, task, thresholds=None):
        return {"acc": next(scores)}

    monkeypatch.setattr(train, "compute_metrics", fake_metrics)
    seen = {}
    torch.manual_seed(0)
    model = LinearNet()
    tr, va = _loaders()
    cb = lambda epoch, row: seen.__setitem__(epoch, {k: v.clone() for k, v in model.state_dict().items()})
    res = train.fit(model, tr, va, epochs=10, lr=1e-2, device="cpu", progress=False, protocol="umons",
                    checkpoint_dir=tmp_path, callbacks=[cb])
    # epochs 2, 3: two decays (best weights reloaded, lr halved); then patience 3: epochs 4, 5, 6, stop
    assert res.stopped_early and list(res.history["epoch"]) == [1, 2, 3, 4, 5, 6] and res.best_epoch == 1
    assert res.history["lr_decay"].tolist()[1:3] == [1, 2] and np.isnan(res.history["lr_decay"][3])
    for epoch in (2, 3):
        assert all(torch.equal(seen[1][k], seen[epoch][k]) for k in seen[1])  # reloaded best weights
    assert not torch.equal(seen[1]["lin.weight"], seen[4]["lin.weight"])  # then trained on
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimiser"]["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2 / 4)]
    assert res.monitor == "acc"


def test_mesm_protocol_f1_monitor_and_lowest_threshold_ties(monkeypatch):
    ties_seen = []
    orig = train.choose_thresholds
    monkeypatch.setattr(train, "choose_thresholds", lambda p, l, ties="closest": (ties_seen.append(ties),
                                                                                   orig(p, l, ties))[1])
    torch.manual_seed(0)
    tr, va = _loaders()
    res = train.fit(LinearNet(), tr, va, epochs=2, lr=1e-2, device="cpu", progress=False, protocol="mesm")
    assert res.monitor == "f1" and ties_seen == ["lowest", "lowest"] and np.asarray(res.thresholds).shape == (6,)
    logits, labels, _ = train.predict(res.model, va, device="cpu")
    expected = orig(torch.sigmoid(logits).numpy(), labels.numpy(), "lowest")
    assert np.allclose(res.thresholds, expected)
    explicit = train.fit(LinearNet(), tr, va, epochs=1, lr=1e-2, device="cpu", progress=False, protocol="mesm",
                         monitor="wacc", thresholds=0.5)  # explicit arguments win over the protocol
    assert explicit.monitor == "wacc" and explicit.thresholds == 0.5


def test_paper_protocol_comes_from_the_model_and_bad_names_are_named():
    from nbsupport.models.mesm import EndToEndModel
    from nbsupport.models.umons import UmonsTransformer

    assert train.resolve_protocol("paper", UmonsTransformer("L", 6, hidden_size=8, ff_size=8, heads=2,
                                                            seq_len=4)) == "umons"
    assert EndToEndModel.paper_protocol == "mesm"
    with pytest.raises(ValueError, match="'protocol'='paper'"):
        train.resolve_protocol("paper", LinearNet())
    with pytest.raises(ValueError, match="'protocol'"):
        _fit(epochs=1, protocol="authors")
    with pytest.raises(ValueError, match="loss_reduction"):
        _fit(epochs=1, loss_reduction="max")
    assert train.PROTOCOLS["book"].grad_clip == 1.0 and train.PROTOCOLS["book"].pos_weight == "auto"
    with pytest.raises(TypeError, match="'grad_clipping'.*grad_clip"):  # a misspelt setting is named
        _fit(epochs=1, grad_clipping=0.5)


def test_protocol_config_is_one_frozen_value_with_named_overrides():
    book, umons = train.PROTOCOLS["book"], train.TrainProtocol.named("umons", patience=5)
    assert book == train.TrainProtocol() == train.TrainProtocol.named("book")
    assert umons.patience == 5 and umons.loss_reduction == "sum" and train.PROTOCOLS["umons"].patience == 3
    assert train.TrainProtocol.named(umons, patience=train.PROTOCOL_DEFAULT) == umons  # "the protocol's"
    with pytest.raises(AttributeError):
        book.patience = 2  # frozen: a protocol shared by every chapter cannot be changed in place
    assert umons.monitor_for("emotion") == "acc" and book.monitor_for("sentiment7") == "acc7"
    assert train.PROTOCOLS["mesm"].monitor_for("sentiment2") == "acc2"  # no entry: the task's default
    # fit takes the config itself: the same run as by name with the same setting
    by_name = _fit(epochs=2, protocol="umons", patience=5)
    by_config = _fit(epochs=2, protocol=umons)
    assert by_name.history["train_loss"].tolist() == by_config.history["train_loss"].tolist()
    for bad, match in [(dict(sentiment_bins="sdk"), "sentiment_bins"), (dict(lr_decay=(2, 1)), "lr_decay"),
                       (dict(thresholds="test"), "thresholds"), (dict(pos_weight="balanced"), "pos_weight")]:
        with pytest.raises(ValueError, match=match):
            train.TrainProtocol(**bad)


def test_sentiment_bins_of_the_umons_protocol():
    s = torch.tensor([-2.4, -4 / 3, -1 / 3, 0.0, 1 / 3, 4 / 3, 7 / 3])
    assert train.sentiment_classes(s, "sentiment7", bins="mosei").tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert train.sentiment_classes(s, "sentiment7").tolist() == [1, 2, 3, 3, 3, 4, 5]
    torch.manual_seed(0)
    tr, va = _loaders()
    res = train.fit(LinearNet(7), tr, va, task="sentiment7", epochs=1, device="cpu", progress=False,
                    protocol="umons")
    assert res.monitor == "acc7_bins" and 0 <= res.valid_metrics["acc7_bins"] <= 1
