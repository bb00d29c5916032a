"""nbsupport.book.notebook: parameter validation, atomic writes, metrics.json shape."""
import json
import os

import pytest

from nbsupport.book import notebook as nb


def _values(**over):
    return {"smoke": False, "seed": 0, "device": "cpu", "output_dir": None, **over}


def test_start_validates_and_seeds(tmp_path):
    run = nb.start(_values(epochs=3, output_dir=str(tmp_path / "o")), epochs=nb.Int(min=1))
    assert run.epochs == 3 and run.device.type == "cpu" and (tmp_path / "o").is_dir()


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
    run = nb.start(_values(output_dir=str(tmp_path)))
    path = run.write_metrics([{"model": "m", "modalities": "L", "wacc": 0.5}], extra_key=[1])
    data = json.loads(path.read_text())
    assert data["results"][0]["wacc"] == 0.5 and data["parameters"]["seed"] == 0 and data["extra_key"] == [1]
    with pytest.raises(ValueError, match="modalities"):
        run.write_metrics([{"model": "m", "wacc": 0.5}])
    with pytest.raises(ValueError, match="wacc"):
        run.write_metrics([{"model": "m", "modalities": "L", "wacc": "high"}])
