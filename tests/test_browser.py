"""The rendered book as a reader sees it: every page of the smoke-built HTML book in headless Chromium.

With the network blocked (only 127.0.0.1 resolves), each page listed in _toc.yml must load with no
console error and no request leaving the machine; equations typeset by the book's own MathJax;
figures of every chapter load and are not blank; tables have rows; widgets render from the state
papermill saved; no traceback is shown; no code block or table scrolls sideways; internal links and
citations point at pages and anchors that exist; chapters carry the "run in JupyterLab" box; the
precomputed explorers of chapters 1, 4 and 6 (``nbsupport.book.widgets.static_explorer``), opened from
``file://`` with the network blocked, show the expected state when a slider or dropdown moves.
A full-page screenshot of each page is kept under ``_build/test-artifacts/browser/``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the ``selenium``
package. Without them the tests are skipped locally, and fail when ``CI`` is set.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest
import yaml

from conftest import NOTEBOOKS, ROOT, _toc_files, skip_or_fail
from test_code_units import REQUIRED as REQUIRED_UNITS
from test_code_units import shown_units

pytestmark = pytest.mark.browser  # the slow tier: needs Chromium (and, via `site`, the smoke runs)
ARTIFACTS = ROOT / "_build" / "test-artifacts" / "browser"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
PAGE_TIMEOUT_S = 20


# ---------------------------------------------------------------------------------------------
# Finding the browser: skip locally, fail in CI
# ---------------------------------------------------------------------------------------------
def find_chromium() -> tuple[str | None, str | None, str]:
    """(chromium, chromedriver, reason) from $CHROMIUM / $CHROMEDRIVER or Debian's packages."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    reason = ""
    if missing:
        reason = (f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; "
                  "pip install -r requirements.txt)")
    return chromium, driver, reason


def require_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip (locally) or fail (CI=true) when they are missing."""
    chromium, driver, reason = find_chromium()
    if reason:
        skip_or_fail(reason)
    return chromium, driver


CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions",
                "--hide-scrollbars", "--window-size=1280,1000",
                # offline reader: nothing but the local server resolves
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def start_chromium(chromium: str, driver: str, profile: Path):
    """Headless Chromium through Selenium with console and network logs enabled, fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(PAGE_TIMEOUT_S)
    return browser


