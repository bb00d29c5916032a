"""The chapters' widgets in JupyterLab, the way a reader uses them (the reader who opens a chapter in JupyterLab).

Starts JupyterLab on 127.0.0.1 (free port, random token) in a temporary folder holding a copy of a
chapter with ``smoke = True``, opens it in headless Chromium, runs all cells, moves a slider with the
keyboard and checks that the figure next to it changes (the widget callback ran in the kernel and
redrew): chapter 1's ``temperature`` (attention heatmap in a captured Output), chapter 4's co-attention
``layer`` and chapter 6's ``top_p`` (figures in an ``ipywidgets.Image``, ``nbsupport.book.widgets.figure_view``). The
server is always shut down; a screenshot is kept under ``_build/test-artifacts/jupyterlab/``.
Skipped locally without chromium/chromedriver/selenium, failed when ``CI`` is set.
"""
from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT
from test_browser import require_chromium, start_chromium

pytestmark = [pytest.mark.browser, pytest.mark.notebook]  # Chromium + JupyterLab running chapters
#: (chapter, description of the slider the test moves, how many right-arrow presses)
CASES = [("01_attention_basics.ipynb", "temperature", 5), ("04_umons_multimodal.ipynb", "layer", 1),
         ("06_mesm.ipynb", "top_p", 3)]
ARTIFACTS = ROOT / "_build" / "test-artifacts" / "jupyterlab"
#: Parameters switched off in the JupyterLab copy: work the slider does not need, which the chapter's
#: shared smoke run (tests/conftest.py, ``smoke_runs``) already runs and checks (a parameter a chapter
#: no longer has is left alone).
SLIDER_ONLY = {"04_umons_multimodal.ipynb": {"bug_cost_seeds": "[]"},
               "06_mesm.ipynb": {"compare": "[]", "analyses": '["trained model"]'}}
RUN_ALL_TIMEOUT_S = 360  # chapter 6 smoke-trains FE2E, MESM and both attention_grad settings, then its explorer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(src: Path, dst: Path) -> Path:
    """Copy of the chapter whose parameters cell says ``smoke = True`` (same code path, small sizes), in
    ``dst/book/`` beside a copy of ``benchmarks/results/``: the repository's layout, which a chapter reading
    a committed benchmark result from ``../benchmarks/results/`` (Chapter 6) relies on."""
    shutil.copytree(ROOT / "benchmarks" / "results", dst / "benchmarks" / "results", dirs_exist_ok=True)
    dst = dst / "book"
    dst.mkdir(exist_ok=True)
    nb = nbformat.read(src, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    assert any(l.startswith("smoke =") for l in lines), f"{src.name}: no 'smoke =' in the parameters cell"
    trims = {"smoke": "True", **SLIDER_ONLY.get(src.name, {})}
    cell.source = "\n".join(next((f"{k} = {v}" for k, v in trims.items() if l.startswith(f"{k} =")), l)
                            for l in lines)
    nbformat.write(nb, dst / src.name)
    return dst / src.name


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving a temporary folder, one for the module's chapters (each
    opens its own copy and kernel there); yields (base url, token, folder)."""
    tmp_path = tmp_path_factory.mktemp("jupyterlab")
    port, token = _free_port(), secrets.token_hex(16)
    work = tmp_path / "lab"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # inline figures in the kernel
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = open(tmp_path / "jupyterlab.log", "w")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not answer within 60 s")
                time.sleep(0.5)
        yield base, token, work
    finally:
        # the server's own process group (it was started in a new session): the server and its kernels
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        log.close()


def _shut_down_kernels(base: str, token: str) -> None:
    """Delete every kernel of the JupyterLab server at ``base`` (its REST API, ``/api/kernels``)."""
    import json

    with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=10) as answer:
        kernels = json.load(answer)
    for kernel in kernels:
        request = urllib.request.Request(f"{base}/api/kernels/{kernel['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(request, timeout=30).close()


_STATE_JS = """
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
if (!nb) return {ready: false};
const prompts = Array.from(nb.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')).map(p => p.textContent.trim());
const errors = nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] .jp-RenderedText, .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]');
const tracebacks = Array.from(nb.querySelectorAll('.jp-RenderedText')).filter(e => /Traceback|Error:/.test(e.textContent) && e.closest('[data-mime-type="application/vnd.jupyter.error"]'));
return {ready: true, prompts: prompts, tracebacks: tracebacks.map(e => e.textContent.slice(0, 1500))};
"""

_KERNEL_IDLE_JS = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return !!(k && k.status === 'idle');
"""

