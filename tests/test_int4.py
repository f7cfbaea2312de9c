"""INT4: packing, the blocked DequantizeLinear and MatMulNBits forms, step choices, AWQ folding, block fallbacks."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.awq import search_awq
from onnxsmith.calibration.int4 import dequantize_blocks, mse_scales, output_error, quantize_blocks, rtn_scales
from onnxsmith.calibration.gptq import gptq_quantize
from onnxsmith.core.int4 import int4_initializer, pack_int4, unpack_int4
from onnxsmith.core.errors import PassError
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.awq_scale import AwqScale
from onnxsmith.passes.int4_weight import Int4Weight
from onnxsmith.rewrite.channel_scaling import plan_input_scaling
from onnxsmith.core.graph import export_graph, import_graph

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("count", [1, 2, 7, 16, 33])
def test_pack_unpack_round_trips_signed_and_unsigned(count):
    signed = RNG.integers(-8, 8, size=count)
    signed[0] = -8
    packed = pack_int4(signed)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count), signed)
    unsigned = RNG.integers(0, 16, size=count)
    np.testing.assert_array_equal(unpack_int4(pack_int4(unsigned), count, signed=False), unsigned)


def test_packing_matches_onnx_int4_layout():
    levels = RNG.integers(-8, 8, size=(5, 3)).astype(np.int8)  # 15 values: odd count, negatives
    tensor = int4_initializer("w", levels)
    assert tensor.data_type == TensorProto.INT4 and list(tensor.dims) == [5, 3] and len(tensor.raw_data) == 8
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), levels)
    assert pack_int4([1, -1])[0] == 0xF1  # element 0 in the low nibble


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 15\]"):
        pack_int4([16])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4_initializer("w", np.array([8]))


def _dq_model(levels, scales, block):
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=block)
    output = helper.make_tensor_value_info("w", TensorProto.FLOAT, list(levels.shape))
    graph = helper.make_graph([node], "dq", [], [output],
                              [int4_initializer("q", levels), numpy_helper.from_array(scales, "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_blocked_dequantize_linear_equals_numpy_reference(block):
    w = RNG.standard_normal((128, 24)).astype(np.float32)
    scales = rtn_scales(w, block)
    levels = quantize_blocks(w, scales, block)
    model = _dq_model(levels, scales, block)
    onnx.checker.check_model(model, full_check=True)
    (out,) = create_session(model, optimize=False).run(None, {})
    np.testing.assert_array_equal(out, dequantize_blocks(levels, scales, block))
    assert levels.min() >= -8 and levels.max() <= 7


def test_quantize_blocks_rounds_half_to_even_and_clips():
    w = np.array([[0.5], [1.5], [2.5], [-9.0]], np.float32)
    np.testing.assert_array_equal(quantize_blocks(np.tile(w, (4, 1)), np.ones((1, 1), np.float32), 16)[:4, 0],
                                  [0, 2, 2, -8])


def test_mse_steps_never_lose_to_round_to_nearest():
    w = RNG.standard_normal((128, 16)).astype(np.float32)
    w[3, :] *= 8  # an outlier row makes max-based steps coarse
    h = RNG.uniform(0.1, 2.0, size=128).astype(np.float32)
    gram = np.diag(h)
    for block in (32, 64):
        def error(steps):
            return output_error(gram, w - dequantize_blocks(quantize_blocks(w, steps, block), steps, block))
        assert error(mse_scales(w, block, h)) < error(rtn_scales(w, block))


def test_awq_search_never_loses_to_round_to_nearest():
    x = RNG.standard_normal((512, 64)).astype(np.float32) * np.exp(RNG.standard_normal(64)).astype(np.float32)
    gram = x.T @ x / len(x)
    weights = [RNG.standard_normal((64, 32)).astype(np.float32) for _ in range(2)]
    choice = search_awq(gram, weights, 32)
    assert choice.error <= choice.rtn_error and choice.alpha > 0 and choice.factors.shape == (64,)


# ------------------------------------------------------------------------------------------- the pass


def single(op, weight, k, n, bias=None, **attrs):
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "c"))
        inputs.append("c")
    return graphs.make_model([helper.make_node(op, inputs, ["y"], name="layer", **attrs)],
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], inits, opset=21)


def quantize(model, feeds=None, **options):
    result = PassManager([Int4Weight(**options)]).run(model, PassContext(calibration_data=feeds, progress=False))
    return result.model, result.records[-1]


def feeds_for(k, count=3):
    return [{"x": RNG.standard_normal((6, k)).astype(np.float32)} for _ in range(count)]


LAYOUTS = [
    ("MatMul", (128, 40), {}, None),
    ("Gemm", (128, 40), {}, None),
    ("Gemm", (40, 128), {"transB": 1}, np.linspace(-1, 1, 40).astype(np.float32)),
    ("Gemm", (40, 128), {"transB": 1, "alpha": 0.5, "beta": 2.0}, np.linspace(-1, 1, 40).astype(np.float32)),
]


@pytest.mark.parametrize("op, shape, attrs, bias", LAYOUTS)
def test_qdq_and_matmul_nbits_forms_agree_with_numpy(op, shape, attrs, bias):
    weight = RNG.standard_normal(shape).astype(np.float32)
    model = single(op, weight, 128, 40, bias, **attrs)
    qdq, _ = quantize(model, method="rtn", block_size=64, target="tensorrt")
    nbits, record = quantize(model, method="rtn", block_size=64, target="onnxruntime")
    assert record.changes["layers_quantized"] == 1
    w_kn = weight.T if attrs.get("transB") else weight
    steps = rtn_scales(w_kn, 64)
    expected_w = dequantize_blocks(quantize_blocks(w_kn, steps, 64), steps, 64)
    x = RNG.standard_normal((5, 128)).astype(np.float32)
    expected = attrs.get("alpha", 1.0) * (x @ expected_w) + (0 if bias is None else attrs.get("beta", 1.0) * bias)
    for candidate in (qdq, nbits):
        for optimize in (False, True):
            out = run_session(create_session(candidate, optimize=optimize), {"x": x})["y"]
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    ops = {n.op_type for n in nbits.graph.node}
    assert "MatMulNBits" in ops and op not in ops
    (dq,) = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    attrs_dq = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs_dq == {"axis": 1 if attrs.get("transB") else 0, "block_size": 64} and len(dq.input) == 2
    types = {t.name: t.data_type for t in qdq.graph.initializer}
    assert types[dq.input[0]] == TensorProto.INT4 and types[dq.input[1]] == TensorProto.FLOAT


def test_scale_dtype_follows_a_float16_weight():
    model = single("MatMul", RNG.standard_normal((64, 8)).astype(np.float16), 64, 8)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    result = Int4Weight(method="rtn").run(model, PassContext(progress=False))
    scales = [t for t in result.model.graph.initializer if t.name.endswith("_scale")]
    assert [t.data_type for t in scales] == [TensorProto.FLOAT16]


def test_indivisible_block_falls_back_errors_or_skips():
    model = single("MatMul", RNG.standard_normal((96, 8)).astype(np.float32), 96, 8)
    _, record = quantize(model, method="rtn", block_size=64, target="onnxruntime")
    (detail,) = [d for d in record.details if d["kind"] == "weight"]
    assert detail["block"] == 32 and "64 does not divide K = 96" in detail["notes"][0]
    _, record = quantize(model, method="rtn", block_size=64, target="tensorrt")  # 32 is not a TensorRT size
    assert record.changes["layers_quantized"] == 0
    assert "no allowed smaller block" in next(d["reason"] for d in record.details if d["kind"] == "skipped")
    with pytest.raises(PassError, match="block size 64 does not divide K = 96 at node 'layer'"):
        quantize(model, method="rtn", block_size=64, indivisible="error")
    with pytest.raises(ValueError, match="TensorRT's INT4"):
        Int4Weight(block_size=32, target="tensorrt")


def test_shared_transposed_and_3d_weights_are_skipped_with_reasons():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "shared"),
             numpy_helper.from_array(rng.standard_normal((2, 64, 64)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "embedding")]
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "shared"], ["b"], name="second"),
             helper.make_node("MatMul", ["b", "w3"], ["c"], name="batched"),
             helper.make_node("Transpose", ["embedding"], ["head_weight"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["c", "head_weight"], ["y"], name="head")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 64])], inits, opset=21)
    _, record = quantize(model, method="rtn")
    reasons = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
    assert reasons == {"first": "weight is shared with other nodes", "second": "weight is shared with other nodes",
                       "batched": "weight is 3-D (INT4 blocks need a 2-D weight)",
                       "head": "weight is a Transpose of a constant (a tied embedding?), not a constant"}


def test_awq_factors_fold_losslessly_into_producers():
    model = graphs.transformer_block(64, 128)
    graph = import_graph(model)
    by_name = {n.name: n for n in graph.nodes}
    factors = np.exp(RNG.standard_normal(64) * 0.5).astype(np.float32)
    down_factors = np.exp(RNG.standard_normal(128) * 0.5).astype(np.float32)
    plan = plan_input_scaling(by_name["q_proj"].inputs[0], {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}, 64)
    down_plan = plan_input_scaling(by_name["down_proj"].inputs[0], {"down_proj"}, 128)
    assert plan.where == ["ln"] and down_plan.where == ["up_proj"]
    assert plan_input_scaling(by_name["q_proj"].inputs[0], {"q_proj"}, 64) is None  # other readers would see it
    plan.apply(factors)
    down_plan.apply(down_factors)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        weight = by_name[name].inputs[1]
        weight.values = weight.values * factors[:, None]
    by_name["down_proj"].inputs[1].values = by_name["down_proj"].inputs[1].values * down_factors[:, None]
    scaled = export_graph(graph, model)
    feed = {"x": RNG.standard_normal((2, 5, 64)).astype(np.float32)}
    before = run_session(create_session(model, optimize=False), feed)["y"]
    after = run_session(create_session(scaled, optimize=False), feed)["y"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_awq_and_learned_steps_lower_the_output_error():
    model = graphs.transformer_block(64, 128)
    scale = np.exp(RNG.standard_normal(64)).astype(np.float32)
    feeds = [{"x": (RNG.standard_normal((2, 16, 64)) * scale).astype(np.float32)} for _ in range(4)]
    reference = [run_session(create_session(model), f)["y"] for f in feeds]

    def error(candidate):
        session = create_session(candidate)
        return sum(float(np.sum((run_session(session, f)["y"] - r) ** 2)) for f, r in zip(feeds, reference))

    rtn, _ = quantize(model, feeds, method="rtn", block_size=64)
    scaled = PassManager([AwqScale(block_size=64)]).run(model, PassContext(calibration_data=feeds, progress=False))
    record = scaled.records[-1]
    assert record.verification is not None  # lossless: the manager compared the outputs
    awq, _ = quantize(scaled.model, feeds, method="rtn", block_size=64)
    learned, learned_record = quantize(model, feeds, method="mse", block_size=64, learn_steps=30)
    assert record.changes == {"groups": 2, "folded": 2}
    assert {tuple(d["into"]) for d in record.details} == {("ln",), ("up_proj",)}
    assert error(awq) < error(rtn)
    weights = [d for d in learned_record.details if d["kind"] == "weight"]
    assert all(d["learned_to"] <= d["learned_from"] for d in weights)
    assert any(d["learned_to"] < 0.99 * d["learned_from"] for d in weights)


def test_gptq_rounding_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1024, 128)).astype(np.float32)
    x = x @ (np.eye(128) + rng.standard_normal((128, 128)) / 3).astype(np.float32)
    gram = x.T @ x / len(x)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    steps = mse_scales(w, 32, np.diag(gram))
    nearest = output_error(gram, w - dequantize_blocks(quantize_blocks(w, steps, 32), steps, 32))
    levels, gptq_steps = gptq_quantize(w, gram, 32)
    assert levels.dtype == np.int8 and levels.min() >= -8 and levels.max() <= 7
    assert output_error(gram, w - dequantize_blocks(levels, gptq_steps, 32)) < 0.9 * nearest
    fixed, same_steps = gptq_quantize(w, gram, 32, steps=steps)
    np.testing.assert_array_equal(same_steps, steps)
    with pytest.raises(ValueError, match="learn_steps"):
        Int4Weight(rounding="gptq", learn_steps=5)


def test_awq_scale_leaves_an_input_with_other_readers_unscaled():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.ones(64, np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w"], ["h"], name="proj"),
             helper.make_node("Add", ["ln", "h"], ["y"], name="residual")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)
    result = PassManager([AwqScale()]).run(model, PassContext(calibration_data=feeds_for(64), progress=False))
    record = result.records[-1]
    assert not record.modified and record.changes == {"groups": 1, "folded": 0}
    assert record.details == [{"input": "ln", "layers": ["proj"], "kind": "not folded",
                               "reason": "no producer absorbs a per-channel scaling"}]
