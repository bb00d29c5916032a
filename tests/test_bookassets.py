"""nbsupport.book.assets: offline asset bookkeeping, tarball filtering and the results table (no network)."""
import base64
import hashlib
import json

import pytest

from nbsupport.book import assets as ba


def test_sri_matches_hashlib(tmp_path):
    f = tmp_path / "x.tgz"
    f.write_bytes(b"some tarball bytes")
    expected = "sha512-" + base64.b64encode(hashlib.sha512(b"some tarball bytes").digest()).decode()
    assert ba._sri_sha512(f) == expected


def test_member_filter_strips_and_excludes():
    mathjax = next(p for p in ba.PACKAGES if p.dest == "mathjax")
    assert ba._wanted("package/es5/tex-chtml.js", mathjax) == "tex-chtml.js"
    assert ba._wanted("package/es5/output/chtml/fonts/woff-v2/a.woff", mathjax) == "output/chtml/fonts/woff-v2/a.woff"
    assert ba._wanted("package/es5/tex-svg.js", mathjax) is None
    assert ba._wanted("es5/tex-chtml.js", mathjax) is None  # outside package/
    manager = next(p for p in ba.PACKAGES if p.dest == "html-manager")
    assert ba._wanted("package/dist/embed-amd.js", manager) == "dist/embed-amd.js"
    assert ba._wanted("package/dist/embed.js", manager) is None
    assert ba._wanted("package/dist/embed.js.map", manager) is None


def test_missing_assets_and_check_cli(tmp_path, capsys):
    assert set(ba.missing_assets(tmp_path)) >= {p.spec for p in ba.PACKAGES}
    assert ba.main([str(tmp_path), "--check"]) == 1
    assert "python -m nbsupport.book.assets" in capsys.readouterr().err
    # a complete-looking copy (stamp + required files) counts as present, a wrong stamp does not
    for p in ba.PACKAGES:
        folder = tmp_path / ba.VENDOR / p.dest
        for r in p.required:
            (folder / r).parent.mkdir(parents=True, exist_ok=True)
            (folder / r).write_text("x")
        (folder / ba.STAMP).write_text(json.dumps({"spec": p.spec, "integrity": p.integrity}))
    ba.ensure_assets(tmp_path, npm="definitely-not-npm")  # nothing to fetch: the npm client is never run
    assert ba.missing_assets(tmp_path) == []
    first = ba.PACKAGES[0]
    (tmp_path / ba.VENDOR / first.dest / ba.STAMP).write_text(json.dumps({"spec": "other@1", "integrity": "x"}))
    assert ba.missing_assets(tmp_path) == [first.spec]
    with pytest.raises(ba.AssetError, match="npm client 'definitely-not-npm'"):
        ba.ensure_assets(tmp_path, npm="definitely-not-npm", quiet=True)


def test_results_table_html_lists_records():
    html = ba.results_table_html({"rows": [{"backend": "dense", "seconds": 0.123456}, {"backend": "sparse", "seconds": 2}]},
                                 columns=["backend", "seconds"])
    assert html.count("<tr") == 3 and "<th>backend</th>" in html and "0.123" in html and "sparse" in html
    with pytest.raises(ba.AssetError, match="no list of records"):
        ba.results_table_html({"machine": {}})


def test_open_locally_box_escapes_the_path():
    html = ba.open_locally_html("book/01_<x>.ipynb")
    assert "book/01_&lt;x&gt;.ipynb" in html and "<x>" not in html
