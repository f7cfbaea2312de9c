"""qparams: scale/zero-point rules, and quantize/dequantize bit-exact against onnxruntime's QuantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxsmith.calibration.qparams import (
    MIN_SCALE,
    asymmetric_qparams,
    dequantize,
    fake_quantize,
    quantize,
    symmetric_scale,
)


def _session(op: str, input_dtype: np.dtype, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, rank: int):
    """A one-node opset-21 model ``op(x, scale, zero_point)`` with constant parameters, on onnxruntime's CPU."""
    output_dtype = np.float32 if op == "DequantizeLinear" else zero_point.dtype
    attributes = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "scale", "zero_point"], ["y"], **attributes)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(input_dtype)), [None] * rank)],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(output_dtype)), [None] * rank)],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zero_point")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], scale: np.ndarray, axis: int | None) -> np.ndarray:
    """Random values around the quantized range, exact ties (x / scale = k + 0.5 in float32), and saturation."""
    layout = [1] * len(shape)
    if axis is not None:
        layout[axis] = shape[axis]
    step = np.broadcast_to(scale.reshape(layout), shape)
    values = rng.uniform(-300, 300, size=shape) * step
    k = rng.integers(-200, 200, size=shape)
    ties = ((k + 0.5) * step).astype(np.float32)
    ties = np.where(ties / step.astype(np.float32) == k + 0.5, ties, values)  # keep only exact float32 ties
    choice = rng.integers(0, 3, size=shape)
    far = rng.choice([-1e30, -1e6, 1e6, 1e30, -np.inf, np.inf], size=shape)
    x = np.select([choice == 0, choice == 1], [values, ties], far).astype(np.float32)
    x.reshape(-1)[:2] = [np.inf, -1e6]  # saturation at both ends even for tiny shapes
    return x


CASES = [
    # (dtype, per-tensor or per-axis scale, zero point, axis, shape)
    (np.uint8, np.float32(0.0137), np.uint8(128), None, (4099,)),
    (np.uint8, np.float32(0.25), np.uint8(3), None, (7,)),
    (np.int8, np.float32(0.0213), np.int8(0), None, (3, 1025)),
    (np.int8, np.float32(0.5), np.int8(-5), None, (5,)),
    (np.int8, np.array([0.01, 0.25, 0.037, 1.5], np.float32), np.array([0, 3, -7, 0], np.int8), 1, (3, 4, 129)),
    (np.int8, np.array([0.02, 0.125, 0.9], np.float32), np.zeros(3, np.int8), 0, (3, 5, 2)),
    (np.int8, np.array([0.3, 0.07], np.float32), np.array([1, -1], np.int8), -1, (9, 2)),
    (np.uint8, np.array([0.05, 0.5], np.float32), np.array([0, 255], np.uint8), 0, (2, 33)),
]


@pytest.mark.parametrize(("dtype", "scale", "zero_point", "axis", "shape"), CASES)
def test_quantize_dequantize_equal_onnxruntime(dtype, scale, zero_point, axis, shape) -> None:
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    x = _inputs(np.random.default_rng(0), shape, scale, axis)
    expected = _session("QuantizeLinear", np.float32, scale, zero_point, axis, len(shape)).run(None, {"x": x})[0]
    q = quantize(x, scale, zero_point, dtype, axis)
    assert q.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(q, expected)
    assert (q == np.iinfo(dtype).max).any() and (q == np.iinfo(dtype).min).any()  # saturation was exercised

    everything = np.random.default_rng(1).integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, shape).astype(dtype)
    session = _session("DequantizeLinear", dtype, scale, zero_point, axis, len(shape))
    for codes in (q, everything):
        restored = dequantize(codes, scale, zero_point, axis)
        assert restored.dtype == np.float32
        np.testing.assert_array_equal(restored, session.run(None, {"x": codes})[0])
    np.testing.assert_array_equal(fake_quantize(x, scale, zero_point, dtype, axis), dequantize(q, scale, zero_point, axis))


def test_ties_round_half_to_even() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5], np.float32) * np.float32(0.25)
    np.testing.assert_array_equal(quantize(x, np.float32(0.25), np.int8(0), np.int8), [0, 2, 2, 0, -2, -2, 126, 127])  # 128 saturates
    np.testing.assert_array_equal(quantize(x, np.float32(0.25), np.uint8(10), np.uint8), [10, 12, 12, 10, 8, 8, 136, 138])


