"""INT8 QDQ placement and semantics on small graphs; results run in onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.passes.qdq_int8 import QuantizeInt8
from onnxsmith.passes.shape_inference import ShapeInference


def feeds_for(shape, count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def quantize_model(model, feeds, **options):
    """cleanup + int8-qdq through the manager, as the w8a8 recipe runs it."""
    passes = load_recipe("w8a8").build({"int8-qdq": options})
    result = PassManager(passes, probe_feeds=feeds[:1]).run(model, PassContext(calibration_data=feeds))
    return result


def quantized_inputs(model: onnx.ModelProto) -> dict[str, set[str]]:
    """For every node: which of its inputs are read through a DequantizeLinear (by original tensor name)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    result = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        names = set()
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                names.add(name.removesuffix("_dequantized"))
        result[node.name] = names
    return result


def test_conv_bn_relu_placement_and_it_runs():
    feeds = feeds_for((2, 3, 8, 8))
    result = quantize_model(graphs.conv_bn_relu(), feeds)
    model = result.model
    placed = quantized_inputs(model)
    assert placed["conv1"] == {"x", "w1_bnfold"}
    assert placed["conv2"] == {"r1", "w2_bnfold"}
    assert placed["relu1"] == set()
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")]
    assert len(weight_dq) == 2 and all(a.i == 0 for n in weight_dq for a in n.attribute if a.name == "axis")
    fp = run_session(create_session(graphs.conv_bn_relu()), feeds[0])["y"]
    q = run_session(create_session(model), feeds[0])["y"]
    cosine = float(np.sum(fp * q) / np.linalg.norm(fp) / np.linalg.norm(q))
    assert cosine > 0.99


def test_matmul_add_gelu_quantizes_only_gemm_inputs():
    result = quantize_model(graphs.matmul_add_gelu(), feeds_for((2, 5, 16)))
    placed = quantized_inputs(result.model)
    assert placed["fc1"] == {"x", "w1"}
    assert placed["fc2"] == {"g", "w2"}
    for name in ("fc1_bias", "gelu_scale", "gelu_erf", "gelu_add", "gelu_mul", "gelu_half", "fc2_bias"):
        assert placed[name] == set(), name
    axes = {n.input[0]: [a.i for a in n.attribute if a.name == "axis"] for n in result.model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")}
    assert axes == {"w1_int8": [1], "w2_int8": [1]}


def test_attention_block_placement():
    result = quantize_model(graphs.attention_block(), feeds_for((2, 6, 16)))
    model = result.model
    placed = quantized_inputs(model)
    assert placed["q_proj"] == {"x", "wq"} and placed["k_proj"] == {"x", "wk"} and placed["v_proj"] == {"x", "wv"}
    assert placed["scores"] == {"q", "kt"}
    assert placed["context"] == {"p", "v"}
    assert placed["o_proj"] == {"ctx", "wo"}
    for name in ("scale", "where", "softmax", "o_bias", "residual", "layernorm", "shape", "seq_len", "mask",
                 "k_transpose"):
        assert placed[name] == set(), name
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[0] for n in q_nodes) == sorted(["x", "q", "kt", "p", "v", "ctx"])  # x quantized once
    run_session(create_session(model), feeds_for((1, 6, 16))[0])


def test_activation_matmuls_can_stay_float():
    result = quantize_model(graphs.attention_block(), feeds_for((2, 6, 16)), activation_matmuls=False)
    placed = quantized_inputs(result.model)
    assert placed["scores"] == set() and placed["context"] == set()
    skipped = {d["node"]: d["reason"] for d in result.records[-1].details if d["kind"] == "skipped"}
    assert "activation_matmuls is off" in skipped["scores"]


