"""Tests of onnxsmith.calibration.scale_search: metrics, quantizers and PTQ4ViT's alternating layer search."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from onnxsmith.calibration.blocks import GridSpec
from onnxsmith.calibration.metrics import METRICS, cosine, hessian, metric_fn, mse
from onnxsmith.calibration.qparams import fake_quantize
from onnxsmith.calibration.scale_search import (
    LayerScales,
    TwinActQuantizer,
    UniformActQuantizer,
    search_layer,
    uniform_fake_quantize,
)
from onnxsmith.calibration.twin_uniform import (
    TwinParams,
    initial_delta,
    search_grid,
    softmax_r1_candidates,
    twin_fake_quantize,
)

FAST = dict(n=20)  # a coarser grid keeps the searches quick; the algorithm does not depend on n


def layer(seed: int, tokens: int = 96, k: int = 12, n_out: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ``X [tokens, k]``, ``W [k, n_out]`` (columns of different ranges) and ``G [tokens, n_out]``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, k)).astype(np.float32)
    w = (rng.normal(size=(k, n_out)) * rng.uniform(0.1, 3.0, size=n_out)).astype(np.float32)
    g = rng.normal(size=(tokens, n_out)) * rng.uniform(0.01, 10.0, size=n_out)
    return x, w, g


def quantized_output(x: np.ndarray, w: np.ndarray, result: LayerScales, w_bits: int, a_bits: int) -> np.ndarray:
    """``Ô`` at the returned scales, rebuilt from qparams / twin_uniform independently of the search."""
    scale = np.broadcast_to(result.weight_scale, (1, w.shape[1]))[0].astype(np.float32)
    wq = uniform_fake_quantize(w, scale, w_bits, axis=1)
    if isinstance(result.act_scale, TwinParams):
        return twin_fake_quantize(x, result.act_scale) @ wq
    return uniform_fake_quantize(x, np.float32(result.act_scale), a_bits) @ wq


def assert_non_increasing(history: list[float]) -> None:
    assert all(later <= earlier for earlier, later in zip(history, history[1:])), history


# ---------------------------------------------------------------- metrics

O = np.array([[1.0, 2.0], [3.0, 4.0]])
O_HAT = np.array([[1.0, 1.0], [5.0, 4.0]])


def test_metrics_by_hand() -> None:
    assert mse(O, O_HAT) == pytest.approx((0 + 1 + 4 + 0) / 4)
    assert cosine(O, O_HAT) == pytest.approx(1 - 34 / math.sqrt(30 * 43))
    grad = np.array([[1.0, 2.0], [3.0, 0.5]])
    assert hessian(O, O_HAT, grad) == pytest.approx((0 + (2 * -1) ** 2 + (3 * 2) ** 2 + 0) / 4)


def test_cosine_is_lower_better_and_handles_zeros() -> None:
    assert cosine(O, O) == pytest.approx(0.0, abs=1e-15)
    assert cosine(O, -O) == pytest.approx(2.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 0.0
    assert cosine(np.zeros(3), np.ones(3)) == 1.0


def test_hessian_with_unit_gradient_is_mse() -> None:
    rng = np.random.default_rng(0)
    out, quant = rng.normal(size=(7, 3, 4)), rng.normal(size=(7, 3, 4))
    assert hessian(out, quant, np.ones_like(out)) == pytest.approx(mse(out, quant), rel=1e-14)


def test_metric_fn_dispatch() -> None:
    grad = np.full_like(O, 2.0)
    assert metric_fn("mse")(O, O_HAT) == mse(O, O_HAT)
    assert metric_fn("cosine")(O, O_HAT) == cosine(O, O_HAT)
    assert metric_fn("hessian")(O, O_HAT, grad) == hessian(O, O_HAT, grad) == pytest.approx(4 * mse(O, O_HAT))
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        metric_fn("l1")
    with pytest.raises(ValueError, match="gradient"):
        metric_fn("hessian")(O, O_HAT)
    with pytest.raises(ValueError, match="shapes differ"):
        mse(O, O_HAT[:1])


# ---------------------------------------------------------------- quantizers


def test_uniform_fake_quantize_is_onnx_exact() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 6)) * 3).astype(np.float32)
    scale = np.float32(0.021)
    assert np.array_equal(uniform_fake_quantize(x, scale, 8), fake_quantize(x, scale, np.int8(0), np.int8))
    levels = np.clip(np.rint(x / scale), -8, 7).astype(np.float32) * scale  # 4 bits: levels -8..7
    assert np.array_equal(uniform_fake_quantize(x, scale, 4), levels)
    per_channel = np.linspace(0.01, 0.2, 6).astype(np.float32)
    expected = np.stack([uniform_fake_quantize(x[:, c], per_channel[c], 6) for c in range(6)], axis=1)
    assert np.array_equal(uniform_fake_quantize(x, per_channel, 6, axis=1), expected)


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("metric", METRICS)
def test_search_finds_the_exact_grid(metric: str) -> None:
    """X and every column of W lie on a grid that is one candidate (multiplier 1.25 = 127.5 / 102 at i = 75 of
    alpha=0.5, beta=1.5, n=100); that candidate pair is the only zero-error one and the search returns it."""
    rng = np.random.default_rng(2)
    qx = rng.integers(-102, 103, size=(64, 8))
    qx[0, 0] = 102  # max|qx| = 102, so Δ0 * 1.25 is the grid step
    qw = rng.integers(-102, 103, size=(8, 3))
    qw[0] = -102
    x_step, w_steps = 2.0**-4, np.array([2.0**-3, 2.0**-5, 2.0**-6])
    x, w = (qx * x_step).astype(np.float32), (qw * w_steps).astype(np.float32)
    result = search_layer(
        x, w, w_bits=8, a_bits=8, metric=metric, G=np.ones((64, 3)), alpha=0.5, beta=1.5, n=100
    )
    assert result.act_scale == x_step
    assert np.array_equal(result.weight_scale, w_steps.astype(np.float32)[None])
    assert result.metric_value == pytest.approx(0.0, abs=1e-12)
    assert np.array_equal(quantized_output(x, w, result, 8, 8), x @ w)


def test_hessian_follows_the_gradient_where_mse_does_not() -> None:
    """Output 0 reads a wide feature (±100), output 1 a narrow one (±0.1); one per-tensor activation step.
    mse is dominated by output 0 and keeps a wide step; with G weighting output 1 a million times more, the
    hessian metric must take the finest candidate, which resolves the narrow feature best."""
    rng = np.random.default_rng(3)
    x = np.stack([rng.uniform(-100, 100, 400), rng.uniform(-0.1, 0.1, 400)], axis=1).astype(np.float32)
    w = np.eye(2, dtype=np.float32)
    g = np.tile([1e-6, 1.0], (400, 1))
    finest = float(search_grid(initial_delta(float(np.abs(x).max()), 8))[0])
    by_hessian = search_layer(x, w, w_bits=8, a_bits=8, metric="hessian", G=g)
    by_mse = search_layer(x, w, w_bits=8, a_bits=8, metric="mse")
    assert by_hessian.act_scale == finest
    assert by_mse.act_scale > 50 * finest


def test_hessian_with_unit_gradient_searches_like_mse() -> None:
    x, w, _ = layer(4)
    by_hessian = search_layer(x, w, w_bits=4, a_bits=6, metric="hessian", G=np.ones((96, 5)), **FAST)
    by_mse = search_layer(x, w, w_bits=4, a_bits=6, metric="mse", **FAST)
    assert np.array_equal(by_hessian.weight_scale, by_mse.weight_scale)
    assert by_hessian.act_scale == by_mse.act_scale
    assert by_hessian.history == pytest.approx(by_mse.history, rel=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_history_never_increases_and_matches_the_result(metric: str, per_channel: bool) -> None:
    x, w, g = layer(5)
    result = search_layer(
        x, w, w_bits=4, a_bits=4, metric=metric, G=g, rounds=3,
        weight_grid=GridSpec.parse("per-channel" if per_channel else "per-tensor").grid(*w.shape), **FAST
    )
    assert len(result.history) == 7
    assert_non_increasing(result.history)
    assert result.history[-1] < result.history[0]
    assert result.weight_scale.shape == ((1, 5) if per_channel else (1, 1))
    value = metric_fn(metric)(x @ w, quantized_output(x, w, result, 4, 4), g)
    assert result.metric_value == pytest.approx(value, rel=1e-9, abs=1e-15)


@dataclass(frozen=True)
class FixedActQuantizer:
    """A one-candidate uniform activation quantizer: the activation step never changes."""

    bits: int
    step: float

    def steps(self, x: np.ndarray, alpha: float, beta: float, n: int) -> tuple[float, np.ndarray]:
        return self.step, np.array([self.step], dtype=np.float32)

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        return uniform_fake_quantize(x, np.float32(step), self.bits)

    def params(self, step: float) -> float:
        return step


@pytest.mark.parametrize("metric", ["mse", "hessian"])
@pytest.mark.parametrize("rounds, fixed_act", [(3, True), (1, False)])
def test_per_channel_equals_each_column_alone(metric: str, rounds: int, fixed_act: bool) -> None:
    """With a fixed activation (or after round 1's weight search, which runs before any activation search),
    each channel's step is the step a search on that column alone finds."""
    x, w, g = layer(6)
    act = FixedActQuantizer(5, 0.07) if fixed_act else None
    kwargs = dict(w_bits=4, a_bits=5, metric=metric, rounds=rounds, act_quantizer=act, **FAST)
    whole = search_layer(x, w, G=g, **kwargs)
    for c in range(w.shape[1]):
        alone = search_layer(x, w[:, [c]], G=g[:, [c]], **kwargs)
        assert alone.weight_scale[0, 0] == whole.weight_scale[0, c]


@pytest.mark.parametrize("metric", METRICS)
def test_chunking_does_not_change_the_result(metric: str) -> None:
    x, w, g = layer(7, tokens=90)
    whole = search_layer(x, w, w_bits=4, a_bits=4, metric=metric, G=g, chunk_rows=None, **FAST)
    chunked = search_layer(x, w, w_bits=4, a_bits=4, metric=metric, G=g, chunk_rows=13, **FAST)
    assert np.array_equal(whole.weight_scale, chunked.weight_scale)
    assert whole.act_scale == chunked.act_scale
    assert chunked.history == pytest.approx(whole.history, rel=1e-12)


def test_twin_gelu_activation() -> None:
    rng = np.random.default_rng(8)
    pre = rng.normal(size=(128, 10))
    x = (pre * 0.5 * (1 + np.tanh(0.79788456 * (pre + 0.044715 * pre**3)))).astype(np.float32)
    w = rng.normal(size=(10, 4)).astype(np.float32)
    result = search_layer(x, w, w_bits=6, a_bits=6, act_quantizer=TwinActQuantizer("gelu", 6), **FAST)
    assert isinstance(result.act_scale, TwinParams) and result.act_scale.layout == "gelu"
    delta0 = initial_delta(float(x.max()), 6)
    assert np.float32(result.act_scale.delta_r2) in np.append(search_grid(delta0, n=20), np.float32(delta0))
    assert_non_increasing(result.history)
    assert result.metric_value == pytest.approx(mse(x @ w, quantized_output(x, w, result, 6, 6)), rel=1e-9)


def test_twin_softmax_activation() -> None:
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(64, 16)) * 3
    x = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    w = rng.normal(size=(16, 6)).astype(np.float32)
    result = search_layer(x, w, w_bits=8, a_bits=6, act_quantizer=TwinActQuantizer("softmax", 6), **FAST)
    assert isinstance(result.act_scale, TwinParams) and result.act_scale.layout == "softmax"
    assert result.act_scale.delta_r2 == 1 / 32
    assert np.float32(result.act_scale.delta_r1) in softmax_r1_candidates(6)
    assert_non_increasing(result.history)
    assert result.metric_value == pytest.approx(mse(x @ w, quantized_output(x, w, result, 8, 6)), rel=1e-9)


