"""nbsupport: the tested helper package behind the multimodal emotion book.

Chapter map: ``attention`` (Ch. 1), ``data`` and ``metrics`` (Ch. 2), ``models.umons`` and ``train``
(Ch. 3-4), ``models.mesm``, ``sparse`` and ``flops`` (Ch. 5-6), ``models.baselines`` (Ch. 7),
``experiments`` (Ch. 8); ``notebook``, ``viz`` and ``widgets`` serve every chapter.
"""
__version__ = "0.1.0"