@pytest.mark.parametrize(("act_dtype", "dtype"), [("uint8", onnx.TensorProto.UINT8), ("int8", onnx.TensorProto.INT8)])
def test_activation_dtype_and_zero_points(act_dtype, dtype):
    result = quantize_model(graphs.matmul_add_gelu(), feeds_for((2, 5, 16)), act_dtype=act_dtype)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    tensors = {t.name: t for t in result.model.graph.initializer}
    quantize_nodes = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes
    for node in quantize_nodes:
        assert tensors[node.input[2]].data_type == dtype
        if act_dtype == "int8":
            assert inits[node.input[2]] == 0
    for name, values in inits.items():
        if name.endswith("_int8"):
            assert values.dtype == np.int8


def test_weight_quantization_is_symmetric_per_channel_and_exact():
    model = graphs.matmul_add_gelu()
    result = quantize_model(model, feeds_for((2, 5, 16)))
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    scale = inits["w1_scale"]
    np.testing.assert_allclose(scale, np.abs(w1).max(axis=0) / 127, rtol=1e-6)
    assert (inits["w1_zero_point"] == 0).all()
    np.testing.assert_array_equal(inits["w1_int8"], np.clip(np.rint(w1 / scale), -128, 127).astype(np.int8))
    weight_details = [d for d in result.records[-1].details if d["kind"] == "weight"]
    assert {d["tensor"] for d in weight_details} == {"w1", "w2"}
    assert all(d["sqnr_db"] > 30 for d in weight_details)


def test_exclusions_by_name_op_and_regex():
    feeds = feeds_for((2, 6, 16))
    by_name = quantize_model(graphs.attention_block(), feeds, exclude_nodes=["o_proj"])
    assert quantized_inputs(by_name.model)["o_proj"] == set()
    by_regex = quantize_model(graphs.attention_block(), feeds, exclude_regex=["^[qkv]_proj$"])
    placed = quantized_inputs(by_regex.model)
    assert placed["q_proj"] == placed["k_proj"] == placed["v_proj"] == set()
    assert placed["o_proj"] == {"ctx", "wo"}
    by_op = quantize_model(graphs.conv_bn_relu(), feeds_for((2, 3, 8, 8)), exclude_ops=["Conv"])
    assert not any(n.op_type == "QuantizeLinear" for n in by_op.model.graph.node)


def test_calibration_request_names_exactly_the_quantized_activations():
    cleaned = PassManager(load_recipe("cleanup").build()).run(graphs.attention_block()).model
    request = QuantizeInt8().calibration_request(cleaned)
    assert sorted(request) == sorted(["x", "q", "kt", "p", "v", "ctx"])


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="act_dtype"):
        QuantizeInt8(act_dtype="int4")
    with pytest.raises(ValueError, match="calibrator"):
        QuantizeInt8(calibrator="magic")


def test_weight_behind_a_transpose_is_quantized_per_channel_before_the_transpose():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((12, 16)).astype(np.float32)  # [vocab, hidden], read as MatMul(x, table^T)
    model = graphs.make_model(
        [
            helper.make_node("Transpose", ["table"], ["table_t"], name="head_transpose", perm=[1, 0]),
            helper.make_node("MatMul", ["x", "table_t"], ["y"], name="lm_head"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(table, "table")],
    )
    feeds = feeds_for((3, 16))
    # Without constant folding: a large tied head keeps its Transpose (folding would duplicate the table).
    result = PassManager([ShapeInference(), QuantizeInt8()]).run(model, PassContext(calibration_data=feeds))
    nodes = {n.name: n for n in result.model.graph.node}
    assert nodes["head_transpose"].input[0] == "table_dequantized"
    dq = nodes["table_DequantizeLinear"]
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]  # one scale per vocabulary row = output channel
    assert [n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"] == ["x"]


def test_twin_uniform_fake_quant_form_matches_the_numpy_reference():
    from onnx import TensorProto, helper

    from onnxsmith.calibration.qparams import fake_quantize
    from onnxsmith.calibration.twin_uniform import TwinParams, twin_fake_quantize

    model = graphs.make_model(
        [
            helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"], name="context"),
        ],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 6, 6]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])],
    )
    rng = np.random.default_rng(0)
    feeds = [{"s": rng.standard_normal((1, 6, 6)).astype(np.float32) * 3,
              "v": rng.standard_normal((1, 6, 4)).astype(np.float32)} for _ in range(4)]
    result = PassManager([ShapeInference(), QuantizeInt8(twin=True)]).run(model, PassContext(calibration_data=feeds))
    assert result.records[-1].changes["twin_uniform"] == 1
    twin = next(d for d in result.records[-1].details if d.get("dtype") == "twin-softmax")
    params = TwinParams(8, twin["delta_r1"], twin["delta_r2"], "softmax")
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    feed = feeds[0]
    e = np.exp(feed["s"] - feed["s"].max(-1, keepdims=True))
    probabilities = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    v_hat = fake_quantize(feed["v"], inits["v_scale"], inits["v_zero_point"], np.uint8)
    expected = twin_fake_quantize(probabilities, params) @ v_hat
    actual = run_session(create_session(result.model, optimize=False), feed)["y"]
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert not np.allclose(actual, probabilities @ feed["v"], atol=1e-5)  # it did quantize


