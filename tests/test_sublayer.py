"""Sub-layer granularity (PTQ-SL): block grids, blocked fake quantization, the per-block search and its ONNX forms."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.blocks import GridSpec, initial_block_steps
from onnxsmith.calibration.metrics import METRICS, metric_fn
from onnxsmith.calibration.scale_search import blocked_fake_quantize, search_layer, uniform_fake_quantize
from onnxsmith.calibration.twin_uniform import initial_delta
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext, default_opset
from onnxsmith.passes.ptq_qdq import PtqQuantize
from onnxsmith.passes.shape_inference import ShapeInference

FAST = dict(n=20)


def reference_blocked(w, block_scales, row_bounds, col_bounds, bits):
    """Block by block with explicit boundaries: round half to even, clip, rescale."""
    out = np.empty_like(w)
    half = 2 ** (bits - 1)
    for r, (r0, r1) in enumerate(zip(row_bounds[:-1], row_bounds[1:])):
        for c, (c0, c1) in enumerate(zip(col_bounds[:-1], col_bounds[1:])):
            s = np.float32(block_scales[r, c])
            out[r0:r1, c0:c1] = np.clip(np.rint(w[r0:r1, c0:c1] / s), -half, half - 1) * s
    return out


def test_grid_spec_parsing_and_realised_blocks():
    assert GridSpec.parse("per-channel") == GridSpec(None, 1)
    assert GridSpec.parse("per-tensor") == GridSpec(1, 1)
    assert GridSpec.parse("16x4") == GridSpec(16, 4)
    assert GridSpec.parse("allx2") == GridSpec(None, 2)
    assert str(GridSpec.parse("allx2")) == "allx2"
    # 10 output channels in "6 blocks" are 5 blocks of 2 (ONNX blocked convention); 10 in 4 are 3, 3, 3, 1
    grid = GridSpec(6, 4).grid(10, 10)
    assert (grid.col_block, grid.row_block, grid.shape, grid.scales) == (2, 3, (4, 5), 20)
    conv = GridSpec(1, 2).grid(5 * 9, 4, unit=9)  # 5 input channels of 3x3 taps: blocks of 3 and 2 channels
    assert (conv.row_block, conv.channel_block, conv.shape) == (27, 3, (2, 1))
    for bad in ("4", "0x1", "4x-1", "x", "per-block"):
        with pytest.raises(ValueError, match="grid"):
            GridSpec.parse(bad)
    with pytest.raises(ValueError, match="whole number"):
        GridSpec(1, 1).grid(10, 3, unit=3)


@pytest.mark.parametrize("k, n, spec, rows, cols", [
    (10, 7, "3x4", [0, 3, 6, 9, 10], [0, 3, 6, 7]),
    (9, 11, "2x2", [0, 5, 9], [0, 6, 11]),
    (12, 8, "allx5", [0, 3, 6, 9, 12], list(range(9))),
])
def test_blocked_fake_quantize_equals_a_loop_over_uneven_blocks(k, n, spec, rows, cols):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.1, 4, size=(1, n))).astype(np.float32)
    grid = GridSpec.parse(spec).grid(k, n)
    scales = rng.uniform(0.01, 0.5, size=grid.shape).astype(np.float32)
    assert grid.shape == (len(rows) - 1, len(cols) - 1)
    np.testing.assert_array_equal(blocked_fake_quantize(w, scales, grid, 4), reference_blocked(w, scales, rows, cols, 4))
    steps = initial_block_steps(w, grid, 6)
    for r, (r0, r1) in enumerate(zip(rows[:-1], rows[1:])):
        for c, (c0, c1) in enumerate(zip(cols[:-1], cols[1:])):
            assert steps[r, c] == np.float32(initial_delta(float(np.abs(w[r0:r1, c0:c1]).max()), 6))


def test_grid_corners_are_per_tensor_and_per_channel():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((12, 5)) * rng.uniform(0.1, 4, size=(1, 5))).astype(np.float32)
    per_tensor = GridSpec.parse("per-tensor").grid(12, 5)
    per_channel = GridSpec.parse("per-channel").grid(12, 5)
    assert per_tensor.shape == (1, 1) and per_channel.shape == (1, 5)
    s = np.float32(0.07)
    np.testing.assert_array_equal(blocked_fake_quantize(w, [[s]], per_tensor, 5), uniform_fake_quantize(w, s, 5))
    column_steps = rng.uniform(0.01, 0.5, size=5).astype(np.float32)
    np.testing.assert_array_equal(blocked_fake_quantize(w, column_steps[None], per_channel, 5),
                                  uniform_fake_quantize(w, column_steps, 5, axis=1))
    x = rng.standard_normal((64, 12)).astype(np.float32)
    default = search_layer(x, w, w_bits=4, a_bits=8, **FAST)
    explicit = search_layer(x, w, w_bits=4, a_bits=8, weight_grid=per_channel, **FAST)
    assert np.array_equal(default.weight_scale, explicit.weight_scale) and default.history == explicit.history


def problem(seed=2, tokens=80, k=12, n=10):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.2, 3, size=k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.05, 2, size=(k, 1)) * rng.uniform(0.1, 3, size=n)).astype(np.float32)
    g = rng.standard_normal((tokens, n)) * rng.uniform(0.1, 5, size=n)
    return x, w, g


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("spec, groups", [("4x3", 1), ("allx2", 3), ("3x1", 4)])
def test_block_search_history_and_returned_metric(metric, spec, groups):
    x, w, g = problem()
    grid = GridSpec.parse(spec).grid(*w.shape)
    act_grid = GridSpec(1, groups).grid(w.shape[0], 1) if groups > 1 else None
    result = search_layer(x, w, w_bits=4, a_bits=6, metric=metric, G=g, weight_grid=grid, act_groups=act_grid,
                          rounds=2, **FAST)
    assert result.weight_scale.shape == grid.shape
    # non-increasing up to float32 rounding: split GEMMs (fixed blocks + searched block) sum in another order
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.history, result.history[1:]))
    assert result.history[-1] < result.history[0]
    if groups > 1:
        assert result.act_scale.shape == (act_grid.shape[0],)
        xq = np.concatenate([uniform_fake_quantize(x[:, sl], np.float32(s), 6)
                             for sl, s in zip(act_grid.row_slices(), result.act_scale)], axis=1)
    else:
        xq = uniform_fake_quantize(x, np.float32(result.act_scale), 6)
    quantized = xq @ blocked_fake_quantize(w, result.weight_scale, grid, 4)
    assert result.metric_value == pytest.approx(metric_fn(metric)(x @ w, quantized, g), rel=1e-6)


def test_finer_grids_reach_lower_error_and_chunking_is_invisible():
    x, w, _ = problem(3, tokens=90)
    errors = {}
    for spec in ("per-tensor", "2x1", "2x3", "allx3"):
        grid = GridSpec.parse(spec).grid(*w.shape)
        whole = search_layer(x, w, w_bits=4, a_bits=8, weight_grid=grid, chunk_rows=None, **FAST)
        chunked = search_layer(x, w, w_bits=4, a_bits=8, weight_grid=grid, chunk_rows=17, **FAST)
        assert np.array_equal(whole.weight_scale, chunked.weight_scale)
        assert chunked.history == pytest.approx(whole.history, rel=1e-6)  # float32 sums in another order
        errors[spec] = whole.metric_value
    assert errors["allx3"] < errors["2x3"] < errors["2x1"] < errors["per-tensor"]


def test_activation_groups_need_a_uniform_quantizer_and_matching_grids():
    from onnxsmith.calibration.scale_search import TwinActQuantizer

    x, w, _ = problem()
    with pytest.raises(ValueError, match="uniform"):
        search_layer(np.abs(x), w, w_bits=4, a_bits=6, act_quantizer=TwinActQuantizer("gelu", 6),
                     act_groups=GridSpec(1, 2).grid(12, 1), **FAST)
    with pytest.raises(ValueError, match="grids must cover"):
        search_layer(x, w, w_bits=4, a_bits=6, weight_grid=GridSpec(2, 2).grid(10, 12), **FAST)


# ---------------------------------------------------------------- ONNX forms


def quantize(model, feeds, **options):
    result = PassManager([ShapeInference(), PtqQuantize(**options)]).run(model, PassContext(calibration_data=feeds))
    return result.model, result.records[-1]


def dq_nodes(model):
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name]


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def gemm_model(op, k, n, rng, trans_b=0):
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) * rng.uniform(0.05, 2, size=(1, 1))).astype(np.float32)
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    model = graphs.make_model(
        [helper.make_node(op, ["x", "w"], ["y"], name="fc", **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return model, (w.T if trans_b else w)


@pytest.mark.parametrize("op, trans_b", [("MatMul", 0), ("Gemm", 1), ("Gemm", 0)])
@pytest.mark.parametrize("spec, groups", [("3x4", 1), ("per-tensor", 1), ("5x1", 2), ("allx3", 3)])
def test_gemm_forms_equal_the_numpy_reference(op, trans_b, spec, groups):
    rng = np.random.default_rng(4)
    k, n = 22, 10
    model, w_gemm = gemm_model(op, k, n, rng, trans_b)
    feeds = [{"x": (rng.standard_normal((6, k)) * rng.uniform(0.2, 3, size=k)).astype(np.float32)} for _ in range(3)]
    quantized, record = quantize(model, feeds, wbits=4, abits=6, rounds=0, weight_grid=spec, act_groups=groups)
    grid = GridSpec.parse(spec).grid(k, n)
    x_all = np.concatenate([f["x"] for f in feeds])
    act_grid = GridSpec(1, groups).grid(k, 1)
    w_hat = blocked_fake_quantize(w_gemm, initial_block_steps(w_gemm, grid, 4), grid, 4)
    for feed in feeds:
        xq = np.concatenate([uniform_fake_quantize(feed["x"][:, sl], np.float32(initial_delta(
            float(np.abs(x_all[:, sl]).max()), 6)), 6) for sl in act_grid.row_slices()], axis=1)
        for optimize in (False, True):  # as written, and with onnxruntime's QDQ fusions
            got = run_session(create_session(quantized, optimize=optimize), feed)["y"]
            np.testing.assert_allclose(got, xq @ w_hat, rtol=1e-5, atol=1e-5)
    (dq,) = dq_nodes(quantized)
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    scale = initializers(quantized)[dq.input[1]]
    assert record.changes["weight_scales"] == grid.scales
    if grid.shape[0] > 1:
        assert attrs["block_size"] == grid.row_block and default_opset(quantized) >= 21
        assert scale.shape[attrs["axis"]] == grid.shape[0]
    else:
        assert "block_size" not in attrs and default_opset(quantized) == 17
        assert scale.size == (1 if grid.scales == 1 else n)
    assert len(np.unique(scale)) <= grid.scales


def test_conv_blocks_follow_input_channels():
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((6, 5, 3, 3)) * rng.uniform(0.05, 2, size=(6, 5, 1, 1))).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 7, 7])],
        [numpy_helper.from_array(weight, "w")],
    )
    feeds = [{"x": rng.standard_normal((1, 5, 7, 7)).astype(np.float32)} for _ in range(2)]
    quantized, record = quantize(model, feeds, wbits=4, abits=8, rounds=0, weight_grid="2x2", act_groups=2)
    (dq,) = dq_nodes(quantized)
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 1, "block_size": 3}
    levels, scale = (initializers(quantized)[name] for name in dq.input[:2])
    assert scale.shape == (6, 2, 3, 3)
    w_gemm = weight.reshape(6, -1).T  # im2col rows: channel-major, 9 taps each
    grid = GridSpec(2, 2).grid(45, 6, unit=9)
    expected = blocked_fake_quantize(w_gemm, initial_block_steps(w_gemm, grid, 4), grid, 4).T.reshape(weight.shape)
    restored = levels.astype(np.float32) * np.repeat(scale, 3, axis=1)[:, :5]
    np.testing.assert_array_equal(restored, expected)
    assert record.changes["weight_scales"] == 4
    groups = [d for d in record.details if d.get("groups")]
    assert len(groups) == 1 and groups[0]["groups"] == 2
    reference = run_session(create_session(quantized, optimize=False), feeds[0])["y"]
    fused = run_session(create_session(quantized, optimize=True), feeds[0])["y"]
    assert reference.shape == (1, 6, 7, 7)
    np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-5)


def test_weight_only_leaves_activations_float():
    rng = np.random.default_rng(6)
    model, w = gemm_model("MatMul", 16, 8, rng)
    feeds = [{"x": rng.standard_normal((5, 16)).astype(np.float32)} for _ in range(2)]
    quantized, record = quantize(model, feeds, wbits=4, rounds=1, weight_grid="2x1", weight_only=True, **FAST)
    assert not [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert not [d for d in record.details if d.get("kind") == "activation"]
    (dq,) = dq_nodes(quantized)
    levels, scale = (initializers(quantized)[name] for name in dq.input[:2])
    restored = levels.astype(np.float32) * scale  # per-channel form: each output block's step repeated
    assert len(np.unique(scale)) <= 2
    for feed in feeds:  # onnxruntime's fusions must not quantize the float activation (MatMulNBits)
        for optimize in (False, True):
            got = run_session(create_session(quantized, optimize=optimize), feed)["y"]
            np.testing.assert_allclose(got, feed["x"] @ restored, rtol=1e-5, atol=1e-5)
    untouched, _ = quantize(graphs.attention_block(), [{"x": rng.standard_normal((2, 6, 16)).astype(np.float32)}],
                            wbits=4, rounds=0, weight_only=True)
    assert not [n for n in untouched.graph.node if n.op_type == "QuantizeLinear"]


def test_ptq_sl_recipe_gives_the_grid_and_bits_to_both_passes():
    from onnxsmith.optimizer.recipes import load_recipe

    passes = {p.name: p for p in load_recipe("ptq-sl").build({"weight_grid": "32x4", "wbits": 4})}
    assert list(passes)[-2:] == ["reorder-channels", "ptq-qdq"]
    assert passes["ptq-qdq"].grid_spec == GridSpec(32, 4) and passes["ptq-qdq"].options.wbits == 4
    assert passes["ptq-qdq"].min_opset == 21
    assert passes["reorder-channels"].weight_grid == GridSpec(32, 4) and passes["reorder-channels"].options.wbits == 4
