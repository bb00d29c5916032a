"""nbsupport.book.widgets: the figure views the chapters' widgets redraw (Chapters 1, 4 and 6)."""
import io

import ipywidgets as W
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from nbsupport.book import widgets as nbw  # noqa: E402


def _figure(value):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.full((4, 4), value), vmin=0, vmax=1)
    return fig


def test_figure_view_shows_the_figure_png_and_redraws():
    view = nbw.figure_view()
    assert Image.open(io.BytesIO(bytes(view.value))).size == (1, 1)  # blank placeholder, never a broken image
    fig = _figure(0.0)
    nbw.show_in(view, fig)
    first = bytes(view.value)
    assert first.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)  # closed: no duplicate inline copy
    assert Image.open(io.BytesIO(first)).size[0] > 50
    nbw.show_in(view, _figure(1.0))
    assert bytes(view.value) != first
    assert bytes(nbw.figure_view(_figure(0.0)).value) == first  # same figure, same bytes


def test_show_in_wrong_target():
    with pytest.raises(TypeError, match="view"):
        nbw.show_in(W.Label(), _figure(0.5))
    with pytest.raises(TypeError, match="view"):  # an Output's state set from the kernel is not drawn by JupyterLab
        nbw.show_in(W.Output(), _figure(0.5))


# ---------------------------------------------------------------------------------------------
# static_explorer: states precomputed for the rendered book (no kernel)
# ---------------------------------------------------------------------------------------------
def colour(a, b):
    """The test's own reference: the solid colour of state (a, b)."""
    return (40 + 60 * a, 200 - 80 * b, 100)


def solid(a, b):
    fig = plt.figure(figsize=(1, 1))
    fig.patch.set_facecolor(np.array(colour(a, b)) / 255)
    return fig, f"sum {a + b}"


def _decode(blob):
    return Image.open(io.BytesIO(blob)).convert("RGB")


def _explorer_data(html):
    import json
    import re

    return json.loads(re.search(r'<script type="application/json" class="nbx-data">(.*?)</script>', html, re.S)
                      .group(1).replace("<\\/", "</"))


def test_static_explorer_states_are_row_major_and_show_the_right_picture():
    ex = nbw.static_explorer(solid, {"a": [0, 1, 2], "b": [("x", 0), ("y", 1)]}, progress=False)
    assert len(ex.states) == 6 and len(ex.images) == 6
    expected = [(a, b) for a in range(3) for b in range(2)]  # first axis slowest
    assert ex.captions == [f"a {a}, b {'xy'[b]}: sum {a + b}" for a, b in expected]
    for k, (a, b) in enumerate(expected):
        assert ex.states[k][0] == {"a": a, "b": b}
        pixel = _decode(ex.images[ex.state_image[k]]).getpixel((36, 36))
        assert max(abs(p - q) for p, q in zip(pixel, colour(a, b))) <= 2, (k, pixel, colour(a, b))
    html = ex._repr_html_()
    assert html.count('type="range"') == 1 and 'max="2"' in html  # bare numbers: a slider
    assert html.count("<select") == 1 and html.count("<option") == 2  # (label, value) pairs: a dropdown
    assert "http://" not in html and "https://" not in html  # nothing to fetch: works offline
    data = _explorer_data(html)
    assert data["sizes"] == [3, 2] and data["labels"] == [["0", "1", "2"], ["x", "y"]]
    assert ex.nbytes == len(html.encode()) and ex.nbytes < 100_000


def test_static_explorer_start_state_and_identical_images_stored_once():
    ex = nbw.static_explorer(lambda a, b: solid(a, 0)[0], {"a": [0, 1], "b": [0.5, 0.7, 0.9]},
                             start={"a": 1, "b": 0.7}, fmt="png", progress=False)
    assert len(ex.states) == 6 and len(ex.images) == 2  # the picture ignores b: one image per a
    assert ex.state_image == [0, 0, 0, 1, 1, 1]
    html = ex._repr_html_()
    assert 'data-state="4"' in html and ex.captions[4] == "a 1, b 0.7"  # row-major index of (1, 1)
    assert f'alt="{ex.captions[4]}"' in html


def test_static_explorer_escapes_labels_and_script_end():
    ex = nbw.static_explorer(lambda u: solid(0, 0)[0], {"u": [("</script><b>", 0), ("a&b", 1)]}, progress=False)
    html = ex._repr_html_()
    assert "</script><b>" not in html and "&lt;/script&gt;&lt;b&gt;" in html
    assert _explorer_data(html)["labels"] == [["</script><b>", "a&b"]]