@pytest.mark.parametrize("graph_name", ["attention_block", "matmul_add_gelu"])
def test_dual_gemm_form_equals_the_fake_quant_form(graph_name):
    build = getattr(graphs, graph_name)
    feeds = feeds_for((2, 6, 16) if graph_name == "attention_block" else (2, 5, 16))
    results = {
        form: PassManager([ShapeInference(), QuantizeInt8(twin=True, twin_form=form)]).run(
            build(), PassContext(calibration_data=feeds))
        for form in ("fake-quant", "dual-gemm")
    }
    assert results["fake-quant"].records[-1].changes["twin_uniform"] == 1
    dual = results["dual-gemm"].model
    assert not any(n.op_type == "Where" and n.name.endswith("_twin_Where") for n in dual.graph.node)
    assert sum(n.name.endswith("_parts_sum") for n in dual.graph.node) == 1
    outputs = {form: run_session(create_session(r.model, optimize=False), feeds[0])["y"] for form, r in results.items()}
    np.testing.assert_allclose(outputs["dual-gemm"], outputs["fake-quant"], atol=1e-4, rtol=1e-4)


def test_bad_twin_form_is_rejected():
    with pytest.raises(ValueError, match="twin_form"):
        QuantizeInt8(twin=True, twin_form="triple-gemm")


def test_a_tied_weight_read_along_two_axes_gets_one_dequantize_per_axis():
    """Regression (found by test_fuzz_passes): a weight shared by ``MatMul(x, W)`` (output channels on axis 1) and
    ``Gemm(h, W, transB=1)`` (axis 0) was quantized twice under the same tensor names, so the export kept one
    DequantizeLinear and the MatMul read scales along its reduction axis."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Gemm", ["h", "w"], ["y"], name="gemm", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(w, "w")],
    )
    quantized = quantize_model(model, feeds_for((2, 6))).model
    producers = {out: node for node in quantized.graph.node for out in node.output}
    axes = {}
    for node in quantized.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            axes[node.name] = next(a.i for a in dq.attribute if a.name == "axis")
    assert axes == {"mm": 1, "gemm": 0}


def test_an_already_quantized_model_is_left_alone_and_the_nodes_are_reported():
    feeds = feeds_for((2, 3, 8, 8))
    once = quantize_model(graphs.conv_bn_relu(), feeds).model
    twice = quantize_model(once, feeds)
    record = twice.records[-1]
    assert record.name == "int8-qdq" and not record.modified
    assert record.changes["weights_quantized"] == 0 and record.changes["activations_quantized"] == 0
    skipped = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
    assert skipped == {"conv1": "already quantized (reads a DequantizeLinear output)",
                       "conv2": "already quantized (reads a DequantizeLinear output)"}
    for name in ("QuantizeLinear", "DequantizeLinear"):
        assert sum(n.op_type == name for n in twice.model.graph.node) == sum(n.op_type == name for n in once.graph.node)
