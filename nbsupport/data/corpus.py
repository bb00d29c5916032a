"""The book's corpus: the user's real data when given, else a cached synthetic corpus (Chapter 2)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from nbsupport.base import atomic_write_text

from . import synth
from .common import DataError
from .datasets import FEATURE_VERSION

__all__ = ["ensure_corpus", "corpus_cache_root", "data_version", "guard_book_cache"]


def corpus_cache_root() -> Path:
    """Where synthetic corpora are cached: ``$NBSUPPORT_DATA`` or ``<repo>/data_cache``."""
    env = os.environ.get("NBSUPPORT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data_cache"


def ensure_corpus(root=None, n: int = 600, seed: int = 0, style: str = "mosei", *, progress: bool = True,
                  **knobs) -> Path:
    """Return a corpus folder in the MESM raw layout (Chapter 2; every later chapter starts here).

    With ``root`` (a non-empty path) it is returned after checking that it holds the layout of
    ``style`` (``MOSEI_RAW_PROCESSED`` or ``IEMOCAP_RAW_PROCESSED``): real data drops in this way.
    Otherwise a synthetic corpus of ``n`` utterances is generated once with
    :func:`nbsupport.data.synth.generate_corpus` and cached under :func:`corpus_cache_root`; the cache
    key holds ``n``, ``seed``, ``style``, the generator version and any non-default ``knobs``.
    """
    if style not in synth.STYLES:
        raise DataError(f"unknown style {style!r}; expected one of {', '.join(synth.STYLES)}")
    prefix = "MOSEI" if style == "mosei" else "IEMOCAP"
    if root not in (None, ""):
        root = Path(root)
        if not (root / f"{prefix}_RAW_PROCESSED").is_dir():
            raise DataError(f"{root}: data_root has no {prefix}_RAW_PROCESSED/ folder (MESM raw layout expected)")
        return root
    defaults = synth.SynthConfig()
    changed = {k: v for k, v in sorted(knobs.items()) if getattr(defaults, k, object()) != v}
    tag = f"synth-{style}-n{n}-s{seed}-v{synth.GENERATOR_VERSION}"
    if changed:
        tag += "-" + hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = corpus_cache_root() / tag
    if (out / "synth_info.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return synth.generate_corpus(out, n, seed, style, progress=progress, overwrite=out.exists(), **knobs)


def data_version() -> str:
    """Version of the synthetic corpus generator and of the cached features, which every executed
    chapter depends on (Chapter 2's data contract)."""

    return f"synth{synth.GENERATOR_VERSION}-features{FEATURE_VERSION}"


def guard_book_cache(cache_dir) -> bool:
    """Drop Jupyter Book's execution cache ``cache_dir`` when :func:`data_version` changed since it was filled.

    jupyter-cache keys a notebook by its code only, so a chapter whose code did not change would keep
    outputs computed on the previous corpus. ``make book`` calls this first; the version is stamped in
    ``<cache_dir>.data_version`` (written atomically). Returns True when a cache was dropped.
    """

    cache = Path(cache_dir)
    stamp = cache.with_name(cache.name + ".data_version")
    now = data_version()
    if stamp.is_file() and stamp.read_text().strip() == now:
        return False
    dropped = cache.exists()
    if dropped:
        shutil.rmtree(cache)
        print(f"{cache}: dropped (data version is now {now}; executed chapters were computed on older data)")
    atomic_write_text(stamp, now + "\n")
    return dropped