def test_static_explorer_budget_and_bad_input():
    from nbsupport.base import ParameterError

    with pytest.raises(ParameterError, match="max_bytes"):
        nbw.static_explorer(solid, {"a": [0, 1], "b": [0, 1]}, max_bytes=1000, progress=False)
    with pytest.raises(ParameterError, match="axis 'a' has no values"):
        nbw.static_explorer(solid, {"a": [], "b": [0]}, progress=False)
    with pytest.raises(ParameterError, match="'draw' must be callable"):
        nbw.static_explorer(None, {"a": [0]}, progress=False)
    with pytest.raises(ParameterError, match="'fmt'"):
        nbw.static_explorer(solid, {"a": [0], "b": [0]}, fmt="gif", progress=False)
    with pytest.raises(ParameterError, match="'controls'"):
        nbw.static_explorer(solid, {"a": [0], "b": [0]}, controls={"c": "slider"}, progress=False)
    with pytest.raises(ParameterError, match="'start' value 3"):
        nbw.static_explorer(solid, {"a": [0], "b": [0]}, start={"a": 3}, progress=False)
    with pytest.raises(ParameterError, match="axis 'a' must be a list"):
        nbw.static_explorer(solid, {"a": "01", "b": [0]}, progress=False)


def test_attention_static_explorer_captions_match_softmax():
    import re

    angles, temps = [0, 100, 260], [0.1, 2.0]
    ex = nbw.attention_static_explorer(angles, temps, progress=False)
    assert len(ex.states) == 6
    # independent reference: the keys' angles on the plane, softmax(q.k / sqrt(2) / T) by hand in NumPy
    key_deg = np.array([20, 35, 90, 180, 250, 265, 310])
    for (angle, t), caption in zip([(a, t) for a in angles for t in temps], ex.captions):
        scores = np.cos(np.deg2rad(angle - key_deg)) / np.sqrt(2) / t
        w = np.exp(scores - scores.max())
        w /= w.sum()
        m = re.fullmatch(r"query angle (\d+)°, temperature ([\d.]+): largest weight ([\d.]+) on '(\w+)'", caption)
        assert m, caption
        assert (float(m[1]), float(m[2])) == (angle, t)
        assert abs(float(m[3]) - w.max()) <= 0.006 and m[4] == nbw.KEY_WORDS[int(w.argmax())], (caption, w)


def test_static_explorer_shrinks_pictures_to_fit_the_budget():
    def noisy(seed):  # a picture that compresses badly, so its size tracks its pixel count
        fig = plt.figure(figsize=(4, 3))
        fig.figimage(np.random.default_rng(seed).random((216, 288)), cmap="gray")
        return fig

    full = nbw.static_explorer(noisy, {"seed": [0, 1, 2]}, fmt="jpeg", progress=False)
    assert full.scale == 1.0 and _decode(full.images[0]).size == (288, 216)
    small = nbw.static_explorer(noisy, {"seed": [0, 1, 2]}, fmt="jpeg", max_bytes=int(full.nbytes * 0.6),
                                progress=False)
    assert small.scale < 1.0 and small.nbytes <= full.nbytes * 0.6
    assert _decode(small.images[0]).size == (round(288 * small.scale), round(216 * small.scale))


def test_live_explorer_redraws_the_figure_of_the_controls_values():
    calls = []

    def draw(level, scale):
        calls.append((level, scale))
        return _figure(level * scale)

    level, scale = W.IntSlider(value=1, min=0, max=2), W.FloatSlider(value=0.5, min=0.0, max=1.0)
    box = nbw.live_explorer(draw, {"level": level, "scale": scale})
    view = box.children[1]
    assert calls == [(1, 0.5)] and bytes(view.value) == bytes(nbw.figure_view(_figure(0.5)).value)
    assert nbw.LIVE_ONLY_CLASS in box._dom_classes and list(box.children[0].children) == [level, scale]
    level.value = 2
    assert calls[-1] == (2, 0.5) and bytes(view.value) == bytes(nbw.figure_view(_figure(1.0)).value)
    scale.value = 0.0
    assert calls[-1] == (2, 0.0)
    with pytest.raises(TypeError, match="controls"):
        nbw.live_explorer(draw, {"level": 3})
