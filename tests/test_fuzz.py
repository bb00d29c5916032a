"""The data readers under the mutation fuzzer (tests/fuzz_data.py) for a bounded time in ``make test``
(``FUZZ_SECONDS``, default 60; ``make fuzz`` runs it longer). Skip it in a fast run with ``-m "not fuzz"``.

Property checked on every input: a DataError naming the file, or a dataset that passes the book's rules;
never a crash (the child process dies), a hang, a memory blow-up (the child's address-space cap) or
another exception type."""
from __future__ import annotations

import os

import pytest

import fuzz_data


@pytest.mark.fuzz
@pytest.mark.slow
def test_readers_under_the_mutation_fuzzer(tmp_path):
    seconds = float(os.environ.get("FUZZ_SECONDS", "60"))
    report = fuzz_data.fuzz(seconds, findings=tmp_path / "findings")
    print(f"fuzz: {report['inputs']} inputs, " + ", ".join(f"{t}: {report[t]}" for t in fuzz_data.TARGETS))
    for t in fuzz_data.TARGETS:  # every reader saw inputs it refused and inputs it accepted
        assert report[t].get("data_error", 0) > 0, (t, report[t])
    assert not report["findings"], report["findings"][:10]
