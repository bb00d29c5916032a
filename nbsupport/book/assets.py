"""Offline JavaScript assets of the rendered book (MathJax, RequireJS, the ipywidgets HTML manager).

Jupyter Book 1.x (Sphinx + myst-nb) loads MathJax 3, RequireJS and
``@jupyter-widgets/html-manager`` from public CDNs by default. Readers of this book may be offline
and our build machines have no network at read time, so the equations and the saved widget states
of the chapters (chapter 1's attention widgets and every later chapter with a slider) would not
render. the Design page, "Rendering without a network": fetch those scripts once, at install time, from the npm
registry (reachable then) and serve them from the book's own ``book/_static/offline``; ``_config.yml``
points Sphinx's ``mathjax_path`` and myst-nb's ``nb_ipywidgets_js`` at them.

Run by ``make install``::

    python -m nbsupport.book.assets book/_static          # fetch what is missing (idempotent)
    python -m nbsupport.book.assets book/_static --check  # no network: exit 1 if something is missing

Each package is fetched with ``npm pack`` (the registry npm is configured for, never a hard-coded
CDN host), its tarball is checked against the pinned sha512 integrity, the files the book needs are
extracted into a temporary folder next to the destination and renamed into place, so a reader never
sees a half-written asset folder. A package whose stamp file matches its pinned spec is skipped.

Why hand-written: no pip package ships these browser bundles at the versions myst-nb expects, and
the Sphinx/Jupyter Book tool chain has no "vendor the CDN scripts" option.

Note: ``@jupyter-widgets/html-manager`` 1.0.x bundles ``@jupyter-widgets/base``, ``controls`` and
``output`` inside ``embed-amd.js`` (its ``loadClass`` resolves them from the bundle), so saved states
of the standard ipywidgets never reach the ``data-jupyter-widgets-cdn`` fallback; that attribute is
pointed at the local, empty ``offline/widgets-cdn/`` so that a third-party widget fails visibly
instead of silently reaching out to jsDelivr.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from nbsupport.base import atomic_write_text

__all__ = ["VendorPackage", "PACKAGES", "ensure_assets", "missing_assets", "AssetError", "main", "setup",
           "open_locally_html", "results_table_html"]

#: Folder (under the static dir) that holds every vendored package.
VENDOR = "offline"
#: Name of the stamp file written last into each package folder.
STAMP = ".npm-package.json"


class AssetError(RuntimeError):
    """Fetching or unpacking a book asset failed; the message names the package and the cause."""


@dataclass(frozen=True)
class VendorPackage:
    """One npm package the rendered book serves locally.

    ``spec`` is the exact npm spec (``name@version``), ``integrity`` the registry's sha512 SRI
    string of its tarball, ``dest`` the folder under ``<static>/offline``, ``include`` the paths
    inside the package (files or folders, relative to ``package/``) that are copied,
    ``strip`` a prefix removed from those paths in the destination, ``exclude`` file-name
    suffixes never copied (source maps, non-AMD bundles), and ``required`` the files that must
    exist for the package to count as installed.
    """

    spec: str
    integrity: str
    dest: str
    include: tuple[str, ...]
    required: tuple[str, ...]
    strip: str = ""
    exclude: tuple[str, ...] = ()


PACKAGES: tuple[VendorPackage, ...] = (
    # MathJax 3: the combined TeX -> CommonHTML component, its woff fonts, and the lazily loaded
    # parts (TeX extensions autoloaded by macros like \boldsymbol, the menu, assistive MathML).
    VendorPackage(
        spec="mathjax@3.2.2",
        integrity="sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        dest="mathjax",
        include=("es5/tex-chtml.js", "es5/output/chtml/fonts", "es5/input/tex/extensions",
                 "es5/ui", "es5/a11y", "es5/adaptors"),
        strip="es5/",
        required=("tex-chtml.js", "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff"),
    ),
    # RequireJS: the AMD loader the widget manager needs.
    VendorPackage(
        spec="requirejs@2.3.8",
        integrity="sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
        dest="requirejs",
        include=("require.js",),
        required=("require.js",),
    ),
    # The ipywidgets 8 HTML manager (matches ipywidgets 8.1.x: controls 2.0.0 / base 2.0.0 state).
    # embed-amd.js finds its font files relative to its own URL (webpack public path).
    VendorPackage(
        spec="@jupyter-widgets/html-manager@1.0.15",
        integrity="sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        dest="html-manager",
        include=("dist",),
        # libembed-amd.js is also defined inside embed-amd.js: not needed twice
        exclude=(".map", "/embed.js", ".LICENSE.txt", "/libembed-amd.js"),
        required=("dist/embed-amd.js",),
    ),
    # Font Awesome 4: matplotlib's ``to_jshtml`` animations (the kernel-free sliders of the chapters)
    # link its CSS from maxcdn for their play/step buttons; pages are rewritten to this copy.
    VendorPackage(
        spec="font-awesome@4.7.0",
        integrity="sha512-U6kGnykA/6bFmg1M/oT9EkFeIYv7JlX3bozwQJWiiLz6L0w3F5vBVPxHlwyX/vtNq1ckcpRKOB9f2Qal/VtFpg==",
        dest="font-awesome",
        include=("css/font-awesome.min.css", "fonts"),
        required=("css/font-awesome.min.css", "fonts/fontawesome-webfont.woff2"),
    ),
)

#: CDN URLs found in notebook outputs, rewritten to the local copies (path under the static dir).
CDN_REWRITES = {
    "https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/css/font-awesome.min.css":
        f"{VENDOR}/font-awesome/css/font-awesome.min.css",
}

#: Loaded between require.js and embed-amd.js (``nb_ipywidgets_js`` in _config.yml). Two fixes, both
#: measured in headless Chromium: (1) embed-amd.js's modules locate their font files from their
#: RequireJS module URL, which without a ``paths`` entry resolves next to the *page*
#: (book/@jupyter-widgets/...: 404s); (2) the widget labels call MathJax 2's ``MathJax.Hub.Queue``,
#: which MathJax 3 does not have (TypeError on every slider of a page with equations).
WIDGETS_SETUP = "widgets-setup.js"
_WIDGETS_SETUP_JS = """// Written by `python -m nbsupport.book.assets` (nbsupport/bookassets.py); do not edit.
(function () {
  var here = document.currentScript && document.currentScript.src;
  if (window.require && here) {
    var dist = new URL("html-manager/dist", here).href;
    window.require.config({paths: {"@jupyter-widgets/html-manager/dist": dist}});
  }
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    if (mj && !mj.Hub && mj.typesetPromise) {
      mj.Hub = {Queue: function (cmd) {
        var el = cmd && cmd[2];
        var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
        ready.then(function () { return mj.typesetPromise(el ? [el] : undefined); })
             .catch(function (e) { console.warn("MathJax typeset of a widget label failed", e); });
      }};
    }
  });
})();
"""

#: Local stand-in for ``data-jupyter-widgets-cdn`` (see the module docstring).
WIDGETS_CDN_DIR = "widgets-cdn"
_WIDGETS_CDN_README = (
    "Local stand-in for the jsDelivr CDN used by @jupyter-widgets/html-manager for widget modules\n"
    "it does not bundle. The book only uses the standard ipywidgets (bundled in embed-amd.js), so\n"
    "this folder is empty on purpose: a third-party widget would need its AMD bundle placed at\n"
    "widgets-cdn/<package>@<version>/dist/index.js. Written by `python -m nbsupport.book.assets`.\n"
)


def _stamp_ok(folder: Path, pkg: VendorPackage) -> bool:
    """True when ``folder`` holds a complete copy of ``pkg`` (stamp matches, required files exist)."""
    stamp = folder / STAMP
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if info.get("spec") != pkg.spec or info.get("integrity") != pkg.integrity:
        return False
    return all((folder / r).is_file() and (folder / r).stat().st_size > 0 for r in pkg.required)


def missing_assets(static_dir: str | os.PathLike, packages: Sequence[VendorPackage] = PACKAGES) -> list[str]:
    """Specs of the packages not (completely) present under ``<static_dir>/offline`` (:data:`VENDOR`); no network."""
    vendor = Path(static_dir) / VENDOR
    missing = [p.spec for p in packages if not _stamp_ok(vendor / p.dest, p)]
    if not (vendor / WIDGETS_CDN_DIR / "README.txt").is_file():
        missing.append(WIDGETS_CDN_DIR)
    setup_js = vendor / WIDGETS_SETUP
    if not setup_js.is_file() or setup_js.read_text() != _WIDGETS_SETUP_JS:
        missing.append(WIDGETS_SETUP)
    return missing


def _sri_sha512(path: Path) -> str:
    """Subresource-integrity string (``sha512-<base64>``) of a file, as npm's registry records it."""
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_pack(pkg: VendorPackage, into: Path, npm: str) -> Path:
    """Download ``pkg``'s tarball with ``npm pack`` into ``into`` and check its integrity."""
    exe = shutil.which(npm)
    if exe is None:
        raise AssetError(
            f"book asset {pkg.spec}: the npm client '{npm}' is not installed (needed once, at install "
            "time, to fetch MathJax/RequireJS/ipywidgets for the offline book; apt-get install npm)")
    cmd = [exe, "pack", pkg.spec, "--pack-destination", str(into), "--json", "--loglevel=error"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssetError(f"book asset {pkg.spec}: `{' '.join(cmd)}` failed ({proc.returncode}):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError) as exc:
        raise AssetError(f"book asset {pkg.spec}: unexpected `npm pack --json` output: "
                         f"{proc.stdout[:500]!r}") from exc
    # npm >= 9 writes scoped names as "jupyter-widgets-html-manager-1.0.15.tgz"
    tarball = into / filename
    if not tarball.is_file():
        candidates = sorted(into.glob("*.tgz"))
        if len(candidates) != 1:
            raise AssetError(f"book asset {pkg.spec}: npm pack did not leave one tarball in {into}")
        tarball = candidates[0]
    got = _sri_sha512(tarball)
    if got != pkg.integrity:
        raise AssetError(f"book asset {pkg.spec}: tarball integrity {got} does not match the pinned "
                         f"{pkg.integrity} (nbsupport/bookassets.py PACKAGES)")
    return tarball


def _wanted(member: str, pkg: VendorPackage) -> str | None:
    """Destination path of a tarball member (``package/...``) or None when it is not copied."""
    if not member.startswith("package/"):
        return None
    rel = member[len("package/"):]
    if any(rel.endswith(sfx) or ("/" + rel).endswith(sfx) for sfx in pkg.exclude):
        return None
    for inc in pkg.include:
        if rel == inc or rel.startswith(inc.rstrip("/") + "/"):
            return rel[len(pkg.strip):] if pkg.strip and rel.startswith(pkg.strip) else rel
    return None


def _install_one(pkg: VendorPackage, vendor: Path, npm: str) -> Path:
    """Fetch, verify, extract and atomically rename one package into ``vendor/<dest>``."""
    final = vendor / pkg.dest
    with tempfile.TemporaryDirectory(prefix=".bookassets-", dir=vendor) as tmp:
        tmp = Path(tmp)
        tarball = _npm_pack(pkg, tmp, npm)
        staging = tmp / "staging"
        staging.mkdir()
        n_files = 0
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                rel = _wanted(member.name, pkg)
                if rel is None:
                    continue
                target = (staging / rel).resolve()
                if staging.resolve() not in target.parents:  # no '..' escapes from the tarball
                    raise AssetError(f"book asset {pkg.spec}: unsafe path {member.name!r} in tarball")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                n_files += 1
        for req in pkg.required:
            if not (staging / req).is_file():
                raise AssetError(f"book asset {pkg.spec}: required file {req!r} is not in the tarball")
        stamp = {"spec": pkg.spec, "integrity": pkg.integrity, "files": n_files}
        (staging / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        # swap in: old copy (if any) moves aside first, then the staging folder is renamed
        old = tmp / "old"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
    return final


def ensure_assets(static_dir: str | os.PathLike, *, npm: str = "npm", force: bool = False,
                  packages: Sequence[VendorPackage] = PACKAGES, quiet: bool = False) -> list[Path]:
    """Make ``<static_dir>/offline`` (:data:`VENDOR`) hold every package of ``PACKAGES``; return the folders fetched.

    Idempotent: a package already present (stamp matches the pinned spec and integrity) is skipped
    without network access unless ``force``. Used by ``make install``; the rendered chapters load
    MathJax and the ipywidgets manager from these folders (the Design page, "Rendering without a network").
    """
    static = Path(static_dir)
    if static.exists() and not static.is_dir():
        raise AssetError(f"static_dir {static} exists and is not a folder")
    vendor = static / VENDOR
    vendor.mkdir(parents=True, exist_ok=True)
    fetched = []
    for pkg in packages:
        if not force and _stamp_ok(vendor / pkg.dest, pkg):
            continue
        if not quiet:
            print(f"bookassets: fetching {pkg.spec} -> {vendor / pkg.dest}", file=sys.stderr)
        fetched.append(_install_one(pkg, vendor, npm))
    cdn = vendor / WIDGETS_CDN_DIR
    cdn.mkdir(exist_ok=True)

    for path, text in ((cdn / "README.txt", _WIDGETS_CDN_README), (vendor / WIDGETS_SETUP, _WIDGETS_SETUP_JS)):
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return fetched



# --------------------------------------------------------------------------------------------
# Sphinx extension (listed in _config.yml, sphinx.extra_extensions)
# --------------------------------------------------------------------------------------------
def _check_assets(app) -> None:
    """builder-inited: stop an HTML build whose offline assets are missing (they would not render)."""
    from sphinx.errors import ExtensionError  # local: only the book build loads Sphinx

    if app.builder.format != "html" or "://" in str(app.config.mathjax_path):
        return
    for entry in app.config.html_static_path:
        static = Path(app.confdir) / entry
        if (static / VENDOR).is_dir() or static.name == "_static":
            missing = missing_assets(static)
            if missing:
                raise ExtensionError(
                    f"offline book assets missing under {static / VENDOR}: {', '.join(missing)}; run "
                    f"`python -m nbsupport.book.assets {entry}` (part of `make install`)")
            return


def open_locally_html(source: str) -> str:
    """HTML of the "run this chapter" box for the notebook at repository path ``source``.

    Every notebook page of the book gets it (use 2 on the Design page: open the chapter in
    JupyterLab and move its widgets); the link assumes ``jupyter lab`` started at the repository
    root on its default port.
    """
    src = html.escape(source)
    return (
        '<div class="admonition tip nbsupport-open-locally">'
        '<p class="admonition-title">Run this chapter in JupyterLab</p>'
        f"<p>From the repository root: <code>make install</code>, then <code>.venv/bin/jupyter lab {src}</code> "
        "(the widgets need a live kernel). With JupyterLab already running there on its default port: "
        f'<a class="reference external" href="http://localhost:8888/lab/tree/{src}">open {src}</a>. '
        f"Parameterised runs: <code>.venv/bin/papermill {src} out.ipynb -p smoke True</code>.</p></div>"
    )


def _rewrite_cdn_links(app, pagename, templatename, context, doctree) -> None:
    """html-page-context: point CDN links left in notebook outputs (:data:`CDN_REWRITES`) at ``_static``."""
    body = context.get("body")
    if not body:
        return
    for url, local in CDN_REWRITES.items():
        if url in body:
            body = body.replace(url, context["pathto"](f"_static/{local}", 1))
    context["body"] = body


def _dedupe_assets(app, pagename, templatename, context, doctree) -> None:
    """html-page-context (late): drop repeated script/style entries.

    Sphinx 7.4 re-adds assets registered after ``Builder.init()`` with filename ``''`` instead of
    ``None``, so inline scripts (sphinx-thebe's ``const THEBE_JS_URL``) appear twice and the second
    copy throws "Identifier has already been declared" in the browser.
    """
    for key in ("script_files", "css_files"):
        assets = context.get(key)
        if not assets:
            continue
        seen, kept = set(), []
        for asset in assets:
            ident = (getattr(asset, "filename", asset) or "", getattr(asset, "priority", 0),
                     tuple(sorted((getattr(asset, "attributes", {}) or {}).items())))
            if ident not in seen:
                seen.add(ident)
                kept.append(asset)
        context[key] = kept


def _add_open_locally(app, pagename, templatename, context, doctree) -> None:
    """html-page-context: insert the "run this chapter" box after the title of notebook pages."""
    if doctree is None or "body" not in context:
        return
    try:
        source = Path(app.env.doc2path(pagename))
    except Exception:  # pragma: no cover - page without a source (genindex, search)
        return
    if source.suffix != ".ipynb":
        return
    rel = source.resolve().relative_to(Path(app.srcdir).resolve()).as_posix()
    body = context["body"]
    cut = body.find("</h1>")
    cut = cut + len("</h1>") if cut >= 0 else 0
    context["body"] = body[:cut] + open_locally_html(rel) + body[cut:]



def results_table_html(data, key: str | None = None, columns: Sequence[str] | None = None,
                       floatfmt: str = "{:.3g}") -> str:
    """HTML table of benchmark/experiment records (list of dicts, or a dict holding one under ``key``,
    ``"results"``, ``"rows"`` or ``"records"``): the measured numbers the Performance page shows."""
    records = data
    if isinstance(data, dict):
        keys = [key] if key else ["results", "rows", "records"]
        for k in keys:
            if isinstance(data.get(k), list):
                records = data[k]
                break
        else:
            raise AssetError(f"results JSON has no list of records under {keys} (got keys {sorted(data)})")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise AssetError("results JSON must hold a list of records (dicts)")
    frame = pd.json_normalize(records)
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    table = frame.to_html(index=False, border=0, classes="table nbsupport-results",
                          float_format=lambda v: floatfmt.format(v), na_rep="")
    # scrolls inside its own box instead of widening the page (pydata theme's table container)
    return f'<div class="pst-scrollable-table-container" style="overflow-x: auto">{table}</div>'



def _results_directive():
    """The ``{nbsupport-results}`` directive: image + table of a benchmark's committed results.

    Usage in MyST (book/performance.md)::

        ```{nbsupport-results} ../benchmarks/results/sparse_vs_dense.json
        :image: ../benchmarks/results/sparse_vs_dense.png
        :columns: backend, sites, seconds
        ```

    Paths are relative to the page. A missing file gives a visible note ("run `make benchmarks`")
    instead of failing the book build; the browser test checks the figure when results exist.
    """
    # local: docutils is Sphinx's, loaded only by the book build (a notebook that imports
    # this module for its HTML helpers does not pay for it)
    from docutils import nodes
    from docutils.parsers.rst import Directive, directives

    class NbsupportResults(Directive):
        required_arguments = 1
        option_spec = {"image": directives.unchanged, "columns": directives.unchanged,
                       "key": directives.unchanged, "alt": directives.unchanged}

        def run(self):
            env = self.state.document.settings.env
            docdir = Path(env.doc2path(env.docname)).parent
            out = []
            image = self.options.get("image")
            if image:
                if (docdir / image).is_file():
                    out.append(nodes.image(uri=image, alt=self.options.get("alt", "benchmark results")))
                    env.note_dependency(str((docdir / image).resolve()))
                else:
                    out.append(self._missing(image))
            source = docdir / self.arguments[0]
            if source.is_file():
                env.note_dependency(str(source.resolve()))
                try:
                    data = json.loads(source.read_text())
                    cols = [c.strip() for c in self.options.get("columns", "").split(",") if c.strip()]
                    html_table = results_table_html(data, self.options.get("key"), cols or None)
                except (ValueError, KeyError, AssetError) as exc:
                    raise self.error(f"nbsupport-results: cannot read {self.arguments[0]}: {exc}")
                out.append(nodes.raw("", html_table, format="html"))
            else:
                out.append(self._missing(self.arguments[0]))
            return out

        def _missing(self, rel):
            note = nodes.admonition(classes=["note", "nbsupport-results-missing"])
            note += nodes.title(text="Benchmark results not found")
            note += nodes.paragraph(text=f"{rel} is not there yet: run `make benchmarks` and rebuild the book.")
            return note

    return NbsupportResults


def setup(app):
    """Sphinx entry point: asset check at build start, "run in JupyterLab" box on notebook pages."""
    app.connect("builder-inited", _check_assets)
    app.connect("html-page-context", _rewrite_cdn_links)
    app.connect("html-page-context", _add_open_locally)
    # after myst-nb has added the page's widget scripts (default priority 500)
    app.connect("html-page-context", _dedupe_assets, priority=900)
    app.add_directive("nbsupport-results", _results_directive())
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}


def main(argv: Iterable[str] | None = None) -> int:
    """Command line: ``python -m nbsupport.book.assets STATIC_DIR [--check] [--force] [--npm NPM]``."""
    parser = argparse.ArgumentParser(prog="python -m nbsupport.book.assets", description=__doc__.split("\n")[0])
    parser.add_argument("static_dir", help="the book's static folder, e.g. book/_static")
    parser.add_argument("--check", action="store_true", help="only report missing assets (no network); exit 1 if any")
    parser.add_argument("--force", action="store_true", help="fetch again even when present")
    parser.add_argument("--npm", default=os.environ.get("NPM", "npm"), help="npm client to use (default: npm)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.check:
        missing = missing_assets(args.static_dir)
        if missing:
            print(f"bookassets: missing under {args.static_dir}/{VENDOR}: {', '.join(missing)} "
                  f"(run `python -m nbsupport.book.assets {args.static_dir}`)", file=sys.stderr)
            return 1
        return 0
    try:
        ensure_assets(args.static_dir, npm=args.npm, force=args.force)
    except AssetError as exc:
        print(f"bookassets: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