_SLIDER_JS = """
const name = arguments[0];
const labels = Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .widget-slider .widget-label, .jp-NotebookPanel:not(.lm-mod-hidden) .widget-hslider .widget-label'));
const label = labels.find(l => l.textContent.trim() === name || l.title === name);
if (!label) return null;
const slider = label.closest('.widget-slider, .widget-hslider');
const handle = slider.querySelector('.noUi-handle, [role="slider"], input[type="range"]');
let box = slider.parentElement;
const IMG = '.jupyter-widgets-output-area img, .widget-output img, img.widget-image';
while (box && !box.querySelector(IMG)) box = box.parentElement;
const img = box ? box.querySelector(IMG) : null;
const readout = slider.querySelector('.widget-readout');
return {handle: handle, src: img ? img.getAttribute('src') : null,
        readout: readout ? readout.textContent.trim() : null, visible: slider.offsetParent !== null};
"""


@pytest.mark.timeout(660)
@pytest.mark.parametrize("chapter,slider,presses", CASES, ids=[c[0][:2] for c in CASES])
def test_slider_redraws_figure_in_jupyterlab(jupyterlab, tmp_path, chapter, slider, presses):
    from selenium.webdriver.common.keys import Keys

    chromium, driver = require_chromium()
    base, token, work = jupyterlab
    nb_path = _smoke_copy(ROOT / "book" / chapter, work)
    browser = start_chromium(chromium, driver, tmp_path / "chromium-profile")
    try:
        browser.set_window_size(1400, 1100)
        browser.get(f"{base}/lab/tree/{nb_path.relative_to(work).as_posix()}?token={token}&reset")
        # wait for the notebook and a kernel
        deadline = time.monotonic() + 90
        while not browser.execute_script(
                "return !!(window.jupyterapp && document.querySelector('.jp-NotebookPanel .jp-Notebook .jp-Cell')"
                " && document.querySelector('.jp-NotebookPanel-toolbar .jp-Toolbar-kernelName, .jp-KernelStatus'))"):
            assert time.monotonic() < deadline, "JupyterLab did not open the notebook within 90 s"
            time.sleep(0.5)
        # kernel ready, then run all cells
        deadline = time.monotonic() + 60
        while not browser.execute_script(_KERNEL_IDLE_JS):
            assert time.monotonic() < deadline, "the kernel did not start within 60 s"
            time.sleep(0.5)
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return null;")
        deadline = time.monotonic() + RUN_ALL_TIMEOUT_S
        while True:
            state = browser.execute_script(_STATE_JS)
            assert not state.get("tracebacks"), f"a cell failed in JupyterLab:\n{state['tracebacks'][0]}"
            prompts = state.get("prompts") or []
            if prompts and all(p.startswith("[") and p[1:-2].strip().isdigit() for p in prompts):
                break
            assert time.monotonic() < deadline, f"cells still running after {RUN_ALL_TIMEOUT_S} s: {prompts}"
            time.sleep(1)

        found = browser.execute_script(_SLIDER_JS, slider)
        assert found, f"no slider described '{slider}' rendered in {chapter}"
        # the rendered book hides the live widget (nbsupport.book.widgets.LIVE_ONLY_CLASS); JupyterLab must not
        assert found["visible"], f"{chapter}: the live '{slider}' slider is hidden in JupyterLab"
        assert found["src"] and found["src"].startswith(("data:image/png", "blob:")), \
            f"{chapter}: no figure image next to the '{slider}' slider"
        before_src, before_value = found["src"], found["readout"]
        # keyboard, as a reader would after tabbing to the handle (a notification toast may cover it)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();",
                               found["handle"])
        for _ in range(presses):
            found["handle"].send_keys(Keys.ARROW_RIGHT)
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:  # every key press redraws; wait for the kernel to finish them all
            now = browser.execute_script(_SLIDER_JS, slider)
            idle = browser.execute_script(_KERNEL_IDLE_JS)
            if idle and now["src"] and now["src"] != before_src:
                time.sleep(1.0)
                again = browser.execute_script(_SLIDER_JS, slider)
                if again["src"] == now["src"] and browser.execute_script(_KERNEL_IDLE_JS):
                    break
            assert time.monotonic() < deadline, (
                f"{chapter}: figure did not change after moving '{slider}' ({before_value} -> {now['readout']})")
            time.sleep(0.5)
        assert now["readout"] != before_value, "the slider's value did not change"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        (ARTIFACTS / f"{nb_path.stem}_after_slider.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.quit()
        _shut_down_kernels(base, token)  # the server serves the next chapter: free this one's kernel
