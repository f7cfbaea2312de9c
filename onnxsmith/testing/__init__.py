"""Test support shared by the test suite and the benchmarks (``tests/`` and ``benchmarks/`` both import it; neither
imports the other's files for it).

- :mod:`onnxsmith.testing.fuzz_graphs`: hypothesis strategies for random valid ONNX models;
- :mod:`onnxsmith.testing.fuzz_properties`: the pass lists and the properties every pass and the main recipes
  must keep on those models (``tests/test_fuzz_passes.py`` in CI, ``benchmarks/fuzz.py`` on many more).

Both need ``hypothesis`` (the ``test`` extra); nothing here is imported by ``import onnxsmith``.
"""
