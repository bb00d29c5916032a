# Two commands (README.md): `make book` builds the HTML book, `make test` runs the test suite.
# Both create or reuse .venv and install requirements.txt + nbsupport into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
# 2 cores: keep BLAS/torch from oversubscribing when several kernels run at once
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test test-fast install assets clean benchmarks gpu-bundle gpu-check fuzz

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# MathJax, RequireJS and the ipywidgets HTML manager served from the book itself (npm registry at
# install time, never a CDN at read time); idempotent, 0.1 s when present
assets: $(STAMP)
	$(BIN)/python -m nbsupport.book.assets book/_static

book: $(STAMP) assets
	$(BIN)/python -c "from nbsupport.data.corpus import guard_book_cache; guard_book_cache('.jupyter_cache')"
	$(BIN)/jupyter-book build . --warningiserror --keep-going --path-output .
	@echo "HTML book: $(CURDIR)/_build/html/index.html"

# --durations: the log of every run (CI's included) says where the time went
test: $(STAMP) assets
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# The fast tier (README, "Tests"): units and contracts; no notebook, browser, Dask-cluster, fuzz or slow test
# (pyproject.toml's markers, `pytest --markers`). `make test` runs these and every other test.
FAST_TIER := not notebook and not browser and not cluster and not fuzz and not slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)

# The data readers under the mutation fuzzer for FUZZ_SECONDS (make test runs it for 60 s);
# the inputs that break the property are kept in fuzz_findings/.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_data.py --seconds $(FUZZ_SECONDS) --findings fuzz_findings

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/sparse_vs_dense.py --out benchmarks/results/sparse_vs_dense.json
	$(BIN)/python benchmarks/peer_scn.py --out benchmarks/results/peer_scn.json
	$(BIN)/python benchmarks/train_step.py --out benchmarks/results/train_step.json
	$(BIN)/python benchmarks/layer_anatomy.py --out benchmarks/results/layer_anatomy.json

# The GPU check (README "Using a GPU"): `make gpu-bundle` here (needs PyPI) packs what a bare GPU machine lacks
# into .gpu_bundle/ (gitignored, carried by the device tool); `make gpu-check OUT=folder` there runs the check
# with the machine's own python3 (no .venv there) and writes folder/gpu_check/.
gpu-bundle: $(STAMP)
	$(BIN)/python benchmarks/gpu_bundle.py --out .gpu_bundle

OUT ?= gpu_check_results
gpu-check:
	PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --bundle .gpu_bundle --out $(OUT)/gpu_check

clean:
	rm -rf _build .jupyter_cache .jupyter_cache.data_version