# ---------------------------------------------------------------------------------------------
# Fixtures: the smoke-built book served on 127.0.0.1, one browser for the module
# ---------------------------------------------------------------------------------------------
def toc_pages() -> list[tuple[str, bool]]:
    """(html path relative to the site root, is a notebook) for every file of _toc.yml, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    notebooks = {nb.relative_to(ROOT).with_suffix("").as_posix() for nb in NOTEBOOKS}
    pages = []
    for f in _toc_files(toc):
        stem = str(Path(f).with_suffix("")) if Path(f).suffix in (".md", ".ipynb") else f
        pages.append((f"{stem}.html", stem in notebooks))
    return pages


PAGES = toc_pages()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def site(request) -> Path:
    """The HTML book under test: the harness's smoke build, or $NBSUPPORT_BOOK_HTML (e.g. the
    `make book` output, `NBSUPPORT_BOOK_HTML=_build/html pytest tests/test_browser.py`)."""
    require_chromium()  # skip before paying for the smoke build when there is no browser
    given = os.environ.get("NBSUPPORT_BOOK_HTML")
    if given:
        path = Path(given).resolve()
        if not (path / "index.html").is_file():
            pytest.fail(f"NBSUPPORT_BOOK_HTML={given}: no index.html there (build the book first)")
        return path
    return Path(request.getfixturevalue("smoke_book"))


@pytest.fixture(scope="module")
def server(site):
    """The built book on http://127.0.0.1:<free port>/ (a reader's web server), shut down after."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = require_chromium()
    b = start_chromium(chromium, driver, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.quit()


# ---------------------------------------------------------------------------------------------
# Page loading and inspection
# ---------------------------------------------------------------------------------------------
_WAIT_READY_JS = """
const done = arguments[arguments.length - 1];
const deadline = Date.now() + arguments[0];
function widgetsPending() {
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  if (!views.length) return false;
  const rendered = document.querySelectorAll('.jupyter-widgets.widget-container, .jupyter-widgets.widget-inline-hbox, .jupyter-widgets.widget-inline-vbox, .jupyter-widgets-output-area, .jupyter-widgets.widget-box, .jupyter-widgets');
  return rendered.length === 0;
}
function imagesPending() {
  return Array.from(document.images).some(img => !img.complete);
}
function tick() {
  const mj = window.MathJax;
  const mathReady = !mj || !mj.startup || !mj.startup.promise;
  const wait = () => (Date.now() > deadline) ? done('timeout') : setTimeout(tick, 100);
  if (document.readyState !== 'complete' || widgetsPending() || imagesPending()) return wait();
  if (!mathReady) {
    mj.startup.promise.then(() => (mj.typesetPromise ? mj.typesetPromise() : null))
      .then(() => setTimeout(() => done('ok'), 300), () => done('mathjax-failed'));
    return;
  }
  setTimeout(() => done('ok'), 300);
}
tick();
"""

#: Code blocks and tables that scroll sideways (issue "pages that fit"): the element itself, or the nearest
#: ancestor that scrolls it, is wider inside than its box. Hidden (collapsed) cells are not measured.
_SIDEWAYS_JS = """
function sideways(root) {
  const out = [];
  for (const el of root.querySelectorAll('pre, table')) {
    if (!el.offsetParent) continue;
    let box = el;
    for (let a = el; a && a !== root; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if (ox === 'auto' || ox === 'scroll') { box = a; break; }
    }
    const over = box.scrollWidth - box.clientWidth;
    if (over > 1) out.push({tag: el.tagName.toLowerCase(), over: over,
                            text: el.innerText.split('\\n').sort((x, y) => y.length - x.length)[0].slice(0, 100)});
  }
  return out;
}
"""

_INSPECT_JS = _SIDEWAYS_JS + """
const main = document.querySelector('main') || document.body;
function blank(img) {
  // not blank = the image's pixels are not all (nearly) one colour
  try {
    const c = document.createElement('canvas');
    const w = c.width = Math.min(96, img.naturalWidth), h = c.height = Math.min(96, img.naturalHeight);
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0, w, h);
    const d = ctx.getImageData(0, 0, w, h).data;
    let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] < 10) continue;
      const y = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
      lo = Math.min(lo, y); hi = Math.max(hi, y);
    }
    return hi - lo < 8;
  } catch (e) { return 'unreadable: ' + e; }
}
const imgs = Array.from(main.querySelectorAll('img')).map(img => ({
  src: img.currentSrc.slice(0, 120), ok: img.complete && img.naturalWidth > 0,
  w: img.naturalWidth, h: img.naturalHeight,
  inOutput: !!img.closest('.cell_output, .output, .jupyter-widgets'),
  inWidget: !!img.closest('.jupyter-widgets'),
  blank: (img.complete && img.naturalWidth > 0) ? blank(img) : null}));
const tables = Array.from(main.querySelectorAll('table')).map(t => ({
  rows: t.querySelectorAll('tr').length, visible: t.offsetWidth > 0 && t.offsetHeight > 0,
  inOutput: !!t.closest('.cell_output, .output'),
  hidden: !!t.closest('details:not([open]), .toggle-hidden, [hidden]')}));
return {
  title: document.title,
  imgs: imgs,
  tables: tables,
  mathjax: document.querySelectorAll('mjx-container').length,
  mathErrors: Array.from(document.querySelectorAll('mjx-merror')).map(e => e.textContent).slice(0, 5),
  rawMath: Array.from(main.querySelectorAll('.math')).filter(e => !e.querySelector('mjx-container')).length,
  widgetViews: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
  widgetRoots: document.querySelectorAll('.jupyter-widgets').length,
  sliders: document.querySelectorAll('.widget-slider, .widget-hslider, .jupyter-widget-slider').length,
  errorOutputs: main.querySelectorAll('.output.error, .output.traceback, [data-mime-type="application/vnd.jupyter.error"]').length,
  text: main.innerText,
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  citations: Array.from(main.querySelectorAll('a[href*="bibliography"], span.citation a, a.reference.internal[href*="#id"]'))
    .map(a => a.getAttribute('href')),
  openLocally: !!main.querySelector('.nbsupport-open-locally'),
  sideways: sideways(main),
};
"""


def _drain_logs(browser):
    for kind in ("browser", "performance"):
        browser.get_log(kind)


def _network_problems(perf_log) -> list[str]:
    """Requests that left the machine, failed, or got an HTTP error, from Chromium's performance log."""
    urls, problems = {}, []
    for entry in perf_log:
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            parsed = urlparse(url)
            if parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname not in LOCAL_HOSTS:
                problems.append(f"request to the network: {url}")
        elif msg["method"] == "Network.responseReceived":
            status = params["response"].get("status", 0)
            if status >= 400:
                problems.append(f"HTTP {status}: {params['response']['url']}")
        elif msg["method"] == "Network.loadingFailed":
            url = urls.get(params["requestId"])
            if url and not params.get("canceled"):
                problems.append(f"failed ({params.get('errorText')}): {url}")
    return problems


def open_page(browser, url: str) -> tuple[dict, list[str], list[str], str]:
    """Load ``url`` and wait until images, MathJax and widgets are done; return
    (inspection, console errors, network problems, readiness)."""
    _drain_logs(browser)
    browser.get(url)
    browser.set_script_timeout(PAGE_TIMEOUT_S + 5)
    ready = browser.execute_async_script(_WAIT_READY_JS, PAGE_TIMEOUT_S * 1000)
    info = browser.execute_script(_INSPECT_JS)
    console = [f"{e['level']}: {e['message']}" for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    network = _network_problems(browser.get_log("performance"))
    return info, console, network, ready


def full_page_screenshot(browser, path: Path) -> None:
    """PNG of the whole page (not only the viewport): the window is made as tall as the page."""
    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    height = max(600, min(int(size["height"]), 16000))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    tmp.write_bytes(base64.b64decode(shot["data"]))
    os.replace(tmp, path)


def broken_internal_links(site: Path, page: str, hrefs: list[str]) -> list[str]:
    """Links of ``page`` that point inside the book at a missing file or a missing anchor."""
    base = f"http://book.invalid/{page}"
    broken, cache = [], {}
    for href in hrefs:
        if href.startswith(("mailto:", "javascript:")):
            continue
        target = urlparse(urljoin(base, href))
        if target.netloc != "book.invalid":
            continue  # external link: not followed (no network), only its absence of requests is checked
        path = unquote(target.path.lstrip("/")) or "index.html"
        file = site / path
        if file.is_dir():
            file = file / "index.html"
        if not file.is_file():
            broken.append(f"{href} -> missing {path}")
            continue
        if target.fragment and file.suffix == ".html":
            html = cache.setdefault(file, file.read_text(errors="replace"))
            if not re.search(r'id="%s"' % re.escape(unquote(target.fragment)), html):
                broken.append(f"{href} -> no anchor #{target.fragment} in {path}")
    return broken


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page,is_notebook", PAGES, ids=[p for p, _ in PAGES])
def test_page_renders_offline(page, is_notebook, site, server, browser):
    assert (site / page).is_file(), f"{page} (listed in _toc.yml) is missing from the built book"
    info, console, network, ready = open_page(browser, server + page)
    full_page_screenshot(browser, ARTIFACTS / (page.replace("/", "__").removesuffix(".html") + ".png"))
    problems = []
    if ready != "ok":
        problems.append(f"page not ready after {PAGE_TIMEOUT_S} s ({ready})")
    problems += [f"console {c}" for c in console]
    problems += network
    # no traceback or error output
    if info["errorOutputs"] or "Traceback (most recent call last)" in info["text"]:
        problems.append("an error/traceback output is shown")
    # math: typeset by the local MathJax, no TeX errors, no raw $...$ left
    if info["mathErrors"]:
        problems.append(f"MathJax errors: {info['mathErrors']}")
    if info["rawMath"]:
        problems.append(f"{info['rawMath']} math element(s) not typeset (MathJax did not run)")
    # figures: every image loads and is not blank; chapters show at least one output figure
    for img in info["imgs"]:
        if not img["ok"]:
            problems.append(f"image does not load: {img['src']}")
        elif img["inOutput"] and img["blank"]:
            problems.append(f"figure is blank ({img['blank']}): {img['src']}")
    if is_notebook:
        figures = [i for i in info["imgs"] if i["inOutput"] and i["ok"] and i["w"] >= 100 and i["h"] >= 100]
        if not figures:
            problems.append("chapter shows no figure")
        if not info["openLocally"]:
            problems.append('no "run this chapter in JupyterLab" box')
    # tables render with rows
    for t in info["tables"]:
        if t["rows"] == 0 or (not t["visible"] and not t["hidden"]):
            problems.append(f"table not rendered: {t}")
    # widgets render from their saved state
    if info["widgetViews"]:
        if info["widgetRoots"] < info["widgetViews"]:
            problems.append(f"{info['widgetViews']} saved widget view(s) but {info['widgetRoots']} rendered")
        widget_imgs = [i for i in info["imgs"] if i["inWidget"]]
        if any(not i["ok"] for i in widget_imgs):
            problems.append("an image inside a widget does not load")
    html = (site / page).read_text(errors="replace")
    if is_notebook and "application/vnd.jupyter.widget-view+json" in html:  # the executed notebook saved widgets
        if info["widgetRoots"] == 0:
            problems.append("saved widgets but none rendered")
        # progress bars are widgets too; sliders are expected where the saved state holds slider models
        if re.search(r"(Int|Float|FloatLog|Selection)(Range)?SliderModel", html) and not info["sliders"]:
            problems.append("saved slider widgets but no slider rendered")
    # pages that fit: no code block or table scrolls sideways at the default window width
    problems += [f"<{w['tag']}> scrolls sideways by {w['over']} px (its longest line: {w['text']!r})"
                 for w in info["sideways"]]
    # internal links and citations resolve
    problems += [f"broken link {b}" for b in broken_internal_links(site, page, info["links"])]
    if re.search(r"\{cite[:pt]*\}`", info["text"]):
        problems.append("an unresolved citation/reference is shown")
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", [nb for nb in NOTEBOOKS if nb.stem in REQUIRED_UNITS],
                         ids=[nb.stem for nb in NOTEBOOKS if nb.stem in REQUIRED_UNITS])
def test_chapter_shows_its_code_units(path, site, server, browser):
    """Each chapter shows the package code of its ideas, highlighted, with the file it comes from."""
    from selenium.webdriver.common.by import By

    units = shown_units(path)
    page = path.relative_to(ROOT).with_suffix(".html").as_posix()
    open_page(browser, server + page)
    blocks = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".cell_output div.highlight pre")]
    text = browser.find_element(By.TAG_NAME, "body").text
    for expr, unit in units:
        first = next(line for line in unit.source.splitlines() if line.strip())  # its def/class line
        assert any(first.strip() in b for b in blocks), f"{page}: code of {expr} not shown as highlighted code"
        assert unit.where in text, f"{page}: the origin of {expr} ({unit.where}) is not shown"


