"""sparse-gemm-to-conv: MatMul/Gemm as Reshape -> 1x1 Conv -> Reshape, equal outputs, N:M gating and skips."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.core.sparsity import nm_mask, satisfies_nm
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.optimizer.registry import PASSES
from onnxsmith.passes.sparse_conv import SparseGemmToConv

RNG = np.random.default_rng(0)


def single(op, x_shape, y_shape, initializers, inputs=("x", "w"), dtype=TensorProto.FLOAT, **attrs):
    """One ``op`` node named ``fc`` reading graph input ``x`` and writing graph output ``y``."""
    return graphs.make_model(
        [helper.make_node(op, list(inputs), ["y"], name="fc", **attrs)],
        [helper.make_tensor_value_info("x", dtype, x_shape)],
        [helper.make_tensor_value_info("y", dtype, y_shape)],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )


def rewrite(model, **options):
    result = PassManager([SparseGemmToConv(**options)]).run(model, PassContext())
    return result.model, result.records[-1]


def ops(model):
    return [node.op_type for node in model.graph.node]


def outputs(model, x):
    return run_session(create_session(model), {"x": x})["y"]


def sparse_weight(shape, axis, dtype=np.float32):
    """A random weight that is 2:4 sparse along ``axis``."""
    weight = RNG.standard_normal(shape).astype(dtype)
    return np.where(nm_mask(np.abs(weight), 2, 4, axis), weight, np.zeros_like(weight))


def conv_weight(model):
    (weight,) = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("conv_weight")]
    return weight


@pytest.mark.parametrize("leading, batches", [
    (["T"], [(5,), (11,)]),
    (["B", "S"], [(2, 3), (1, 7)]),
    (["B", "H", "S"], [(2, 2, 3), (1, 3, 5)]),
])
def test_matmul_as_conv_matches_for_dynamic_leading_dims(leading, batches):
    weight = RNG.standard_normal((64, 48)).astype(np.float32)
    model = single("MatMul", [*leading, 64], [*leading, 48], {"w": weight})
    rewritten, record = rewrite(model, only_sparse=False)
    assert record.changes == {"rewritten": 1, "skipped": 0} and record.verification is not None
    assert record.details == [{"node": "fc", "kind": "rewritten", "shape": [64, 48]}]
    assert "MatMul" not in ops(rewritten) and ops(rewritten).count("Conv") == 1 and "Shape" in ops(rewritten)
    np.testing.assert_array_equal(conv_weight(rewritten), weight.T.reshape(48, 64, 1, 1))
    for batch in batches:  # one rewritten model, several leading shapes
        x = RNG.standard_normal((*batch, 64)).astype(np.float32)
        after = outputs(rewritten, x)
        assert after.shape == (*batch, 48)
        np.testing.assert_allclose(after, outputs(model, x), rtol=1e-5, atol=1e-5)


def test_static_leading_dims_give_a_constant_output_shape():
    weight = RNG.standard_normal((32, 16)).astype(np.float32)
    model = single("MatMul", [2, 3, 32], [2, 3, 16], {"w": weight})
    rewritten, _ = rewrite(model, only_sparse=False)
    assert ops(rewritten) == ["Reshape", "Conv", "Reshape"]
    (shape,) = [numpy_helper.to_array(t) for t in rewritten.graph.initializer if t.name == "fc_out_shape"]
    assert shape.tolist() == [2, 3, 16]
    x = RNG.standard_normal((2, 3, 32)).astype(np.float32)
    np.testing.assert_allclose(outputs(rewritten, x), outputs(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (24,), (1, 24), ()])
def test_gemm_as_conv_folds_alpha_and_beta(trans_b, bias_shape):
    weight = RNG.standard_normal((24, 32) if trans_b else (32, 24)).astype(np.float32)
    initializers, inputs = {"w": weight}, ["x", "w"]
    if bias_shape is not None:
        initializers["c"] = RNG.standard_normal(bias_shape).astype(np.float32)
        inputs.append("c")
    model = single("Gemm", ["M", 32], ["M", 24], initializers, inputs, transB=trans_b, alpha=0.5, beta=3.0)
    rewritten, record = rewrite(model, only_sparse=False)
    assert record.changes["rewritten"] == 1 and record.details[0]["shape"] == [32, 24]
    assert "Gemm" not in ops(rewritten)
    conv = next(node for node in rewritten.graph.node if node.op_type == "Conv")
    assert len(conv.input) == (2 if bias_shape is None else 3)
    np.testing.assert_allclose(conv_weight(rewritten)[:, :, 0, 0], 0.5 * (weight if trans_b else weight.T), rtol=1e-6)
    for rows in (1, 9):
        x = RNG.standard_normal((rows, 32)).astype(np.float32)
        np.testing.assert_allclose(outputs(rewritten, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_only_sparse_rewrites_2_of_4_weights_and_skips_dense_ones():
    dense = RNG.standard_normal((64, 32)).astype(np.float32)
    sparse = sparse_weight((64, 32), axis=0)
    wrong_axis = sparse_weight((64, 32), axis=1)  # 2:4 along the output axis only
    sparse_t = sparse_weight((32, 64), axis=1)  # Gemm transB=1: input axis 1
    nodes = [helper.make_node("MatMul", ["x", "dense"], ["a"], name="dense_fc"),
             helper.make_node("MatMul", ["x", "sparse"], ["b"], name="sparse_fc"),
             helper.make_node("MatMul", ["x", "wrong_axis"], ["c"], name="wrong_axis_fc"),
             helper.make_node("Gemm", ["x", "sparse_t"], ["d"], name="sparse_gemm", transB=1)]
    model = graphs.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 32]) for name in "abcd"],
        [numpy_helper.from_array(value, name) for name, value in
         (("dense", dense), ("sparse", sparse), ("wrong_axis", wrong_axis), ("sparse_t", sparse_t))])
    rewritten, record = rewrite(model)
    kinds = {d["node"]: d.get("reason", d["kind"]) for d in record.details}
    assert kinds == {"dense_fc": "weight is not 2:4 on the input axis", "sparse_fc": "rewritten",
                     "wrong_axis_fc": "weight is not 2:4 on the input axis", "sparse_gemm": "rewritten"}
    assert record.changes == {"rewritten": 2, "skipped": 2}
    assert ops(rewritten).count("Conv") == 2 and ops(rewritten).count("MatMul") == 2
    weights = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    for name, original in (("sparse_fc_conv_weight", sparse), ("sparse_gemm_conv_weight", sparse_t.T)):
        assert weights[name].shape == (32, 64, 1, 1) and satisfies_nm(weights[name], 2, 4, 1)
        np.testing.assert_array_equal(weights[name][:, :, 0, 0], original.T)
    assert [o.name for o in rewritten.graph.output] == ["a", "b", "c", "d"]
    x = RNG.standard_normal((6, 64)).astype(np.float32)
    before, after = (run_session(create_session(m), {"x": x}) for m in (model, rewritten))
    for name in "abcd":
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)


def test_4_of_8_option_accepts_4_of_8_weights():
    weight = RNG.standard_normal((64, 16)).astype(np.float32)
    weight = np.where(nm_mask(np.abs(weight), 4, 8, 0), weight, 0).astype(np.float32)
    assert not satisfies_nm(weight, 2, 4, 0)
    model = single("MatMul", ["N", 64], ["N", 16], {"w": weight})
    assert rewrite(model)[1].changes["rewritten"] == 0
    rewritten, record = rewrite(model, n=4, m=8)
    assert record.changes["rewritten"] == 1 and satisfies_nm(conv_weight(rewritten), 4, 8, 1)


def test_skips_excluded_trans_a_non_constant_and_per_row_bias():
    weights = {name: RNG.standard_normal((16, 16)).astype(np.float32) for name in ("w_head", "w_ta", "w_ok", "w_c")}
    weights["c_rows"] = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_head"], ["h"], name="lm_head"),
             helper.make_node("Gemm", ["h", "w_ta"], ["t"], name="gemm_ta", transA=1),
             helper.make_node("Transpose", ["x"], ["x_t"], name="transpose"),
             helper.make_node("MatMul", ["t", "x_t"], ["s"], name="scores"),
             helper.make_node("Gemm", ["s", "w_c", "c_rows"], ["r"], name="per_row_bias"),
             helper.make_node("MatMul", ["r", "w_ok"], ["y"], name="ok")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    rewritten, record = rewrite(model, only_sparse=False, exclude_regex=["head"])
    reasons = {d["node"]: d.get("reason") for d in record.details}
    assert reasons == {"lm_head": "excluded", "gemm_ta": "transA Gemm",
                       "scores": "weight (input 1) is not a constant 2-D tensor",
                       "per_row_bias": "bias C is not a constant per output channel", "ok": None}
    assert record.changes == {"rewritten": 1, "skipped": 4}
    assert ops(rewritten).count("MatMul") == 2 and ops(rewritten).count("Gemm") == 2
    assert rewritten.graph.output[0].name == "y" and rewritten.graph.node[-1].output[0] == "y"
    onnx.checker.check_model(rewritten, full_check=True)
    x = RNG.standard_normal((16, 16)).astype(np.float32)
    np.testing.assert_allclose(outputs(rewritten, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_graph_output_consumers_and_input_model_are_preserved():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),  # unnamed nodes still get unique names
             helper.make_node("Relu", ["h"], ["y"], name="relu"),
             helper.make_node("MatMul", ["y", "w2"], ["z"])]
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float32), name) for name in ("w1", "w2")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("h", "z")],
                              inits)
    before = model.SerializeToString()
    result = SparseGemmToConv(only_sparse=False).run(model, PassContext())
    assert model.SerializeToString() == before
    assert result.modified and result.changes["rewritten"] == 2
    rewritten = result.model
    onnx.checker.check_model(rewritten, full_check=True)
    assert [o.name for o in rewritten.graph.output] == ["h", "z"]
    assert [n.input[0] for n in rewritten.graph.node if n.op_type == "Relu"] == ["h"]
    names = [n.name for n in rewritten.graph.node]
    assert len(set(names)) == len(names) and all(names)
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    before_out, after_out = (run_session(create_session(m), {"x": x}) for m in (model, rewritten))
    for name in ("h", "z"):
        np.testing.assert_allclose(after_out[name], before_out[name], rtol=1e-5, atol=1e-5)


def test_nothing_eligible_returns_the_model_unchanged():
    model = single("MatMul", ["N", 16], ["N", 8], {"w": RNG.standard_normal((16, 8)).astype(np.float32)})
    result = SparseGemmToConv().run(model, PassContext())
    assert result.model is model and not result.modified
    assert result.changes == {"rewritten": 0, "skipped": 1}


def test_float16_weights_keep_their_dtype():
    weight = sparse_weight((32, 8), axis=0, dtype=np.float16)
    model = single("MatMul", ["N", 32], ["N", 8], {"w": weight}, dtype=TensorProto.FLOAT16)
    rewritten, record = rewrite(model)
    assert record.changes["rewritten"] == 1
    assert conv_weight(rewritten).dtype == np.float16
    np.testing.assert_array_equal(conv_weight(rewritten)[:, :, 0, 0], weight.T)
    x = RNG.standard_normal((5, 32)).astype(np.float16)
    np.testing.assert_allclose(outputs(rewritten, x).astype(np.float32), outputs(model, x).astype(np.float32),
                               rtol=1e-2, atol=1e-2)


def test_bad_options_and_registration():
    for options in ({"n": 4, "m": 4}, {"n": 0}, {"m": 2.5}, {"only_sparse": "yes"}, {"exclude_regex": "head"},
                    {"exclude_regex": ["("]}):
        with pytest.raises(ValueError):
            SparseGemmToConv(**options)
    assert PASSES["sparse-gemm-to-conv"] is SparseGemmToConv
    assert SparseGemmToConv.lossless and SparseGemmToConv.min_opset == 13
