"""Property-based tests: every pass and the main recipes on random valid ONNX graphs
(``onnxsmith.testing.fuzz_graphs``) keep the properties of ``onnxsmith.testing.fuzz_properties`` (lossless passes
verified or refused cleanly, lossy passes and recipes give valid runnable models, the caller's model untouched).

The examples are derandomized (no example database), so CI runs the same cases every time. The same properties
with many more examples: ``python benchmarks/fuzz.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from onnxsmith.testing.fuzz_graphs import FuzzModel, fuzz_models
from onnxsmith.testing.fuzz_properties import LOSSLESS, LOSSY, RECIPES, check_lossless, check_lossy

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


LOSSLESS_EXAMPLES = 60
LOSSY_EXAMPLES = 50
RECIPE_EXAMPLES = 50
"""Examples per configuration in CI: 14 x 60 + 13 x 50 + 6 x 50 = 1790 generated cases."""


@pytest.mark.parametrize("name", sorted(LOSSLESS))
@settings(FUZZ, max_examples=LOSSLESS_EXAMPLES)
@given(fm=fuzz_models())
def test_lossless_passes_keep_outputs_or_skip_cleanly(fm: FuzzModel, name: str) -> None:
    check_lossless(fm, name)


@pytest.mark.parametrize("name", sorted(LOSSY))
@settings(FUZZ, max_examples=LOSSY_EXAMPLES)
@given(fm=fuzz_models())
def test_lossy_passes_produce_valid_runnable_models(fm: FuzzModel, name: str) -> None:
    check_lossy(fm, name)


@pytest.mark.parametrize("name", sorted(RECIPES))
@settings(FUZZ, max_examples=RECIPE_EXAMPLES)
@given(fm=fuzz_models())
def test_recipes_produce_valid_runnable_models(fm: FuzzModel, name: str) -> None:
    check_lossy(fm, name)