def test_bibliography_lists_the_papers(site, server, browser):
    page = next((p for p, _ in PAGES if p.endswith("bibliography.html")), None)
    if page is None:
        pytest.fail("_toc.yml has no bibliography page (book/bibliography.md)")
    info, console, network, ready = open_page(browser, server + page)
    text = info["text"]
    for author, year in [("Delbrouck", "2020"), ("Dai", "2021"), ("Bahdanau", "2015"), ("Vaswani", "2017"),
                         ("Tsai", "2019"), ("Zadeh", "2018"), ("Busso", "2008")]:
        assert re.search(rf"{author}.*{year}", text, re.S), f"bibliography lacks {author} {year}"


def test_book_opens_from_disk_without_a_server(site, tmp_path_factory):
    """An offline reader opening _build/html/... from disk (file://) sees equations and widgets too."""
    chromium, driver = require_chromium()
    page = next((p for p, is_nb in PAGES if is_nb), None)
    if page is None:
        pytest.skip("no chapter notebook in _toc.yml")
    b = start_chromium(chromium, driver, tmp_path_factory.mktemp("chromium-file-profile"))
    try:
        info, console, network, ready = open_page(b, (site / page).resolve().as_uri())
    finally:
        b.quit()
    assert ready == "ok" and not console, f"file:// {page}: {ready} {console}"
    assert not [n for n in network if "request to the network" in n], network
    assert info["mathjax"] > 0 or not info["rawMath"]
    if info["widgetViews"]:
        assert info["widgetRoots"] >= info["widgetViews"]


