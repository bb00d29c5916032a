"""The test tiers (README, "Test tiers"): the markers pyproject.toml declares are the ones `make test-fast`
deselects, and the fixtures that make a test slow mark it (tests/conftest.py)."""
from __future__ import annotations

import re
import tomllib

from conftest import ROOT, SLOW_TIERS, TIERS_OF_FIXTURE


def test_fast_tier_deselects_every_declared_slow_marker():
    declared = [m.split(":")[0] for m in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]]
    assert sorted(declared) == sorted(SLOW_TIERS)
    selection = re.search(r"^FAST_TIER := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert sorted(re.findall(r"not (\w+)", selection)) == sorted(SLOW_TIERS)
    assert re.fullmatch(r"not \w+( and not \w+)*", selection.strip())
    assert {tier for tiers in TIERS_OF_FIXTURE.values() for tier in tiers} <= set(SLOW_TIERS)


def test_a_test_on_the_smoke_runs_is_marked_by_its_fixtures():
    """The collection hook marks a test by the fixtures it uses, whatever its decorators say."""
    import conftest

    class Item:
        def __init__(self, *fixtures):
            self.fixturenames, self.markers = list(fixtures), []

        def add_marker(self, mark):
            self.markers.append(mark.name)

    collected = [Item("tmp_path", "smoke_runs"), Item("smoke_book"), Item("site", "server"), Item("dask_cluster"),
                 Item("tmp_path")]
    items = list(collected)
    conftest.pytest_collection_modifyitems(None, items)
    assert [sorted(i.markers) for i in collected] == [["notebook"], ["notebook"], ["browser", "notebook"],
                                                       ["cluster"], []]
    # the tests on the smoke runs go last, in their order: the rest runs while the smoke runs work
    assert items == [collected[3], collected[4], collected[0], collected[1], collected[2]]


def test_tests_that_wait_run_first_and_tests_on_background_runs_last():
    """The order of a collection: a cluster test (mostly waiting) first, then the others, then the
    tests on the background papermill runs (here: one that asks for the stop runs), each group in its order."""
    import conftest

    class Item:
        def __init__(self, name, fixtures=(), marks=()):
            self.name, self.fixturenames, self.marks = name, list(fixtures), [type("M", (), {"name": m}) for m in marks]

        def iter_markers(self):
            return iter(self.marks)

        def add_marker(self, mark):
            self.marks.append(mark)

    items = [Item("unit"), Item("stops", ["stop_runs"]), Item("sweep", marks=["cluster"]), Item("unit2"),
             Item("fuzz", marks=["fuzz"]), Item("smoke", ["smoke_runs"])]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["sweep", "fuzz", "unit", "unit2", "stops", "smoke"]
