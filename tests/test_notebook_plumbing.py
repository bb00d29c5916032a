"""nbsupport.book.notebook: parameter validation, atomic writes, metrics.json shape."""
import json
import os
import re

import pytest

from nbsupport.book import notebook as nb


def _values(**over):
    return {"smoke": False, "seed": 0, "device": "cpu", "output_dir": None, **over}


SPEC = nb.Spec(rules={"epochs": nb.Int(min=1), "text_model": nb.Str(optional=True)},
               smoke={"epochs": 1, "text_model": lambda v: v or "tiny"})


def test_start_validates_and_seeds(tmp_path):
    run = nb.start(SPEC, _values(epochs=3, text_model="", output_dir=str(tmp_path / "o")))
    assert run.epochs == 3 and run.device.type == "cpu" and (tmp_path / "o").is_dir()
    assert run.text_model is None  # "" and None both mean "not set"


def test_smoke_overrides_are_what_runs_and_what_is_recorded(tmp_path):
    run = nb.start(SPEC, _values(smoke=True, epochs=300, text_model=None, output_dir=str(tmp_path)))
    assert run.epochs == 1 and run.text_model == "tiny"
    run.write_metrics([{"model": "m", "modalities": "L"}])
    data = json.loads(run.metrics_path.read_text())
    assert data["parameters"]["epochs"] == 1


