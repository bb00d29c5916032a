"""protocol.family_seed_runs (Chapter 7): across training seeds, only the methods the verdicts compare are
trained again, the chapter's own run is reused, and a family's representative is chosen on validation."""
import pytest
import torch
from torch.utils.data import DataLoader

from nbsupport import protocol
from nbsupport.models import umons
from nbsupport.models.umons import UmonsConfig

from test_umons import SMALL, _batch


def test_family_seed_runs_retrains_only_the_kept_methods_and_the_validation_choice():
    batches = [_batch(lengths={"L": [5, 3, 7], "A": [2, 8, 6], "V": [5, 6, 1]}, seed=s, pad_to=8) for s in range(3)]
    loaders = {s: DataLoader(batches, batch_size=None) for s in ("train", "valid", "test")}
    dims = umons.input_dims_from(batches[0])
    builders = {m: (lambda m=m: umons.UmonsTransformer(m, 6, config=UmonsConfig(**SMALL), input_dims=dims))
                for m in ("L", "A", "LA")}
    trained = {}
    for m, build in builders.items():  # the chapter's own run, at seed 0
        torch.manual_seed(0)
        trained[m] = protocol.train_and_test(build(), loaders, name=m, epochs=1, lr=1e-2, device="cpu",
                                             seed=0, progress=False)
    # validation (never test) picks the single-modality representative: A, whatever the test says
    trained["A"][1].valid_metrics["wacc"], trained["L"][1].valid_metrics["wacc"] = 0.9, 0.1
    starts, real_fit = [], protocol.train_and_test

    def spy(model, *args, **kw):
        starts.append((kw["name"], kw["seed"]))
        return real_fit(model, *args, **kw)

    protocol.train_and_test = spy
    try:
        runs, groups = protocol.family_seed_runs(
            trained, builders, loaders, [0, 1], families={"joint": ["LA", "LAV"], "single": ["L", "A"]},
            keep=["LA", "LAV"], seed=0, epochs=1, lr=1e-2, device="cpu",
            per_model={"A": {"epochs": 2}}, progress=False)
        others, _ = protocol.family_seed_runs(
            trained, builders, loaders, [1, 2], families={"joint": ["LA"], "single": ["L", "A"]}, seed=0,
            epochs=1, lr=1e-2, device="cpu", progress=False)
    finally:
        protocol.train_and_test = real_fit
    assert groups == {"joint": ["LA"], "single": ["A"]}
    # seed 0 is the chapter's run (not trained again); L is never trained again
    assert starts[:2] == [("LA", 1), ("A", 1)]
    assert runs.test["A"][0] is trained["A"][1].extra["test"] and set(runs.test) == {"LA", "A"}
    table = runs.table().set_index(["model", "seed"])
    assert table.loc[("A", 1), "epochs"] == 2 and table.loc[("LA", 1), "epochs"] == 1  # per_model
    assert runs.compare_groups(groups).seeds == (0, 1)
    # without keep, each family keeps its validation best only; seeds without the chapter's seed all train
    assert starts[2:] == [("LA", 1), ("A", 1), ("LA", 2), ("A", 2)]
    assert sorted(others.test["A"]) == [1, 2]
    with pytest.raises(ValueError, match="distinct"):
        protocol.family_seed_runs(trained, builders, loaders, [1, 1], families={"j": ["LA"], "s": ["L"]},
                                  seed=0, epochs=1, lr=1e-2)