# ---------------------------------------------------------------------------------------------
# Explorers without a kernel (nbsupport.book.widgets.static_explorer): precomputed states switched in the page
# ---------------------------------------------------------------------------------------------
_EXPLORER_JS = """
const root = document.querySelectorAll('.nbsupport-explorer')[arguments[0]];
if (!root) return null;
const img = root.querySelector('img.nbx-image');
const data = JSON.parse(root.querySelector('script.nbx-data').textContent);
return {src: img.getAttribute('src'), alt: img.getAttribute('alt'), ready: root.getAttribute('data-ready'),
        caption: root.querySelector('.nbx-caption').textContent, state: root.getAttribute('data-state'),
        captions: data.captions, n: document.querySelectorAll('.nbsupport-explorer').length,
        stateSrc: 'data:' + data.mime + ';base64,'
                  + data.images[data.state_image[+root.getAttribute('data-state')]],
        ranges: Array.from(root.querySelectorAll('input[type=range]')).map(r => r.getAttribute('aria-label')),
        selects: Array.from(root.querySelectorAll('select')).map(s => s.getAttribute('aria-label'))};
"""


def explorer_state(browser, index: int = 0) -> dict | None:
    """What the ``index``-th static explorer of the page shows now: image src, caption, state index."""
    return browser.execute_script(_EXPLORER_JS, index)


