"""Book tooling: everything that serves the notebooks rather than the science.

``notebook`` (parameters, the one-call chapter opening, outputs), ``chapters`` (each chapter's
parameter spec), ``show`` (a package object's code on the page), ``fmt`` (tables for people),
``widgets`` and ``viz`` (explorers and plots), ``tour`` (Chapter 2's data browser), ``experiments``
(papermill sweeps) and ``assets`` (offline MathJax/widget scripts for the rendered book).

Content modules (attention, data, models, sparse, metrics, flops) and the protocol never import
from here; ``make test`` checks it with import-linter (``pyproject.toml``, ``[tool.importlinter]``).
"""
