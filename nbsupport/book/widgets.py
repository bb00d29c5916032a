"""ipywidgets explorers for the chapters. Each returns a widget box and also draws its first state as a
plain matplotlib figure, so headless papermill runs and the static book show something (the saved
widget state shows the last view; callbacks need a kernel)."""
from __future__ import annotations

import base64

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

from nbsupport.attention import scaled_dot_product_attention

__all__ = ["KEY_WORDS", "key_vectors", "draw_query_attention", "attention_explorer", "show_in", "figure_view", "figure_png"]


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of the matplotlib figure ``fig`` (then closed); what :func:`figure_view` shows."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figure_view(fig=None) -> W.Image:
    """An ``ipywidgets.Image`` that shows a matplotlib figure; redraw it with :func:`show_in`.

    The interactive figures of Chapters 4 and 6 (co-attention maps, MESM's kept sites) live in this
    widget's synced ``value``: JupyterLab draws it when a callback in the kernel sets it, Jupyter Book
    embeds its last state in the static page, and no output capture is involved (``with out:``
    capture was seen to leave headless nbclient executions hanging).
    """
    # until a figure arrives: a 1x1 transparent PNG (an empty value would render as a broken image)
    view = W.Image(value=_BLANK_PNG, format="png", layout=W.Layout(max_width="100%"))
    if fig is not None:
        show_in(view, fig)
    return view


_BLANK_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def show_in(view, fig) -> None:
    """Show the matplotlib figure ``fig`` (then closed) in ``view``, replacing what it showed.

    ``view`` is a :func:`figure_view` image widget: its value becomes the figure's PNG. (An
    ``ipywidgets.Output`` whose outputs are set from the kernel is not redrawn by JupyterLab, so it is
    refused.)
    """
    if not isinstance(view, W.Image):
        raise TypeError(f"show_in: 'view' must be an ipywidgets.Image (figure_view()), got {type(view).__name__}")
    view.value = figure_png(fig)


#: Words placed on a 2-D "meaning" plane (angle = kind of feeling) for the query explorer of Chapter 1.
KEY_WORDS = ["joy", "delight", "calm", "table", "fear", "dread", "anger"]
_KEY_ANGLES = np.deg2rad([20, 35, 90, 180, 250, 265, 310])


def key_vectors() -> torch.Tensor:
    """The 2-D key (= value) vectors of :data:`KEY_WORDS`, unit length."""
    return torch.tensor(np.stack([np.cos(_KEY_ANGLES), np.sin(_KEY_ANGLES)], 1), dtype=torch.float32)


def draw_query_attention(fig, angle_deg: float, length: float = 1.0, temperature: float = 1.0):
    """Scaled dot-product attention of one 2-D query over :data:`KEY_WORDS` (Vaswani et al. 2017, eq. 1),
    with a temperature dividing the scores: left, keys and query on the plane; right, the weight heatmap."""
    keys = key_vectors()
    q = torch.tensor([[np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))]], dtype=torch.float32) * length
    out, w = scaled_dot_product_attention(q / temperature, keys, keys)  # (1, 2), (1, K)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    ax1.scatter(keys[:, 0], keys[:, 1], s=30 + 400 * w[0].numpy(), c="tab:blue", alpha=0.7)
    for word, (x, y) in zip(KEY_WORDS, keys.numpy()):
        ax1.annotate(word, (x, y), textcoords="offset points", xytext=(4, 4))
    ax1.arrow(0, 0, *q[0].numpy(), color="tab:red", width=0.02, length_includes_head=True)
    ax1.scatter(*out[0].numpy(), marker="*", s=200, c="tab:red", label="output = weighted average")
    ax1.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal", xlabel="dimension 1", ylabel="dimension 2",
            title="query (arrow) and keys")
    ax1.legend(loc="lower left", fontsize=7)
    im = ax2.imshow(w.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax2.set_xticks(range(len(KEY_WORDS)), KEY_WORDS, rotation=45)
    ax2.set_yticks([0], ["query"])
    for k, v in enumerate(w[0].numpy()):
        ax2.text(k, 0, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k")
    ax2.set_title(f"attention weights (temperature {temperature:g})")
    ax2.set_xlabel("key")
    fig.colorbar(im, ax=ax2, fraction=0.05)
    fig.tight_layout()
    return w[0]


def attention_explorer(angle: float = 30.0, length: float = 1.0, temperature: float = 1.0):
    """Sliders for the query's direction and length and the softmax temperature; the heatmap follows (Chapter 1)."""
    wide = {"description_width": "initial"}  # keep the labels readable
    angle_s = W.FloatSlider(value=angle, min=0, max=360, step=5, description="query angle", style=wide)
    length_s = W.FloatSlider(value=length, min=0.1, max=3, step=0.1, description="query length", style=wide)
    temp_s = W.FloatLogSlider(value=temperature, base=10, min=-1.5, max=1, step=0.1, description="temperature", style=wide)
    out = W.Output()

    def redraw(*_):
        # captured output (not show_in): JupyterLab draws the live heatmap from it (tests/test_jupyterlab.py)
        with out:
            out.clear_output(wait=True)
            fig = plt.figure(figsize=(9, 3.6))
            draw_query_attention(fig, angle_s.value, length_s.value, temp_s.value)
            plt.show()

    for s in (angle_s, length_s, temp_s):
        s.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([angle_s, length_s, temp_s]), out])
    display(box)
    return box
