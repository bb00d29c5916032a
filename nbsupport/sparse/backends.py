"""Sparse-convolution backends: spconv on CUDA (after a self-check) or the book's rulebook (Chapter 6).

``"spconv"`` runs on CUDA tensors when ``spconv`` (``spconv-cu12x``) is installed and passes
:func:`spconv_selfcheck` on that device; ``"torch-rulebook"`` (:mod:`nbsupport.sparse.engine`) runs
everywhere else. spconv's CPU wheel returns wrong answers here, so it is never used on CPU;
``NBSUPPORT_SPARSE_BACKEND=torch-rulebook`` forces the rulebook on CUDA too.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .engine import SparseTensor, to_sparse

__all__ = ["SPARSE_BACKEND_CPU", "SPCONV_SELFCHECK_TOL", "sparse_backend", "backend_description",
           "spconv_selfcheck", "SpconvSubm"]

#: Name of the verified pure-PyTorch backend (the one used on CPU).
SPARSE_BACKEND_CPU = "torch-rulebook"

# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------
_SPCONV_OK: bool | None = None


def _spconv_available() -> bool:
    """Import spconv lazily (only when a CUDA tensor arrives) and remember whether it worked."""
    global _SPCONV_OK
    if _SPCONV_OK is None:
        try:
            import spconv.pytorch  # noqa: F401  # local: optional CUDA-only engine, absent on most machines
            _SPCONV_OK = True
        except Exception:  # ImportError, or a CPU-only build failing to load its CUDA parts
            _SPCONV_OK = False
    return _SPCONV_OK


#: Largest |spconv - dense conv2d| (forward value or input gradient) the self-check accepts.
SPCONV_SELFCHECK_TOL = 1e-3
_SPCONV_CHECKED: dict[str, float] = {}


def spconv_selfcheck(device: torch.device | str = "cuda") -> float:
    """Run our :class:`SubMConv2d`'s spconv path once on ``device`` against dense ``conv2d`` on the active sites.

    MESM's sparse blocks (Chapter 6) are only as good as the engine under them, and spconv has
    returned wrong numbers without an error in three ways we met (its CPU wheel, its max-pool, and
    column-major coordinates on CUDA; book/design.md, "Sparse convolution"). So before spconv is trusted on a device, a small
    random case (batch 2, 8 -> 16 channels, 10x10, density 0.4) goes through exactly the code the
    book runs there (:func:`to_sparse`, then :class:`SpconvSubm`: weight conversion,
    coordinates, cached spconv tensor) and is compared with dense convolution, forward values and
    input gradients.  Returns the largest absolute difference.
    """
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 10, 10, generator=g) < 0.4
    dense = (torch.randn(2, 8, 10, 10, generator=g) * mask[:, None]).to(dev)
    weight = (torch.randn(16, 8, 3, 3, generator=g) * 0.2).to(dev)
    mask = mask.to(dev)
    x = to_sparse(dense, mask)
    feats = x.features.detach().requires_grad_(True)
    # the SpconvSubm call SubMConv2d makes on CUDA (not forward(): it asks sparse_backend(), which runs this check)
    out = SpconvSubm(8, 16, 3)(x.replace(feats), weight, None)
    dense_in = dense.detach().requires_grad_(True)
    ref = F.conv2d(dense_in, weight, padding=1)
    ref_sites = ref.permute(0, 2, 3, 1)[mask]
    grad = torch.randn(out.shape, generator=g).to(dev)
    (out * grad).sum().backward()
    (ref_sites * grad).sum().backward()
    with torch.no_grad():
        diff = max(float((out - ref_sites).abs().max()),
                   float((feats.grad - dense_in.grad.permute(0, 2, 3, 1)[mask]).abs().max()))
    return diff


def _spconv_trusted(device: torch.device) -> bool:
    """spconv importable and its self-check on ``device`` within :data:`SPCONV_SELFCHECK_TOL` (once per device)."""
    if not _spconv_available():
        return False
    key = str(device)
    if key not in _SPCONV_CHECKED:
        try:
            _SPCONV_CHECKED[key] = spconv_selfcheck(device)
        except Exception as exc:  # a broken install must not take the chapter down: fall back, say why
            warnings.warn(f"nbsupport.sparse: spconv failed its self-check on {device} ({exc!r}); "
                          f"using {SPARSE_BACKEND_CPU}")
            _SPCONV_CHECKED[key] = float("nan")
        else:
            if not _SPCONV_CHECKED[key] <= SPCONV_SELFCHECK_TOL:
                warnings.warn(f"nbsupport.sparse: spconv failed its self-check: it differs from dense conv2d by {_SPCONV_CHECKED[key]:.3g} "
                              f"on {device} (tolerance {SPCONV_SELFCHECK_TOL}); using {SPARSE_BACKEND_CPU}")
    return _SPCONV_CHECKED[key] <= SPCONV_SELFCHECK_TOL  # NaN (failed) compares False


def sparse_backend(device: torch.device | str | None = None) -> str:
    """Which sparse-convolution engine runs on ``device``: ``"spconv"`` or ``"torch-rulebook"``.

    Chapter 6 prints it.  spconv is used only for CUDA devices with ``spconv`` importable, passing
    :func:`spconv_selfcheck` there, and ``NBSUPPORT_SPARSE_BACKEND`` not set to ``torch-rulebook``;
    CPU always gets the verified rulebook (spconv's CPU wheel is wrong here, book/design.md).
    """
    forced = os.environ.get("NBSUPPORT_SPARSE_BACKEND", "").strip()
    if forced not in ("", "spconv", SPARSE_BACKEND_CPU):
        raise ValueError(f"environment variable NBSUPPORT_SPARSE_BACKEND must be 'spconv' or "
                         f"'{SPARSE_BACKEND_CPU}', got {forced!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda" or forced == SPARSE_BACKEND_CPU:
        return SPARSE_BACKEND_CPU
    return "spconv" if _spconv_trusted(dev) else SPARSE_BACKEND_CPU


def backend_description(device: torch.device | str | None = None) -> str:
    """One line for the chapter: the backend in use on ``device`` and why."""
    name = sparse_backend(device)
    if name == "spconv":
        import spconv  # local: optional, present when the line above chose it
        diff = _SPCONV_CHECKED.get(str(torch.device(device)), float("nan"))
        return (f"spconv {getattr(spconv, '__version__', '?')} on {device} (SubMConv2d, self-check against dense "
                f"conv2d: max diff {diff:.1e}; sparse max-pool in PyTorch)")
    why = "CPU: spconv's CPU wheel is wrong here" if torch.device(device or "cpu").type != "cuda" \
        else "CUDA without spconv, spconv failed its self-check, or forced"
    return f"{SPARSE_BACKEND_CPU} (pure PyTorch, verified against dense conv2d; {why})"


def _spconv_weight_shape(target: tuple, weight: torch.Tensor) -> torch.Tensor:
    """Convert our (C_out, C_in, kh, kw) weight to an spconv weight of shape ``target``."""
    c_out, c_in, kh, kw = weight.shape
    if target == (c_out, kh, kw, c_in):  # KRSC (spconv >= 2.2)
        return weight.permute(0, 2, 3, 1).contiguous()
    if target == (kh, kw, c_in, c_out):  # RSCK
        return weight.permute(2, 3, 1, 0).contiguous()
    if target == (kh, kw, c_out, c_in):  # RSKC
        return weight.permute(2, 3, 0, 1).contiguous()
    raise RuntimeError(f"nbsupport.sparse: unknown spconv weight layout {target} for weight {tuple(weight.shape)}")


class SpconvSubm:
    """spconv's ``SubMConv2d`` run with *our* weight (PyTorch layout, converted on each call, so autograd
    reaches it): the CUDA path of :class:`~nbsupport.sparse.layers.SubMConv2d` and of the self-check."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self._mod = None

    def __call__(self, x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import spconv.pytorch as spc  # local: optional, CUDA only (the CPU wheel is never used)

        if self._mod is None:
            self._mod = spc.SubMConv2d(self.in_channels, self.out_channels, self.kernel_size,
                                       padding=self.kernel_size // 2, bias=False,
                                       indice_key=f"nbsupport_subm{self.kernel_size}").to(x.features.device)
        st = x.cache.get("spconv")
        if st is None:  # coordinates are row-major (SparseTensor.__post_init__), as spconv needs
            st = spc.SparseConvTensor(x.features, x.coords.int(), list(x.spatial_shape), x.batch_size)
            # indice dict shared by later convs on these sites: replace_feature shares it, so the
            # rulebook spconv builds in mod(st) lands in this cached tensor too
            x.cache["spconv"] = st
        st = st.replace_feature(x.features)
        mod = self._mod
        if "weight" in mod._parameters:  # spconv's own parameter is replaced by a view of ours on each call
            mod.weight_shape = tuple(mod.weight.shape)
            del mod._parameters["weight"]
        mod.weight = _spconv_weight_shape(mod.weight_shape, weight)  # a plain tensor: autograd reaches ours
        out = mod(st).features
        return out if bias is None else out + bias
