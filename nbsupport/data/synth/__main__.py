"""``python -m nbsupport.data.synth``: the synthetic corpus's command line (:func:`nbsupport.data.synth.main`).

A package with this ``__main__`` rather than a module run as ``__main__``: ``nbsupport.data`` imports the
generator, and running an already imported module with ``-m`` makes runpy warn on every call.
"""
import sys

from nbsupport.data.synth import main

sys.exit(main())
