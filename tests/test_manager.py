import json

import numpy as np
import pytest
from onnx import numpy_helper

import graphs
from onnxsmith.core.errors import PassError
from onnxsmith.optimizer.manager import METADATA_KEY, PassManager, plan_passes, read_provenance
from onnxsmith.core.pass_base import Pass, PassContext, PassResult, default_opset
from onnxsmith.passes.fold_batchnorm import FoldBatchNorm
from onnxsmith.passes.shape_inference import ShapeInference


class PerturbWeight(Pass):
    """A deliberately broken 'lossless' pass: it scales the first initializer by 1.01."""

    name = "perturb-weight"
    description = "test pass that changes a weight"
    lossless = True

    def run(self, model, context):
        tensor = model.graph.initializer[0]
        values = numpy_helper.to_array(tensor) * 1.01
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
        return PassResult(model, True, {"perturbed": 1})


class DropOutput(Pass):
    """A pass that produces an invalid model (a node reading an undefined tensor)."""

    name = "dangling-input"
    description = "test pass that breaks the graph"
    lossless = False

    def run(self, model, context):
        model.graph.node[0].input[0] = "no_such_tensor"
        return PassResult(model, True)


class NeedsOpset21(Pass):
    name = "needs-21"
    description = "test pass requiring opset 21"
    lossless = True
    min_opset = 21

    def run(self, model, context):
        return PassResult(model, False)


class NeedsCalibration(Pass):
    name = "needs-calibration"
    description = "test pass requiring calibration"
    lossless = False
    needs_calibration = True

    def run(self, model, context):
        return PassResult(model, False)


def test_manager_catches_a_broken_lossless_pass_and_names_it():
    manager = PassManager([ShapeInference(), PerturbWeight()])
    with pytest.raises(PassError) as info:
        manager.run(graphs.conv_bn_relu())
    message = str(info.value)
    assert "'perturb-weight'" in message
    assert "passes run before it: shape-inference" in message


def test_a_lossy_pass_may_change_outputs():
    class LossyPerturb(PerturbWeight):
        name = "lossy-perturb"
        lossless = False

    result = PassManager([LossyPerturb(), FoldBatchNorm()]).run(graphs.conv_bn_relu())
    assert [r.name for r in result.records] == ["lossy-perturb", "fold-batchnorm"]
    assert result.records[0].verification is None
    assert result.records[1].verification["within_tolerance"]


def test_manager_runs_checker_and_names_the_pass_that_broke_the_graph():
    with pytest.raises(PassError, match="'dangling-input' produced an invalid model"):
        PassManager([DropOutput()]).run(graphs.conv_bn_relu())


def test_precondition_failure_names_the_pass():
    with pytest.raises(PassError, match="'needs-calibration' needs calibration"):
        PassManager([NeedsCalibration()]).run(graphs.conv_bn_relu())


def test_plan_inserts_one_opset_upgrade_before_the_pass_that_needs_it():
    model = graphs.conv_bn_relu(opset=11)
    planned = plan_passes(model, [FoldBatchNorm(), NeedsOpset21()])
    assert [p.name for p in planned] == ["fold-batchnorm", "upgrade-opset", "needs-21"]
    result = PassManager([FoldBatchNorm(), NeedsOpset21()]).run(model)
    assert default_opset(result.model) == 21
    upgrade = result.records[1]
    assert upgrade.changes == {"opset_from": 11, "opset_to": 21}
    assert upgrade.verification["within_tolerance"]


def test_records_are_written_into_metadata_props():
    result = PassManager([ShapeInference(), FoldBatchNorm()]).run(graphs.conv_bn_relu())
    stored = read_provenance(result.model)
    assert [r["name"] for r in stored] == ["shape-inference", "fold-batchnorm"]
    assert stored[1]["changes"]["folded"] == 2
    assert stored[1]["seconds"] >= 0
    assert stored[1]["nodes_before"] == 5 and stored[1]["nodes_after"] == 3
    keys = [p.key for p in result.model.metadata_props]
    assert keys.count(METADATA_KEY) == 1 and "onnxsmith.version" in keys
    json.loads(dict((p.key, p.value) for p in result.model.metadata_props)[METADATA_KEY])


def test_unrunnable_input_is_reported_as_unverified_not_crashed():
    model = graphs.conv_bn_relu()
    model.graph.node[0].op_type = "NoSuchOp"
    model.graph.node[0].domain = "custom.domain"
    model.opset_import.add(domain="custom.domain", version=1)
    result = PassManager([ShapeInference()]).run(model)
    assert result.unverified_reason.startswith("onnxruntime cannot run the input model")


def test_verification_runs_on_the_given_probe_feeds():
    # With all-zero inputs the perturbed first-layer weight is invisible, so the given feeds must be the ones used.
    zeros = [{"x": np.zeros((1, 3, 8, 8), dtype=np.float32)}]
    result = PassManager([PerturbWeight()], probe_feeds=zeros).run(graphs.conv_bn_relu())
    assert result.records[0].verification["max_abs_error"] == 0.0
    with pytest.raises(PassError):
        PassManager([PerturbWeight()]).run(graphs.conv_bn_relu())


def test_calibration_failure_names_the_pass():
    from onnxsmith.passes.qdq_int8 import QuantizeInt8

    bad_feeds = [{"x": np.full((1, 3, 8, 8), np.nan, dtype=np.float32)}]  # observers refuse NaN
    with pytest.raises(PassError, match="calibration for pass 'int8-qdq' failed: .*NaN"):
        PassManager([ShapeInference(), QuantizeInt8()], verify=False).run(
            graphs.conv_bn_relu(), PassContext(calibration_data=bad_feeds))


class BrokenWithFallbacks(Pass):
    """Its own result reads an undefined tensor, its first fallback changes a weight, its second is the input."""

    name = "broken-with-fallbacks"
    description = "test pass whose best results fail verification"
    lossless = True

    def run(self, model, context):
        dangling, perturbed, kept = (model.__class__() for _ in range(3))
        for copy in (dangling, perturbed, kept):
            copy.CopyFrom(model)
        dangling.graph.node[0].input[0] = "no_such_tensor"
        PerturbWeight().run(perturbed, context)
        return PassResult(dangling, True, {"attempt": "own"}, fallbacks=[
            ("perturbed", PassResult(perturbed, True, {"attempt": "perturbed"})),
            ("unchanged", PassResult(kept, False, {"attempt": "unchanged"}))])


def test_the_first_fallback_that_verifies_is_used_and_the_failures_are_reported():
    run = PassManager([BrokenWithFallbacks()]).run(graphs.conv_bn_relu())
    (record,) = run.records
    assert record.fallback == "unchanged" and record.changes == {"attempt": "unchanged", "fallback": "unchanged"}
    reasons = [d["reason"] for d in record.details if d["kind"] == "fallback"]
    assert len(reasons) == 2 and "invalid model" in reasons[0] and "changed output" in reasons[1]
    assert run.model.graph.node[0].input[0] == "x"


def test_without_a_fallback_that_verifies_the_pass_fails_with_its_own_error():
    class OnlyBroken(BrokenWithFallbacks):
        def run(self, model, context):
            result = super().run(model, context)
            result.fallbacks = result.fallbacks[:1]
            return result

    with pytest.raises(PassError, match="produced an invalid model"):
        PassManager([OnlyBroken()]).run(graphs.conv_bn_relu())