def test_division_is_float32() -> None:
    # 15.081 / 0.914 (as float32) is 16.5000008 in float64 but rounds to exactly 16.5 in float32, then to 16 (even):
    # onnxruntime divides in float32; float64 division would give 17.
    x, scale = np.float32(15.081), np.float32(0.914)
    assert np.float64(x) / np.float64(scale) > 16.5 and x / scale == np.float32(16.5)
    assert quantize(x, scale, np.int8(0), np.int8) == 16
    session = _session("QuantizeLinear", np.float32, np.asarray(scale), np.asarray(np.int8(0)), None, 1)
    assert session.run(None, {"x": np.array([x])})[0][0] == 16


def test_symmetric_scale() -> None:
    assert symmetric_scale(127.0) == np.float32(1.0)
    assert symmetric_scale(7.0, bits=4) == np.float32(1.0)
    scales = symmetric_scale(np.array([0.0, 1.27, 254.0]))
    assert scales.dtype == np.float32
    np.testing.assert_array_equal(scales, np.array([MIN_SCALE, 0.01, 2.0], np.float32))
    assert quantize(np.float32(0), scales[0], np.int8(0), np.int8) == 0
    assert quantize(np.float32(1e-3), scales[0], np.int8(0), np.int8) == 127  # saturates, no error
    with pytest.raises(ValueError, match="amax"):
        symmetric_scale(-1.0)


@pytest.mark.parametrize(
    ("lo", "hi", "dtype", "scale", "zero_point"),
    [
        (-64.0, 191.0, np.uint8, 1.0, 64),
        (-64.0, 191.0, np.int8, 1.0, -64),
        (2.0, 5.1, np.uint8, 0.02, 0),  # extended to [0, 5.1]
        (-5.1, -2.0, np.uint8, 0.02, 255),  # extended to [-5.1, 0]
        (-5.1, -2.0, np.int8, 0.02, 127),
        (0.0, 0.0, np.uint8, MIN_SCALE, 0),
    ],
)
def test_asymmetric_qparams_by_hand(lo, hi, dtype, scale, zero_point) -> None:
    got_scale, got_zero_point = asymmetric_qparams(lo, hi, dtype)
    assert got_scale.dtype == np.float32 and got_zero_point.dtype == np.dtype(dtype)
    assert got_scale == np.float32(scale) and got_zero_point == zero_point


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(-1e6, 1e6, allow_subnormal=False),
    width=st.floats(0, 1e6, allow_subnormal=False),
    dtype=st.sampled_from([np.uint8, np.int8]),
)
def test_asymmetric_qparams_represent_zero_exactly(lo: float, width: float, dtype) -> None:
    hi = lo + width
    scale, zero_point = asymmetric_qparams(lo, hi, dtype)
    assert scale > 0 and np.iinfo(dtype).min <= zero_point <= np.iinfo(dtype).max
    assert dequantize(zero_point, scale, zero_point) == 0.0
    assert fake_quantize(np.float32(0.0), scale, zero_point, dtype) == 0.0
    # The grid covers the range extended to 0, up to half a step lost to rounding the zero point.
    low, high = dequantize(np.array([np.iinfo(dtype).min, np.iinfo(dtype).max], dtype), scale, zero_point)
    assert low <= min(lo, 0) + 0.5001 * scale and high >= max(hi, 0) - 0.5001 * scale


def test_per_channel_qparams() -> None:
    scale, zero_point = asymmetric_qparams(np.array([-1.0, 0.0, 2.0]), np.array([1.0, 2.55, 3.0]), np.uint8)
    assert scale.shape == zero_point.shape == (3,)
    assert zero_point[1] == 0 and zero_point[2] == 0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="lo <= hi"):
        asymmetric_qparams(1.0, 0.0)
    with pytest.raises(ValueError, match="unsupported quantized type"):
        quantize(np.zeros(2, np.float32), np.float32(1), 0, np.int32)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize(np.zeros(2, np.float32), np.float32(0), 0, np.int8)
    with pytest.raises(ValueError, match="does not fit"):
        quantize(np.zeros(2, np.float32), np.float32(1), 300, np.uint8)
    with pytest.raises(ValueError, match=r"per-axis scale must have shape \(2,\)"):
        quantize(np.zeros((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3, np.int8), np.int8, axis=0)
    with pytest.raises(ValueError, match="per-tensor scale must be a scalar"):
        dequantize(np.zeros(3, np.int8), np.ones(3, np.float32), np.int8(0))
