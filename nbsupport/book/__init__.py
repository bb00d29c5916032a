"""Book tooling: everything that serves the notebooks rather than the science.

``params`` (parameter rules, specs, grids, the one reader of a parameters cell), ``chapters`` (each
chapter's parameter spec), ``notebook`` (the one-call chapter opening, outputs), ``show`` (a package
object's code on the page), ``fmt`` (tables for people), ``widgets`` and ``viz`` (explorers and plots),
``tour`` (Chapter 2's data browser), ``experiments`` (the sweep command; ``sweep_grid``, ``sweep_store``
and ``sweep_run`` below it) and ``assets`` (offline MathJax/widget scripts for the rendered book).

Content modules (attention, data, models, sparse, metrics, flops) and the protocol never import
from here; ``make test`` checks it with import-linter (``pyproject.toml``, ``[tool.importlinter]``).
"""
