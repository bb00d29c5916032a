"""Explorers for the chapters (1, 4 and 6), in two forms.

* Live ipywidgets explorers: sliders and dropdowns whose callbacks redraw a figure in the kernel
  (JupyterLab). Their saved state shows only one view in the rendered book: callbacks need a kernel.
* :func:`static_explorer`: the same explorer with every state of a small grid precomputed as an image;
  its HTML output switches between the states in the browser, with no kernel and no network, so the
  rendered book (served or opened from ``file://``) can be explored too.
"""
from __future__ import annotations

import base64
import html
import io
import json
import uuid
from pathlib import Path
from typing import Callable

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from PIL import Image
from tqdm.auto import tqdm

from nbsupport.attention import scaled_dot_product_attention
from nbsupport.base import ParameterError, atomic_write_text

__all__ = ["KEY_WORDS", "key_vectors", "draw_query_attention", "attention_explorer", "show_in", "figure_view",
           "figure_png", "static_explorer", "StaticExplorer", "EXPLORER_BUDGET", "LIVE_ONLY_CLASS",
           "attention_static_explorer", "live_explorer"]


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of the matplotlib figure ``fig`` (then closed); what :func:`figure_view` shows."""
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


def live_explorer(draw: Callable, controls: dict) -> W.VBox:
    """A live explorer for JupyterLab (Chapters 4 and 6: co-attention maps, MESM's kept sites): the
    figure ``draw(**values)`` of the controls' current values, redrawn in a :func:`figure_view` whenever
    one of ``controls`` (name -> an ipywidgets control with a ``value``) moves. The box is marked live
    only: the rendered book shows the chapter's :func:`static_explorer` of the same ``draw`` instead.
    Displays the box and returns it."""
    if not controls or any(not hasattr(c, "observe") or not hasattr(c, "value") for c in controls.values()):
        raise TypeError("live_explorer: 'controls' must map names to ipywidgets controls with a value")
    view = figure_view()

    def redraw(_=None):
        show_in(view, draw(**{name: c.value for name, c in controls.items()}))

    for c in controls.values():
        c.observe(redraw, names="value")
    box = W.VBox([W.HBox(list(controls.values())), view])
    box.add_class(LIVE_ONLY_CLASS)
    display(box)
    redraw()
    return box


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
    box.add_class(LIVE_ONLY_CLASS)  # the rendered book shows attention_static_explorer in its place
    display(box)
    return box


def _query_attention_state(angle: float, temperature: float, length: float = 1.0, figsize=(9, 3.6)):
    fig = plt.figure(figsize=figsize)
    w = draw_query_attention(fig, angle, length, temperature)
    k = int(w.argmax())
    return fig, f"largest weight {float(w[k]):.2f} on '{KEY_WORDS[k]}'"


def attention_static_explorer(angles=(0, 30, 60, 90, 135, 180, 225, 270, 315),
                              temperatures=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0), length: float = 1.0,
                              angle: float = 30.0, temperature: float = 0.5, **kwargs):
    """Chapter 1's query explorer for readers without a kernel: :func:`draw_query_attention` precomputed
    for every query angle x temperature (Vaswani et al. 2017, eq. 1, with the scores divided by the
    temperature); each state is captioned with its largest weight and the key that gets it. It opens on
    the grid point nearest ``angle``/``temperature``; ``kwargs`` go to :func:`static_explorer`."""
    angles, temperatures = [float(a) for a in angles], [float(t) for t in temperatures]
    start = {"query angle": min(angles, key=lambda a: abs(a - angle), default=None),
             "temperature": min(temperatures, key=lambda t: abs(np.log(t / temperature)), default=None)}
    return static_explorer(lambda **v: _query_attention_state(v["query angle"], v["temperature"], length),
                           {"query angle": [(f"{a:g}°", a) for a in angles], "temperature": temperatures},
                           controls={"query angle": "slider"}, start=kwargs.pop("start", start), **kwargs)


# ---------------------------------------------------------------------------------------------
# Explorers that work without a kernel: every state precomputed, switched in the page by a small script
# ---------------------------------------------------------------------------------------------
#: Most a static explorer may add to its page unless the caller says otherwise (bytes of HTML).
EXPLORER_BUDGET = 3_000_000

#: CSS class of a live ipywidgets explorer that has a static twin: the rendered book hides it (its
#: sliders cannot recompute without a kernel); JupyterLab shows it.
LIVE_ONLY_CLASS = "nbsupport-live-only"

_MIME = {"png": "image/png", "png8": "image/png", "jpeg": "image/jpeg"}

# The page script is hand-written because it is the whole mechanism and must run offline from file://:
# native <input type=range>/<select> controls, one <img>, the states in a JSON block; no library.
_EXPLORER_JS = """(function () {
  var root = document.getElementById(%(id)s);
  if (!root || root.getAttribute('data-ready')) return;
  root.setAttribute('data-ready', '1');
  var data = JSON.parse(root.querySelector('script.nbx-data').textContent);
  var controls = root.querySelectorAll('[data-axis]');
  var img = root.querySelector('img.nbx-image'), caption = root.querySelector('.nbx-caption');
  function update() {
    var k = 0;
    for (var a = 0; a < controls.length; a++) {
      var i = parseInt(controls[a].value, 10);
      k = k * data.sizes[a] + i;  // row-major: the first axis varies slowest
      var shown = root.querySelector('output[data-for="' + a + '"]');
      if (shown) shown.textContent = data.labels[a][i];
    }
    img.src = 'data:' + data.mime + ';base64,' + data.images[data.state_image[k]];
    img.alt = caption.textContent = data.captions[k];
    root.setAttribute('data-state', String(k));
  }
  for (var a = 0; a < controls.length; a++) {
    controls[a].addEventListener('input', update);
    controls[a].addEventListener('change', update);
  }
  update();
})();"""

# In the rendered book (Jupyter Book puts outputs in .cell_output) the live twin is hidden; JupyterLab's
# outputs are .jp-OutputArea-output, so there it stays.
_EXPLORER_CSS = (
    f".cell_output .{LIVE_ONLY_CLASS} {{ display: none !important; }}\n"
    ".nbsupport-explorer { font-size: 0.9em; margin: 0.5em 0; }\n"
    ".nbsupport-explorer .nbx-controls { display: flex; flex-wrap: wrap; gap: 0.4em 1.5em;"
    " align-items: center; }\n"
    ".nbsupport-explorer .nbx-controls label { display: inline-flex; gap: 0.5em; align-items: center; }\n"
    ".nbsupport-explorer .nbx-controls output { min-width: 4em; font-family: monospace; }\n"
    ".nbsupport-explorer img.nbx-image { max-width: 100%; height: auto; display: block; margin: 0.4em 0; }\n"
    ".nbsupport-explorer .nbx-caption { margin: 0; font-family: monospace; }\n"
    ".nbsupport-explorer .nbx-size { margin: 0.2em 0 0; color: #666; font-size: 0.85em; }")


def _axis_entries(name: str, entries) -> tuple[list[tuple[str, object]], str]:
    """((label, value) pairs, default control) of one explorer axis. A bare value is its own label;
    an axis of bare numbers gets a slider, one of (label, value) pairs or other values a dropdown."""
    if isinstance(entries, (str, bytes, dict)) or not hasattr(entries, "__iter__"):
        raise ParameterError(f"static_explorer: axis '{name}' must be a list of values or (label, value) pairs, "
                             f"got {type(entries).__name__}")
    pairs, numeric = [], True
    for e in entries:
        if isinstance(e, tuple):
            if len(e) != 2:
                raise ParameterError(f"static_explorer: axis '{name}': expected a (label, value) pair, got {e!r}")
            pairs.append((str(e[0]), e[1]))
            numeric = False
        else:
            is_number = isinstance(e, (int, float, np.integer, np.floating)) and not isinstance(e, bool)
            numeric = numeric and is_number
            pairs.append((f"{e:g}" if is_number else str(e), e))
    if not pairs:
        raise ParameterError(f"static_explorer: axis '{name}' has no values")
    return pairs, "slider" if numeric else "dropdown"


def _close(a, b) -> bool:
    numbers = (int, float, np.integer, np.floating)
    return isinstance(a, numbers) and isinstance(b, numbers) and bool(np.isclose(float(a), float(b)))


def _render_png(fig, dpi: int) -> bytes:
    """The figure as PNG at ``dpi`` (then closed). No bbox_inches="tight" (it draws twice): the draw
    functions lay out their own figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _encode(png: bytes, fmt: str, scale: float, quality: int) -> bytes:
    """``png`` shrunk by ``scale`` and re-encoded compactly: ``png`` (as is at scale 1), ``png8``
    (256-colour palette PNG, compact for plots) or ``jpeg`` (compact for pictures such as face crops)."""
    if fmt == "png" and scale == 1:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if scale != 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png8":
        image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


#: Shrink factors tried in turn until an explorer fits its byte budget.
_SCALES = (1.0, 0.85, 0.72, 0.6, 0.5)


class StaticExplorer:
    """Every state of an explorer rendered once; its HTML switches between them in the browser.

    Built by :func:`static_explorer`. ``states`` lists ``(values, caption)`` in row-major order of
    the axes (the first axis varies slowest); ``images`` holds the distinct encoded images and
    ``state_image[k]`` the image of state ``k``; ``nbytes`` is what the explorer adds to its page.
    """

    def __init__(self, axes: dict, kinds: dict, states: list, images: list, state_image: list, mime: str,
                 title: str, element_id: str, start: dict | None = None):
        self.axes, self.kinds, self.states = axes, kinds, states
        self.start = {name: int((start or {}).get(name, 0)) for name in axes}  # index shown first per axis
        self.images, self.state_image, self.mime = images, state_image, mime
        self.title, self.element_id = title, element_id
        self.scale = 1.0  # the shrink factor static_explorer applied to fit the budget
        self._html = self._render()
        self.nbytes = len(self._html.encode("utf-8"))

    @property
    def captions(self) -> list[str]:
        """The label of every state, in state order."""
        return [caption for _, caption in self.states]

    def summary(self) -> str:
        """One line for people: states, distinct images and the bytes the page carries."""
        grid = " x ".join(f"{len(p)} {name}" for name, p in self.axes.items())
        return (f"{len(self.states)} precomputed states ({grid}), {len(self.images)} distinct pictures at "
                f"{self.scale:.0%} scale, {self.nbytes / 1e6:.2f} MB in the page")

    def _render(self) -> str:
        esc = html.escape
        controls = []
        for a, (name, pairs) in enumerate(self.axes.items()):
            if self.kinds[name] == "slider":
                controls.append(
                    f'<label>{esc(name)} <input type="range" data-axis="{a}" min="0" max="{len(pairs) - 1}" '
                    f'step="1" value="{self.start[name]}" aria-label="{esc(name)}"><output data-for="{a}">'
                    f"{esc(pairs[self.start[name]][0])}</output></label>")
            else:
                options = "".join(f'<option value="{i}"{" selected" if i == self.start[name] else ""}>{esc(label)}'
                                  "</option>" for i, (label, _) in enumerate(pairs))
                controls.append(f'<label>{esc(name)} <select data-axis="{a}" aria-label="{esc(name)}">{options}'
                                "</select></label>")
        data = {"sizes": [len(p) for p in self.axes.values()], "mime": self.mime,
                "labels": [[label for label, _ in p] for p in self.axes.values()],
                "captions": self.captions, "state_image": self.state_image,
                "images": [base64.b64encode(b).decode("ascii") for b in self.images]}
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # "</" would end the block
        k0 = int(np.ravel_multi_index([self.start[n] for n in self.axes], data["sizes"]))  # row-major
        first = data["images"][self.state_image[k0]]
        title = f'<p class="nbx-title"><strong>{esc(self.title)}</strong></p>' if self.title else ""
        grid = " x ".join(f"{len(p)} {esc(name)}" for name, p in self.axes.items())
        return (f'<div class="nbsupport-explorer" id="{self.element_id}" data-state="{k0}">'
                f"<style>{_EXPLORER_CSS}</style>{title}"
                f'<div class="nbx-controls">{"".join(controls)}</div>'
                f'<img class="nbx-image" src="data:{self.mime};base64,{first}" alt="{esc(self.captions[k0])}">'
                f'<p class="nbx-caption">{esc(self.captions[k0])}</p>'
                f'<p class="nbx-size">{len(self.states)} precomputed states ({grid}): no kernel needed</p>'
                f'<script type="application/json" class="nbx-data">{payload}</script>'
                f"<script>{_EXPLORER_JS % {'id': json.dumps(self.element_id)}}</script></div>")

    def _repr_html_(self) -> str:
        return self._html

    def __repr__(self) -> str:  # the text/plain twin of the HTML output
        return f"<static explorer: {self.summary()}>"

    def save_html(self, path) -> Path:
        """Write the explorer as a standalone HTML page at ``path`` (atomically); returns the path."""
        page = f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{self._html}</body></html>'
        return atomic_write_text(path, page)


def static_explorer(draw: Callable, axes: dict, *, title: str = "", controls: dict | None = None,
                    start: dict | None = None,
                    fmt: str = "png8", dpi: int = 72, quality: int = 70, max_bytes: int = EXPLORER_BUDGET,
                    fit: bool = True, progress: bool = True) -> StaticExplorer:
    """Precompute every state of an explorer on a small grid, for readers of the rendered book who have
    no kernel (Chapters 1, 4 and 6: query/temperature, co-attention by utterance and layer, MESM's
    top-p and kept sites by utterance).

    ``axes`` maps each control's name to its values, in order: bare values or ``(label, value)`` pairs.
    ``draw(**{name: value})`` returns a matplotlib figure, or ``(figure, note)`` where ``note`` is a
    number worth reading next to the state (e.g. the MACs at a ``top_p``); each state is captioned
    ``"name label, name label: note"``. ``controls`` overrides a control's kind (``"slider"`` or
    ``"dropdown"``; default: a slider for an axis of bare numbers, a dropdown otherwise); ``start`` maps
    an axis name to the value shown first (default: each axis's first value). Images are
    ``fmt`` ``"png8"`` (palette PNG, compact for plots), ``"png"`` or ``"jpeg"`` (``quality``) drawn at
    ``dpi``; identical pictures are stored once. The explorer may add at most ``max_bytes`` to its page:
    with ``fit`` the pictures are shrunk (to 85 %, 72 %, 60 %, then 50 %, the scale is kept in
    ``.scale``) until it does; past that :class:`ParameterError` says to choose a coarser grid or a
    smaller figure.
    """
    if not callable(draw):
        raise ParameterError(f"static_explorer: 'draw' must be callable, got {type(draw).__name__}")
    if not isinstance(axes, dict) or not axes:
        raise ParameterError("static_explorer: 'axes' must be a non-empty dict {control name: values}")
    if fmt not in _MIME:
        raise ParameterError(f"static_explorer: 'fmt' must be one of {sorted(_MIME)}, got {fmt!r}")
    parsed, kinds = {}, {}
    for name, entries in axes.items():
        parsed[str(name)], kinds[str(name)] = _axis_entries(str(name), entries)
    for name, kind in (controls or {}).items():
        if name not in parsed or kind not in ("slider", "dropdown"):
            raise ParameterError(f"static_explorer: 'controls' maps an axis name ({sorted(parsed)}) to 'slider' "
                                 f"or 'dropdown', got {name!r}: {kind!r}")
        kinds[name] = kind
    names = list(parsed)
    start_index = {}
    for name, value in (start or {}).items():
        found = [i for i, (_, v) in enumerate(parsed.get(name, [])) if v == value or _close(v, value)]
        if not found:
            raise ParameterError(f"static_explorer: 'start' value {value!r} for axis {name!r} is not one of its "
                                 f"values {[v for _, v in parsed.get(name, [])]} (axes: {names})")
        start_index[name] = found[0]
    grid = list(np.ndindex(*[len(parsed[n]) for n in names]))  # row-major: first axis slowest
    states, pngs, state_image, seen = [], [], [], {}
    for index in tqdm(grid, desc="precomputing explorer states", disable=not progress, leave=False):
        values = {n: parsed[n][i][1] for n, i in zip(names, index)}
        drawn = draw(**values)
        fig, note = drawn if isinstance(drawn, tuple) else (drawn, None)
        caption = ", ".join(f"{n} {parsed[n][i][0]}" for n, i in zip(names, index))
        caption += f": {note}" if note else ""
        png = _render_png(fig, dpi)
        state_image.append(seen.setdefault(png, len(seen)))  # identical pictures are stored once
        if state_image[-1] == len(pngs):
            pngs.append(png)
        states.append((values, caption))
    element_id = f"nbx-{uuid.uuid4().hex[:12]}"
    for scale in _SCALES if fit else (1.0,):  # shrink the pictures until the page budget holds
        images = [_encode(png, fmt, scale, quality) for png in pngs]
        explorer = StaticExplorer(parsed, kinds, states, images, state_image, _MIME[fmt], title, element_id,
                                  start_index)
        explorer.scale = scale
        if explorer.nbytes <= max_bytes:
            return explorer
    per_image = sum(len(b) for b in images) / len(images)
    raise ParameterError(
        f"static_explorer: {len(states)} states ({' x '.join(str(len(parsed[n])) for n in names)} over "
        f"{json.dumps(names)}) need {explorer.nbytes / 1e6:.1f} MB even with pictures shrunk to {scale:.0%}, over "
        f"max_bytes={max_bytes / 1e6:.1f} MB (about {per_image / 1e3:.0f} kB per picture): use fewer values, "
        f"a smaller figure or a lower dpi")
