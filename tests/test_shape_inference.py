"""Shape inference cannot sink a run: every new value_info is checked against onnxruntime, the symbolic result
falls back to onnx's, contradicted entries lose their shape, and a failing optional pass is skipped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphs import make_model
from onnxsmith.api import optimize
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.optimizer.verification import value_info_conflicts
from onnxsmith.core.feeds import generated_probe_feeds
from onnxsmith.passes.shape_inference import ShapeInference


def aspect_resize() -> onnx.ModelProto:
    """x[N,1,H,W] -> Resize(sizes 2x2 on axes 2,3, keep_aspect_ratio_policy not_larger) -> Relu -> y.

    onnxruntime's symbolic shape inference ignores the policy and the axes and declares the Resize output [2, 2];
    onnxruntime computes [N, 1, 1, 2] for a 4x8 input.
    """
    nodes = [
        helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], mode="nearest", axes=[2, 3],
                         keep_aspect_ratio_policy="not_larger"),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "h", "w"])],
                      [numpy_helper.from_array(np.array([2, 2], np.int64), "sizes")], opset=18)


def fpn_block() -> onnx.ModelProto:
    """A PaddleOCR-detector-style top-down merge: two stride-2 Convs, nearest Resize x2 of the deeper map, Add
    with the shallower one, a 1x1 Conv head. For inputs whose sides are not multiples of 4 the Add broadcasts
    (1x1 + 2x2 on 2x2 inputs), which the symbolic inference's merged symbols deny."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="down1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="down2", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c2", "", "scales"], ["up"], name="up", mode="nearest"),
        helper.make_node("Add", ["up", "r1"], ["merged"], name="merge"),
        helper.make_node("Conv", ["merged", "w3"], ["y"], name="head"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], weights, opset=13)


def _dims(model: onnx.ModelProto, name: str) -> list:
    info = next(info for info in model.graph.value_info if info.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]


ASPECT_FEEDS = [{"x": np.ones((1, 1, 4, 8), np.float32)}]


def test_symbolic_resize_shape_is_contradicted_by_onnxruntime():
    result = ShapeInference(symbolic=True).run(aspect_resize(), PassContext())
    assert _dims(result.model, "r") == [2, 2]
    conflicts = value_info_conflicts(result.model, ["r"], ASPECT_FEEDS)
    assert "declared rank 2, computed shape [1, 1, 1, 2]" in conflicts["r"].reason
    onnx_shapes = dict(result.fallbacks)["onnx shapes"].model
    assert value_info_conflicts(onnx_shapes, ["r"], ASPECT_FEEDS) == {}


def test_manager_falls_back_to_onnx_shapes_and_reports_it():
    model = aspect_resize()
    run = PassManager([ShapeInference(symbolic=True)], probe_feeds=ASPECT_FEEDS).run(model)
    (record,) = run.records
    assert record.fallback == "onnx shapes" and record.changes["fallback"] == "onnx shapes"
    assert record.changes["shapes_from"] == "onnx"
    assert any(d["kind"] == "fallback" and "'r'" in d["reason"] and "rank 2" in d["reason"] for d in record.details)
    assert len(_dims(run.model, "r")) == 4
    session = ort.InferenceSession(run.model.SerializeToString())
    assert session.run(None, ASPECT_FEEDS[0])[0].shape == (1, 1, 1, 2)


class WrongShapes(Pass):
    """Adds one value_info claiming ``r`` is [7]: a shape annotation onnxruntime will contradict."""

    name = "wrong-shapes"
    description = "test: a value_info contradicting the graph"
    lossless = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [7]))
        return PassResult(model, True)


def test_contradicted_entries_without_a_fallback_lose_their_shape_but_keep_their_type():
    run = PassManager([WrongShapes()], probe_feeds=ASPECT_FEEDS).run(aspect_resize())
    (record,) = run.records
    assert record.changes["value_info_relaxed"] == 1
    assert record.details == [{"tensor": "r", "kind": "value_info-relaxed",
                               "reason": "declared rank 1, computed shape [1, 1, 1, 2]"}]
    (info,) = run.model.graph.value_info
    assert info.type.tensor_type.elem_type == TensorProto.FLOAT and not info.type.tensor_type.HasField("shape")


class Raises(Pass):
    name = "raises"
    description = "test: an optional analysis that fails"
    lossless = True
    optional = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        raise RuntimeError("inference exploded")


class Unrunnable(Pass):
    """Returns a model whose Relu reads a tensor of the wrong type: checker-valid, onnxruntime refuses it."""

    name = "unrunnable"
    description = "test: an optional analysis whose result onnxruntime cannot run"
    lossless = True
    optional = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        broken.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.INT64, None))
        broken.graph.node[1].op_type = "Softmax"
        return PassResult(broken, True)


def test_a_failing_optional_pass_is_skipped_and_the_run_goes_on():
    model = aspect_resize()
    run = PassManager([Raises(), Unrunnable(), ShapeInference()], probe_feeds=ASPECT_FEEDS).run(model)
    raised, unrunnable, shapes = run.records
    assert raised.skipped == "inference exploded" and not raised.modified
    assert unrunnable.skipped and "Unrunnable" not in unrunnable.skipped and not unrunnable.modified
    assert [n.op_type for n in run.model.graph.node] == ["Resize", "Relu"]
    assert shapes.skipped is None and shapes.modified


def test_without_verification_no_invented_value_info_reaches_the_output():
    model = aspect_resize()
    given = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    model.graph.value_info.append(given)
    run = PassManager([ShapeInference(symbolic=True)], verify=False).run(model)
    assert list(run.model.graph.value_info) == [given]


def test_ptq_sl_on_a_detector_style_graph_completes_and_runs():
    model = fpn_block()
    symbolic = ShapeInference(symbolic=True).run(model, PassContext()).model
    probes = generated_probe_feeds(model)  # 2x2 images: the Add broadcasts 1x1 onto 2x2
    assert value_info_conflicts(symbolic, [i.name for i in symbolic.graph.value_info], probes)
    calibration = [{"x": np.random.default_rng(i).standard_normal((1, 3, 2, 2)).astype(np.float32)}
                   for i in range(4)]
    out = optimize(model, "ptq-sl", calibration)
    shapes = [r for r in out.report.records if r.name == "shape-inference"]
    assert shapes and all(r.skipped is None for r in shapes)
    assert any(r.fallback == "onnx shapes" or r.changes.get("value_info_relaxed") for r in shapes)
    assert any(n.op_type == "QuantizeLinear" for n in out.model.graph.node)
    session = ort.InferenceSession(out.model.SerializeToString())
    for feed in calibration:
        (y,) = session.run(None, feed)
        assert y.shape == (1, 4, 2, 2) and np.isfinite(y).all()
