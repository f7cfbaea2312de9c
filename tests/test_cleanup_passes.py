"""Each cleanup pass on hand-made graphs: it does its job and outputs stay equal (checked here directly)."""

import numpy as np
import onnx
import pytest

from onnx import TensorProto, helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext, default_opset
from onnxsmith.passes.constant_folding import ConstantFolding
from onnxsmith.passes.constants_to_initializers import ConstantsToInitializers
from onnxsmith.passes.fold_batchnorm import FoldBatchNorm
from onnxsmith.passes.remove_dead_nodes import RemoveDeadNodes
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.passes.upgrade_opset import UpgradeOpset


def outputs(model: onnx.ModelProto, feed: dict) -> dict:
    return run_session(create_session(model, optimize=False), feed)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict, atol=1e-5) -> None:
    expected, actual = outputs(before, feed), outputs(after, feed)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, rtol=1e-4)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


X_IMAGE = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
X_VECTOR16 = {"x": np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)}
X_VECTOR6 = {"x": np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)}


def test_fold_batchnorm_into_conv_with_and_without_bias():
    model = graphs.conv_bn_relu()
    result = FoldBatchNorm().run(copy(model), PassContext())
    assert result.modified and result.changes["into_conv"] == 2
    assert ops(result.model) == ["Conv", "Relu", "Conv"]
    onnx.checker.check_model(result.model)
    assert_same_outputs(model, result.model, X_IMAGE, atol=1e-4)


def test_fold_batchnorm_into_gemm_and_2d_matmul():
    model = graphs.gemm_matmul_bn()
    shaped = ShapeInference().run(copy(model), PassContext()).model
    result = FoldBatchNorm().run(copy(shaped), PassContext())
    assert result.changes == {"folded": 2, "into_gemm": 1, "into_matmul": 1}
    assert ops(result.model) == ["Gemm", "MatMul", "Add"]
    assert_same_outputs(model, result.model, X_VECTOR16, atol=1e-4)


def test_fold_batchnorm_skips_a_producer_with_two_consumers():
    model = graphs.conv_bn_relu()
    extra = onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None)
    model.graph.output.append(extra)
    result = FoldBatchNorm().run(copy(model), PassContext())
    assert result.changes["folded"] == 1  # only the second Conv+BN


def test_constants_become_initializers():
    model = graphs.constant_node_weights()
    result = ConstantsToInitializers().run(copy(model), PassContext())
    assert result.changes == {"converted": 3}
    assert "Constant" not in ops(result.model)
    assert {t.name for t in result.model.graph.initializer} == {"W", "a", "b"}
    assert_same_outputs(model, result.model, X_VECTOR6)


def test_constant_folding_folds_constant_expressions():
    model = ConstantsToInitializers().run(graphs.constant_node_weights(), PassContext()).model
    result = ConstantFolding().run(copy(model), PassContext())
    assert result.modified
    assert ops(result.model) == ["MatMul", "Add"]
    assert_same_outputs(model, result.model, X_VECTOR6)


def test_constant_folding_respects_the_size_threshold():
    model = ConstantsToInitializers().run(graphs.constant_node_weights(), PassContext()).model
    result = ConstantFolding(size_threshold=4).run(copy(model), PassContext())
    assert "Mul" in ops(result.model)  # the 20-byte product a*b stays unfolded


def test_remove_dead_nodes_drops_unreachable_nodes_and_initializers():
    model = graphs.constant_node_weights()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    result = RemoveDeadNodes().run(copy(model), PassContext())
    assert result.changes == {"nodes_removed": 1, "initializers_removed": 1}
    assert "dead_mul" not in [n.name for n in result.model.graph.node]
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert_same_outputs(model, result.model, X_VECTOR6)


def test_shape_inference_adds_value_info():
    model = graphs.conv_bn_relu()
    result = ShapeInference().run(copy(model), PassContext())
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in result.model.graph.value_info}
    assert shapes["c1"] == ["N", 8, 8, 8]
    assert_same_outputs(model, result.model, X_IMAGE)


@pytest.mark.parametrize("target", [13, 17, 21])
def test_upgrade_opset_from_11(target):
    model = graphs.conv_bn_relu(opset=11)
    result = UpgradeOpset(target=target).run(copy(model), PassContext())
    assert default_opset(result.model) == target
    onnx.checker.check_model(result.model)
    assert_same_outputs(model, result.model, X_IMAGE)


def test_upgrade_opset_is_a_no_op_when_new_enough():
    model = graphs.conv_bn_relu(opset=17)
    result = UpgradeOpset(target=13).run(model, PassContext())
    assert not result.modified and default_opset(result.model) == 17


def test_passes_keep_model_level_fields():
    model = graphs.conv_bn_relu()
    model.producer_name = "unit-test"
    model.metadata_props.add(key="owner", value="me")
    result = FoldBatchNorm().run(copy(model), PassContext())
    assert result.model.producer_name == "unit-test"
    assert {p.key: p.value for p in result.model.metadata_props} == {"owner": "me"}


def test_symbolic_shape_inference_merges_symbols_broadcasting_equates():
    """relu(x [N, S]) + relu(y [N, T]) forces S = T: onnx keeps two unknowns, the symbolic option one symbol."""
    model = graphs.make_model(
        [helper.make_node("Relu", ["x"], ["rx"], name="relu_x"), helper.make_node("Relu", ["y"], ["ry"], name="relu_y"),
         helper.make_node("Add", ["rx", "ry"], ["z"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "S"])],
    )

    def shapes(result):
        return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in result.model.graph.value_info}

    plain = PassManager([ShapeInference()]).run(model)
    symbolic = PassManager([ShapeInference(symbolic=True)]).run(model)
    assert shapes(plain)["rx"] == ["N", "S"] and shapes(plain)["ry"] == ["N", "T"]
    assert shapes(symbolic)["rx"] == shapes(symbolic)["ry"]  # which symbol survives is the tool's choice
    assert symbolic.records[0].modified


def test_constant_folding_keeps_value_float_constants_float32():
    """Regression (found by test_fuzz_passes): onnx-graphsurgeon folded ``Constant(value_float=...)`` into a float64
    initializer, which onnxruntime refuses next to a float32 operand."""
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const_c", value_float=1.5),
        helper.make_node("Constant", [], ["v"], name="const_v", value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Mul", ["x", "c"], ["xc"], name="mul"),
        helper.make_node("Add", ["xc", "v"], ["y"], name="add"),
    ]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], opset=13)
    result = PassManager([ConstantFolding()]).run(model)  # verified against onnxruntime by the manager
    assert result.records[0].modified
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT}
