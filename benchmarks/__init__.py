"""Reproducible benchmarks: ``python -m benchmarks.extract``, ``python -m benchmarks.query``,
``python -m benchmarks.gpu``. See ``benchmarks/README.md``."""
