"""The cleanup recipe is lossless on every zoo model, verified by the pass manager on the zoo's own inputs."""

import pytest

from onnxsmith.models.zoo import get_zoo_model, zoo_model_path
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.model_io import load_model
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.optimizer.verification import compare_outputs, reference_outputs
from onnxsmith.core.pass_base import Tolerance


@pytest.mark.parametrize("name", ["vit-digits", "moe-tiny", "minilm", "smollm2"])
def test_cleanup_is_lossless_on_zoo_model(name):
    zoo = get_zoo_model(name)
    path = zoo_model_path(name)
    probes = zoo.calibration_feeds(1)
    result = PassManager(load_recipe("cleanup").build(), probe_feeds=probes).run(load_model(path))
    assert result.unverified_reason is None
    verified = [r for r in result.records if r.verification is not None]
    assert verified, "at least one cleanup pass changed the graph and was verified"
    assert all(r.verification["within_tolerance"] for r in verified)
    # End to end: the cleaned model matches the original on an evaluation feed too.
    feeds = zoo.evaluation_feeds(1)
    comparison = compare_outputs(reference_outputs(load_model(path), feeds), reference_outputs(result.model, feeds),
                                 Tolerance(atol=1e-4, rtol=1e-4))
    assert comparison.within_tolerance, comparison
