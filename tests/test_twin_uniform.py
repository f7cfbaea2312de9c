"""Tests of onnxsmith.calibration.twin_uniform against an independent plain-numpy reference."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsmith.calibration.metrics import cosine, mse
from onnxsmith.calibration.qparams import dequantize, quantize
from onnxsmith.calibration.twin_uniform import (
    GELU_MIN,
    TwinParams,
    gelu_r1_delta,
    initial_delta,
    search_grid,
    search_twin,
    softmax_r1_candidates,
    split_parts,
    twin_fake_quantize,
)

BITS = (4, 6, 8)


# ---------------------------------------------------------------- independent reference (plain numpy)


def ref_uniform(x: np.ndarray, delta: float, lo: int, hi: int) -> np.ndarray:
    """clip(rint(x / delta), lo, hi) * delta, with float32 division and multiplication."""
    d = np.float32(delta)
    levels = np.clip(np.rint(np.asarray(x, np.float32) / d), lo, hi)
    return levels.astype(np.float32) * d


def ref_softmax(x: np.ndarray, bits: int, d1: float, d2: float) -> np.ndarray:
    half = 2 ** (bits - 1)
    split = np.float32(half) * np.float32(d1)
    return np.where(x < split, ref_uniform(x, d1, 0, half - 1), ref_uniform(x, d2, 0, half - 1))


def ref_gelu_where(x: np.ndarray, bits: int, d1: float, d2: float) -> np.ndarray:
    half = 2 ** (bits - 1)
    return np.where(x < 0, ref_uniform(x, d1, -half, 0), ref_uniform(x, d2, 0, half - 1))


def ref_gelu_sum(x: np.ndarray, bits: int, d1: float, d2: float) -> np.ndarray:
    half = 2 ** (bits - 1)
    return ref_uniform(x, d2, 0, half - 1) + ref_uniform(x, d1, -half, 0)


def gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return (0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(np.float32)


def around(values: list[float]) -> np.ndarray:
    """Each value, its float32 neighbours, and the values themselves as float32."""
    v = np.asarray(values, np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(-np.inf)), np.nextafter(v, np.float32(np.inf))])


def softmax_inputs(bits: int, d1: float, d2: float, rng: np.random.Generator) -> np.ndarray:
    half = 2 ** (bits - 1)
    split = float(np.float32(half) * np.float32(d1))
    special = [0.0, 1.0, 1.5, -0.25, split, split - d1 / 2, split - d1, split + d2 / 2, d1 / 2, 1.5 * d1, d2 / 2]
    special += [(j + 0.5) * d1 for j in range(half)] + [(j + 0.5) * d2 for j in range(half + 1)]
    randoms = [rng.random(2000, dtype=np.float32), rng.random(200).astype(np.float32) * np.float32(split)]
    return np.concatenate([around(special), *randoms])


def gelu_inputs(bits: int, d1: float, d2: float, rng: np.random.Generator) -> np.ndarray:
    half = 2 ** (bits - 1)
    special = [0.0, -0.0, GELU_MIN, -0.17, -half * d1, -(half + 0.5) * d1, half * d2, 10.0, d1 / 2, -d1 / 2, d2 / 2]
    special += [-(j + 0.5) * d1 for j in range(half + 1)] + [(j + 0.5) * d2 for j in range(half)]
    randoms = [gelu(rng.normal(0, 2, 2000)), rng.normal(0, 0.1, 200).astype(np.float32)]
    return np.concatenate([around(special), *randoms])


def softmax_params() -> list[TwinParams]:
    return [TwinParams(k, float(d), 1 / 2 ** (k - 1), "softmax") for k in BITS for d in softmax_r1_candidates(k)]


def gelu_params() -> list[TwinParams]:
    params = [TwinParams(k, gelu_r1_delta(d2, k), d2, "gelu") for k in BITS for d2 in (0.0137, 0.05, 0.3, 1e-3)]
    params += [TwinParams(k, 0.01, 0.01 * 2**m, "gelu") for k in BITS for m in (0, 1, 5)]
    return params


ALL_PARAMS = softmax_params() + gelu_params()


def inputs_for(params: TwinParams, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    make = softmax_inputs if params.layout == "softmax" else gelu_inputs
    return make(params.bits, params.delta_r1, params.delta_r2, rng)


def params_id(p: TwinParams) -> str:
    return f"{p.layout}-k{p.bits}-d1={p.delta_r1:.3g}-m{p.m}"


# ---------------------------------------------------------------- reference semantics


@pytest.mark.parametrize("params", softmax_params(), ids=params_id)
def test_softmax_matches_reference(params: TwinParams) -> None:
    x = inputs_for(params)
    expected = ref_softmax(x, params.bits, params.delta_r1, params.delta_r2)
    got = twin_fake_quantize(x, params)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("params", gelu_params(), ids=params_id)
def test_gelu_matches_reference_where_and_sum_forms(params: TwinParams) -> None:
    x = inputs_for(params)
    where_form = ref_gelu_where(x, params.bits, params.delta_r1, params.delta_r2)
    sum_form = ref_gelu_sum(x, params.bits, params.delta_r1, params.delta_r2)
    np.testing.assert_array_equal(where_form, sum_form)
    got = twin_fake_quantize(x, params)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, where_form)


@pytest.mark.parametrize("bits", BITS)
def test_softmax_split_boundary(bits: int) -> None:
    half = 2 ** (bits - 1)
    params = TwinParams(bits, 1 / 2 ** (bits + 2), 1 / 2 ** (bits - 1), "softmax")  # m = 3
    split = np.float32(params.split)
    assert split == np.float32(half / 2 ** (bits + 2))
    below, above = np.nextafter(split, np.float32(0)), np.nextafter(split, np.float32(1))
    got = twin_fake_quantize(np.array([below, split, above], np.float32), params)
    d1, d2 = np.float32(params.delta_r1), np.float32(params.delta_r2)
    # just below: R1, rounds to level `half`, clipped to half - 1
    assert got[0] == np.float32(half - 1) * d1
    # at and above the split: R2 (split = 2**(k-1-m) * d2 lies on R2's grid)
    assert got[1] == got[2] == np.float32(half / 2**params.m) * d2


@pytest.mark.parametrize("bits", BITS)
def test_gelu_split_boundary(bits: int) -> None:
    params = TwinParams(bits, 0.01, 0.04, "gelu")
    assert params.split == 0.0
    tiny = np.float32(1e-30)
    got = twin_fake_quantize(np.array([-tiny, 0.0, tiny, -0.005, 0.02, -0.015], np.float32), params)
    # -0.5, 0.5 and -1.5 steps round half to even
    np.testing.assert_array_equal(got, np.array([0, 0, 0, 0, 0, -0.02], np.float32))
    half = 2 ** (bits - 1)
    assert twin_fake_quantize(np.float32(GELU_MIN * 10), params) == np.float32(-half) * np.float32(0.01)
    assert twin_fake_quantize(np.float32(1e3), params) == np.float32(half - 1) * np.float32(0.04)


@pytest.mark.parametrize("params", ALL_PARAMS[::5], ids=params_id)
def test_no_offset(params: TwinParams) -> None:
    assert twin_fake_quantize(np.float32(0), params) == 0
    d1 = np.float32(params.delta_r1)
    small = np.array([d1 * np.float32(0.49), d1, d1 * np.float32(2)], np.float32)
    got = twin_fake_quantize(small, params)
    if params.layout == "softmax":  # all below the split: R1 levels 0, 1, 2
        np.testing.assert_array_equal(got, np.array([0, d1, 2 * d1], np.float32))
    else:  # non-negative: R2 levels; never more than the value plus half an R2 step
        assert (np.abs(got - small) <= np.float32(params.delta_r2) / 2).all()
        np.testing.assert_array_equal(twin_fake_quantize(-small, params), np.array([0, -d1, -2 * d1], np.float32))


# ---------------------------------------------------------------- parameters


def test_power_of_two_constraint() -> None:
    for d1, d2 in ((0.01, 0.03), (0.01, 0.015), (0.02, 0.01), (0.01, 0.02 * (1 + 1e-6))):
        with pytest.raises(ValueError, match="2\\*\\*m"):
            TwinParams(8, d1, d2, "softmax")
    for m in range(12):
        params = TwinParams(6, 0.0123, 0.0123 * 2**m, "gelu")
        assert params.m == m


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"layout": "relu"}, "layout"),
        ({"delta_r1": 0.0}, "delta_r1"),
        ({"delta_r1": -0.01}, "delta_r1"),
        ({"delta_r2": float("inf")}, "delta_r2"),
        ({"delta_r1": 1e-50}, "delta_r1"),  # 0 in float32
    ],
)
def test_invalid_params(kwargs: dict, message: str) -> None:
    base = {"bits": 8, "delta_r1": 0.01, "delta_r2": 0.04, "layout": "softmax"} | kwargs
    with pytest.raises(ValueError, match=message):
        TwinParams(**base)


def test_params_are_float32_and_frozen() -> None:
    params = TwinParams(8, 0.1, 0.4, "gelu")
    assert params.delta_r1 == float(np.float32(0.1)) and params.delta_r2 == float(np.float32(0.4))
    with pytest.raises(AttributeError):
        params.bits = 4  # type: ignore[misc]


# ---------------------------------------------------------------- dual-GEMM split and ONNX form


@pytest.mark.parametrize("params", ALL_PARAMS, ids=params_id)
def test_split_parts_sum_and_uniform_grids(params: TwinParams) -> None:
    x = inputs_for(params, seed=1)
    x_r1, x_r2 = split_parts(x, params)
    np.testing.assert_array_equal(x_r1 + x_r2, twin_fake_quantize(x, params))
    in_r1 = x < np.float32(params.split)
    assert (x_r1[~in_r1] == 0).all() and (x_r2[in_r1] == 0).all()
    for part, branch in ((x_r1, params.r1), (x_r2, params.r2)):
        levels = np.rint(part.astype(np.float64) / float(branch.scale))
        assert np.abs(part / float(branch.scale) - levels).max() < 1e-5
        assert levels.min() >= branch.qmin and levels.max() <= branch.qmax
        np.testing.assert_array_equal(levels.astype(np.float32) * branch.scale, part)  # exactly on the grid


@pytest.mark.parametrize("bits", BITS)
def test_split_parts_gemm(bits: int) -> None:
    rng = np.random.default_rng(2)
    params = TwinParams(bits, 1 / 2 ** (bits + 4), 1 / 2 ** (bits - 1), "softmax")
    logits = rng.normal(0, 3, (16, 32))
    x = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    w = rng.integers(-127, 128, (32, 8)).astype(np.float64)
    x_r1, x_r2 = split_parts(x, params)
    # integer GEMMs on each part's levels, rescaled, equal the GEMM of the twin-quantized tensor
    int_gemm = (x_r1 / params.r1.scale).astype(np.float64) @ w * params.delta_r1
    int_gemm += (x_r2 / params.r2.scale).astype(np.float64) @ w * params.delta_r2
    np.testing.assert_allclose(int_gemm, twin_fake_quantize(x, params).astype(np.float64) @ w, rtol=1e-12)


@pytest.mark.parametrize("params", ALL_PARAMS, ids=params_id)
def test_float_clip_before_quantize_equals_integer_clip(params: TwinParams) -> None:
    """The ONNX form Clip(x, qmin*s, qmax*s) -> QuantizeLinear equals clipping the quantized integers."""
    x = inputs_for(params, seed=3)
    for branch in (params.r1, params.r2):
        lo, hi = branch.clip_bounds()
        zp = branch.dtype.type(0)
        clipped_first = quantize(np.clip(x, lo, hi), branch.scale, zp, branch.dtype)
        clipped_after = np.clip(quantize(x, branch.scale, zp, branch.dtype), branch.qmin, branch.qmax)
        np.testing.assert_array_equal(clipped_first, clipped_after)
        np.testing.assert_array_equal(dequantize(clipped_first, branch.scale, zp), branch.fake_quantize(x))


def onnx_twin_model(params: TwinParams) -> onnx.ModelProto:
    """Where(x < split, DQ(Q(Clip(x))) with R1, DQ(Q(Clip(x))) with R2), as the ONNX rewrite would emit it."""
    nodes, inits = [], [numpy_helper.from_array(np.array(params.split, np.float32), "split")]
    for name, branch in (("r1", params.r1), ("r2", params.r2)):
        lo, hi = branch.clip_bounds()
        inits += [
            numpy_helper.from_array(np.array(lo, np.float32), f"{name}_lo"),
            numpy_helper.from_array(np.array(hi, np.float32), f"{name}_hi"),
            numpy_helper.from_array(np.array(branch.scale, np.float32), f"{name}_s"),
            numpy_helper.from_array(np.array(0, branch.dtype), f"{name}_zp"),
        ]
        nodes += [
            helper.make_node("Clip", ["x", f"{name}_lo", f"{name}_hi"], [f"{name}_c"]),
            helper.make_node("QuantizeLinear", [f"{name}_c", f"{name}_s", f"{name}_zp"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_y"]),
        ]
    nodes += [
        helper.make_node("Less", ["x", "split"], ["in_r1"]),
        helper.make_node("Where", ["in_r1", "r1_y", "r2_y"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "twin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("params", ALL_PARAMS[::3], ids=params_id)
def test_matches_onnxruntime(params: TwinParams) -> None:
    x = inputs_for(params, seed=4)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        onnx_twin_model(params).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], twin_fake_quantize(x, params))


# ---------------------------------------------------------------- scale search


def test_search_helpers() -> None:
    assert initial_delta(3.0, 4) == 3.0 / 7.5
    grid = search_grid(2.0)
    assert grid.dtype == np.float32 and grid.shape == (101,)
    np.testing.assert_allclose(grid, 2.0 * (0.01 + np.arange(101) * 1.19 / 100), rtol=1e-7)
    assert grid[0] == np.float32(0.02) and grid[-1] == np.float32(2.4)
    np.testing.assert_array_equal(softmax_r1_candidates(6), np.float32(2.0) ** -np.arange(6, 17))
    with pytest.raises(ValueError):
        initial_delta(0.0, 8)
    with pytest.raises(ValueError):
        search_grid(1.0, alpha=0.0)


@pytest.mark.parametrize("bits", BITS)
def test_gelu_r1_delta_covers_minimum_finest(bits: int) -> None:
    half = 2 ** (bits - 1)
    for d2 in np.geomspace(-GELU_MIN / half, 10.0, 40).astype(np.float32):
        d1 = gelu_r1_delta(float(d2), bits)
        TwinParams(bits, d1, float(d2), "gelu")  # the 2**m constraint holds
        if half * float(d2) >= -GELU_MIN:  # R1 reaches GELU's minimum with the finest such step
            assert half * d1 >= -GELU_MIN > half * d1 / 2
        else:
            assert d1 == float(d2)
    tiny = 0.5 * -GELU_MIN / half  # R2 reaches less than |GELU_MIN|: m = 0
    assert gelu_r1_delta(tiny, bits) == float(np.float32(tiny))


def test_metrics() -> None:
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert mse(a, a) == 0 and mse(a, a + 1) == 1
    assert cosine(a, 2 * a) == pytest.approx(0)
    assert cosine(a, -a) == pytest.approx(2)
    assert cosine(np.zeros(3), np.zeros(3)) == 0 and cosine(a, np.zeros(3)) == 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("metric", [mse, cosine])
def test_search_softmax_recovers_grid(bits: int, metric) -> None:
    half = 2 ** (bits - 1)
    d1 = 1 / 2 ** (bits + 3)
    split = half * d1
    r1_values = np.arange(half) * d1  # includes odd levels and level half - 1
    r2_values = np.arange(half) / half
    x = np.concatenate([r1_values, r2_values[r2_values >= split]]).astype(np.float32)
    best = search_twin(x, "softmax", bits, metric)
    assert best == TwinParams(bits, d1, 1 / half, "softmax")
    np.testing.assert_array_equal(twin_fake_quantize(x, best), x)


@pytest.mark.parametrize("bits", BITS)
def test_search_gelu_recovers_candidate(bits: int) -> None:
    half = 2 ** (bits - 1)
    d2 = float(np.float32(0.0371))
    d1 = gelu_r1_delta(d2, bits)
    x = np.concatenate([np.arange(half) * np.float32(d2), np.arange(-half, 1) * np.float32(d1)]).astype(np.float32)
    candidates = np.float32(d2) * np.array([0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 2.0], np.float32)
    best = search_twin(x, "gelu", bits, mse, candidates=candidates)
    assert best == TwinParams(bits, d1, d2, "gelu")
    np.testing.assert_array_equal(twin_fake_quantize(x, best), x)


@pytest.mark.parametrize("bits", BITS)
def test_search_gelu_default_grid_is_brute_force_argmin(bits: int) -> None:
    x = gelu(np.random.default_rng(5).normal(0, 1.5, 3000))
    best = search_twin(x, "gelu", bits, mse)
    grid = search_grid(initial_delta(float(x.max()), bits))
    errors = [mse(x, ref_gelu_where(x, bits, gelu_r1_delta(float(d), bits), float(d))) for d in grid]
    assert np.float32(best.delta_r2) == grid[int(np.argmin(errors))]
    assert best.delta_r1 == gelu_r1_delta(best.delta_r2, bits)
    with pytest.raises(ValueError, match="positive"):
        search_twin(-np.abs(x), "gelu", bits, mse)


def test_search_rejects_unknown_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        search_twin(np.zeros(4, np.float32), "relu", 8, mse)  # type: ignore[arg-type]