def move(browser, index: int, axis: str, key=None, option: str | None = None) -> None:
    """As a reader does: focus the explorer's slider ``axis`` and press ``key``, or pick ``option`` in its
    dropdown (a keyboard/mouse event, not a script setting the value)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root = browser.find_elements(By.CSS_SELECTOR, ".nbsupport-explorer")[index]
    control = root.find_element(By.CSS_SELECTOR, f'[aria-label="{axis}"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", control)
    if option is None:
        control.send_keys(key)
    else:
        Select(control).select_by_visible_text(option)


def _pixel(src: str, xy=(30, 30)):
    import io

    from PIL import Image

    assert src.startswith("data:image/"), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB").getpixel(xy)


def test_sideways_check_finds_the_block_and_the_table_that_scroll(tmp_path):
    """The page check of the rendered chapters, on a page built to fail it: of two code blocks and two
    tables in an 80-character column, the long line and the wide table scroll sideways, the others fit."""
    chromium, driver = require_chromium()
    long, short = "x = " + "1 + " * 40 + "1", "x = 1"
    cells = "".join(f"<td>{i}</td>" for i in range(60))
    page = tmp_path / "wide.html"
    page.write_text(f"""<!doctype html><html><body><main style="width: 80ch; font-family: monospace">
<div class="highlight"><pre style="overflow-x: auto">{long}</pre></div>
<div class="highlight"><pre style="overflow-x: auto">{short}</pre></div>
<div style="overflow-x: auto"><table><tr>{cells}</tr></table></div>
<div style="overflow-x: auto"><table><tr><td>66.7 %</td></tr></table></div>
</main></body></html>""")
    b = start_chromium(chromium, driver, tmp_path / "profile")
    try:
        b.get(page.as_uri())
        found = b.execute_script(_SIDEWAYS_JS + "return sideways(document.querySelector('main'));")
    finally:
        b.quit()
    assert [(w["tag"], w["text"]) for w in found] == [("pre", long[:100]),
                                                       ("table", "\t".join(map(str, range(60)))[:100])]
    assert all(w["over"] > 1 for w in found)


def test_static_explorer_switches_states_from_file_offline(tmp_path):
    """A synthetic explorer whose states are solid colours: opened from file:// with the network
    blocked, each key press / dropdown pick shows the picture of the expected state."""
    chromium, driver = require_chromium()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from selenium.webdriver.common.keys import Keys

    from nbsupport.book.widgets import static_explorer

    def colour(a, b):  # the test's reference
        return (40 + 60 * a, 200 - 80 * b, 100)

    def draw(a, b):
        fig = plt.figure(figsize=(1, 1))
        fig.patch.set_facecolor([c / 255 for c in colour(a, b)])
        return fig, f"sum {a + b}"

    page = static_explorer(draw, {"a": [0, 1, 2], "b": [("x", 0), ("y", 1)]}, start={"a": 1},
                           progress=False).save_html(tmp_path / "explorer.html")
    b = start_chromium(chromium, driver, tmp_path / "profile")
    try:
        info, console, network, ready = open_page(b, page.as_uri())
        assert ready == "ok" and not console and not network, (ready, console, network)
        seen = []
        for step, expected in [(None, (1, 0)), ((("a", Keys.ARROW_RIGHT),), (2, 0)),
                               ((("b", None, "y"),), (2, 1)), ((("a", Keys.HOME),), (0, 1)),
                               ((("a", Keys.ARROW_RIGHT), ("b", None, "x")), (1, 0))]:
            for args in step or ():
                move(b, 0, *args)
            now = explorer_state(b)
            a_, b_ = expected
            assert now["ready"] == "1", "the explorer's script did not run"
            assert now["caption"] == now["alt"] == f"a {a_}, b {'xy'[b_]}: sum {a_ + b_}", now["caption"]
            pixel = _pixel(now["src"])
            assert max(abs(p - q) for p, q in zip(pixel, colour(a_, b_))) <= 2, (expected, now["caption"], pixel)
            seen.append(now["src"])
        assert seen[0] == seen[-1] and len(set(seen)) == 4
        assert not [e for e in b.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        b.quit()


# the key words and their angles on Chapter 1's plane (the test's own copy: the reference is hand arithmetic)
_KEYS = {"joy": 20, "delight": 35, "calm": 90, "table": 180, "fear": 250, "dread": 265, "anger": 310}


def _check_ch1(state: dict) -> tuple[float, float]:
    """Chapter 1's caption against softmax(q.k / sqrt(2) / T) computed here by hand; returns (angle, T)."""
    import numpy as np

    m = re.fullmatch(r"query angle ([\d.]+)°, temperature ([\d.]+): largest weight ([\d.]+) on '(\w+)'",
                     state["caption"])
    assert m, f"chapter 1 caption not understood: {state['caption']!r}"
    angle, t = float(m[1]), float(m[2])
    scores = np.cos(np.deg2rad(angle - np.array(list(_KEYS.values())))) / np.sqrt(2) / t
    w = np.exp(scores - scores.max())
    w /= w.sum()
    assert abs(float(m[3]) - w.max()) <= 0.006 and m[4] == list(_KEYS)[int(w.argmax())], (state["caption"], w)
    return angle, t