def test_misspelled_parameter_stops_with_the_closest_name():
    # papermill's "-p epoch 5" lands in the injected cell; IPython's history (In) holds both cells
    ns = _values(epochs=3, text_model="", epoch=5)
    ns["In"] = ["", "smoke = False\nseed = 0\nepochs = 3\ntext_model = ''", "# Parameters\nepoch = 5\n",
                "run = nb.start('x', globals())"]
    with pytest.raises(nb.ParameterError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
        nb.start(SPEC, ns)


def test_literals_of_earlier_cells_are_not_mistaken_for_parameters():
    ns = _values(epochs=3, text_model="", rows=[1])  # rows: set by a cell run before, not a parameter
    ns["In"] = ["", "rows = [1]\nprint(rows)", "epochs = 3\ntext_model = ''", "run = nb.start('x', globals())"]
    assert nb.start(SPEC, ns).epochs == 3


def test_unwritable_output_dir_stops_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = str(target / "out")
        else:
            out = str(locked / "out")
        with pytest.raises(nb.ParameterError, match="'output_dir'.*not writable"):
            nb.start(SPEC, _values(epochs=1, text_model="", output_dir=out))
    finally:
        locked.chmod(0o700)


def test_every_chapter_spec_matches_its_parameters_cell():
    import nbformat
    from conftest import NOTEBOOKS

    from nbsupport.book import chapters

    for path in NOTEBOOKS:
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        ns: dict = {}
        exec(cell.source, ns)
        given = {k for k in ns if not k.startswith("__")}
        spec = chapters.spec(path.stem)
        assert given == set(spec.names), f"{path.name}: parameters cell {sorted(given)} != spec {sorted(spec.names)}"
        spec.validate({k: ns[k] for k in given})  # the defaults pass their own rules


@pytest.mark.parametrize("over, rules, words", [
    ({"seed": "notanumber"}, {}, ["'seed'", "integer", "'notanumber'"]),
    ({"seed": -1}, {}, ["'seed'", ">= 0"]),
    ({"smoke": "yes"}, {}, ["'smoke'", "True or False"]),
    ({"device": "gpu"}, {}, ["'device'", "'auto'"]),
    ({"top_p": 1.5}, {"top_p": nb.Float(min=0, max=1, open_min=True)}, ["'top_p'", "<= 1"]),
    ({"top_p": 0}, {"top_p": nb.Float(min=0, max=1, open_min=True)}, ["'top_p'", "> 0"]),
    ({"modalities": "LX"}, {"modalities": nb.Modalities()}, ["'modalities'", "'L', 'A', 'V'"]),
    ({"modalities": "AV"}, {"modalities": nb.Modalities(need_text=True)}, ["'modalities'", "include 'L'"]),
    ({"epochs": 2.5}, {"epochs": nb.Int(min=1)}, ["'epochs'", "integer"]),
    ({"typo": 1}, {}, ["unknown parameter", "typo"]),
])
def test_bad_values_name_the_parameter(over, rules, words):
    with pytest.raises(nb.ParameterError) as err:
        nb.validate(_values(**over), rules)
    for w in words:
        assert w in str(err.value)


def test_modalities_normalised_order():
    assert nb.validate(_values(m="VL"), {"m": nb.Modalities()})["m"] == "LV"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m.json"
    nb.atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        nb.atomic_write_text(target, object())  # write fails half-way
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_metrics_shape_checked(tmp_path):
    run = nb.start(nb.Spec(rules={}), _values(output_dir=str(tmp_path)))
    run.write_metrics([{"model": "m", "modalities": "L", "wacc": 0.5}], extra_key=[1])
    data = json.loads(run.metrics_path.read_text())
    assert data["results"][0]["wacc"] == 0.5 and data["parameters"]["seed"] == 0 and data["extra_key"] == [1]
    with pytest.raises(ValueError, match="modalities"):
        run.write_metrics([{"model": "m", "wacc": 0.5}])
    with pytest.raises(ValueError, match="wacc"):
        run.write_metrics([{"model": "m", "modalities": "L", "wacc": "high"}])


@pytest.mark.parametrize("data_format, refused", [("raw", False), ("auto", False), ("mmsa", True),
                                                  ("csd", True)])
def test_chapter_6_needs_the_raw_layout(data_format, refused):
    """Chapter 6 trains on frames and audio: pre-extracted forms stop at the spec, naming the preparer."""
    import nbformat
    from conftest import BOOK

    from nbsupport.book import chapters

    cell = next(c for c in nbformat.read(BOOK / "06_mesm.ipynb", as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(cell.source, ns)
    params = {k: v for k, v in ns.items() if not k.startswith("__")}
    params["data_format"] = data_format
    if not refused:
        assert chapters.spec("06_mesm").validate(params)["data_format"] == data_format
        return
    with pytest.raises(nb.ParameterError, match=r"'data_format' = '\w+': chapter 6 .* raw layout .*prepare"):
        chapters.spec("06_mesm").validate(params)


def test_explicit_parameters_win_over_smoke_sizes():
    # papermill -p smoke True -p epochs 3: the injected cell after the parameters cell sets both
    ns = _values(smoke=True, epochs=3, text_model=None)
    ns["In"] = ["", "smoke = False\nseed = 0\ndevice = 'cpu'\noutput_dir = None\nepochs = 300\ntext_model = None",
                "# Parameters\nsmoke = True\nepochs = 3\n", "run = nb.start('x', globals())"]
    run = nb.start(SPEC, ns)
    assert run.epochs == 3  # explicit: kept
    assert run.text_model == "tiny"  # not given: the smoke size


@pytest.mark.parametrize("name, value, words", [
    ("seed", 2**70, "'seed' must be <= 4294967295"),
    ("n_train", 10**12, "'n_train' must be <= 1000000"),
    ("n_train", 1e12, "'n_train' must be an integer"),
    ("epochs", 10**12, "'epochs' must be <= 2147483647"),
])
def test_out_of_range_numbers_stop_at_the_top(name, value, words):
    from nbsupport.book import chapters

    spec = chapters.spec("01_attention_basics")
    ns = dict(_values(), n_train=2000, seq_len=8, epochs=3, sentence="a b", explorer_angles=[0.0], seeds=[0],
              explorer_temperatures=[1.0])
    ns[name] = value
    with pytest.raises(nb.ParameterError, match=re.escape(words)):
        nb.start(spec, ns)