def test_default_act_quantizer_is_uniform() -> None:
    x, w, _ = layer(10)
    default = search_layer(x, w, w_bits=4, a_bits=4, **FAST)
    explicit = search_layer(x, w, w_bits=4, a_bits=4, act_quantizer=UniformActQuantizer(4), **FAST)
    assert isinstance(default.act_scale, float)
    assert default.act_scale == explicit.act_scale and default.history == explicit.history
    assert np.array_equal(default.weight_scale, explicit.weight_scale)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(metric="hessian"), "needs G"),
        (dict(metric="l2"), "unknown metric"),
        (dict(act_quantizer=UniformActQuantizer(6)), "differs from a_bits"),
        (dict(w_bits=1), "w_bits"),
        (dict(rounds=-1), "rounds"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(W=np.ones((3, 2), np.float32)), "need X"),
    ],
)
def test_invalid_arguments(change: dict, message: str) -> None:
    x, w, _ = layer(11)
    arguments = dict(X=x, W=w, w_bits=4, a_bits=4, n=4) | change
    with pytest.raises(ValueError, match=message):
        search_layer(**arguments)


def test_an_all_zero_activation_gets_the_smallest_step_instead_of_an_error() -> None:
    """An all-zero X (a dead ReLU on the calibration data) quantizes exactly with any step: the search keeps the
    smallest normal one (it used to raise 'x_absmax must be finite and > 0', which failed ptq-qdq)."""
    x, w, _ = layer(11)
    result = search_layer(np.zeros_like(x), w, w_bits=4, a_bits=4, n=4)
    assert result.act_scale == float(np.finfo(np.float32).tiny)

