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