def _check_ch6(state: dict) -> tuple[str, float, float, float]:
    """Chapter 6's caption: (utterance, top_p, extractor M MACs, implied dense M MACs = MACs / share)."""
    m = re.fullmatch(r"utterance (.+), top_p ([\d.]+): extractor ([\d.]+) M MACs \((\d+)% of dense\)",
                     state["caption"])
    assert m, f"chapter 6 caption not understood: {state['caption']!r}"
    return m[1], float(m[2]), float(m[3]), float(m[3]) / (int(m[4]) / 100)


def _shown_state(browser, before: dict | None = None) -> dict:
    """The explorer's state now; the picture is the precomputed picture of the captioned state and,
    when ``before`` is given, differs from the one shown before the move."""
    now = explorer_state(browser)
    assert now and now["ready"] == "1", "the explorer's script did not run"
    assert now["caption"] == now["alt"] == now["captions"][int(now["state"])]
    assert now["src"] == now["stateSrc"], "the picture is not the one of the captioned state"
    if before is not None:
        assert now["caption"] != before["caption"], "moving the control did not change the state"
        assert now["src"] != before["src"], f"the picture did not change ({before['caption']} -> {now['caption']})"
    return now


@pytest.mark.parametrize("chapter", ["01_attention_basics", "04_umons_multimodal", "06_mesm"])
def test_chapter_explorer_works_without_kernel(chapter, site, tmp_path):
    """The chapter page opened from file:// with the network blocked: moving the precomputed explorer's
    slider or dropdown shows the expected state (caption numbers checked against hand arithmetic)."""
    from selenium.webdriver.common.keys import Keys

    chromium, driver = require_chromium()
    page = next(p for p, _ in PAGES if p.endswith(f"{chapter}.html"))
    b = start_chromium(chromium, driver, tmp_path / "profile")
    try:
        info, console, network, ready = open_page(b, (site / page).resolve().as_uri())
        assert ready == "ok" and not console and not network, (ready, console, network)
        first = _shown_state(b)
        assert first["n"] == 1, f"{page}: {first['n']} precomputed explorers, expected 1"
        # in the rendered book the live ipywidgets twin (its sliders need a kernel) is hidden
        hidden = b.execute_script("return Array.from(document.querySelectorAll('.nbsupport-live-only'))"
                                  ".map(e => getComputedStyle(e).display)")
        assert hidden and set(hidden) == {"none"}, f"live widget twin not hidden in the book: {hidden}"
        if chapter == "01_attention_basics":
            assert first["ranges"] == ["query angle", "temperature"]
            angle0, t0 = _check_ch1(first)
            move(b, 0, "temperature", Keys.ARROW_RIGHT)
            now = _shown_state(b, first)
            angle1, t1 = _check_ch1(now)
            assert angle1 == angle0 and t1 > t0
            move(b, 0, "query angle", Keys.ARROW_RIGHT)
            angle2, t2 = _check_ch1(_shown_state(b, now))
            assert angle2 > angle1 and t2 == t1
        elif chapter == "04_umons_multimodal":
            assert first["selects"] == ["utterance"] and first["ranges"] == ["layer"]
            options = b.execute_script("return Array.from(document.querySelectorAll('.nbsupport-explorer select "
                                       "option')).map(o => o.textContent)")
            assert first["caption"] == f"utterance {options[0]}, layer 1"
            move(b, 0, "utterance", option=options[1])
            now = _shown_state(b, first)
            assert now["caption"] == f"utterance {options[1]}, layer 1"
            layers = 1 + b.execute_script(
                "return +document.querySelector('.nbsupport-explorer input[type=range]').max")
            if layers > 1:
                move(b, 0, "layer", Keys.END)
                assert _shown_state(b, now)["caption"] == f"utterance {options[1]}, layer {layers}"
        else:
            assert first["selects"] == ["utterance"] and first["ranges"] == ["top_p"]
            utt, p0, macs0, dense0 = _check_ch6(first)
            move(b, 0, "top_p", Keys.ARROW_LEFT)
            utt1, p1, macs1, dense1 = _check_ch6(_shown_state(b, first))
            move(b, 0, "top_p", Keys.END)
            utt2, p2, macs2, dense2 = _check_ch6(_shown_state(b))
            assert utt1 == utt2 == utt and p1 < p0 < p2 == 1.0
            assert macs1 <= macs0 <= macs2, "fewer kept sites must not cost more MACs"
            # the dense cost of an utterance does not depend on top_p (share rounded to 1 %)
            assert max(dense0, dense1, dense2) / min(dense0, dense1, dense2) < 1.02, (dense0, dense1, dense2)
            options = b.execute_script("return Array.from(document.querySelectorAll('.nbsupport-explorer select "
                                       "option')).map(o => o.textContent)")
            move(b, 0, "utterance", option=options[1])
            assert _check_ch6(_shown_state(b))[:2] == (options[1], 1.0)
        assert not [e for e in b.get_log("browser") if e["level"] == "SEVERE"]
        assert not _network_problems(b.get_log("performance"))
        full_page_screenshot(b, ARTIFACTS / f"{chapter}__explorer.png")
    finally:
        b.quit()
