"""PTQ4ViT layer-wise scale search for a linear layer ``O = X @ W`` (numpy only).

Metrics (``"mse"``, ``"cosine"``, ``"hessian"``) are those of :mod:`onnxsmith.calibration.metrics`.

Search (:func:`search_layer`). Weights and activations use k-bit symmetric quantization with zero point 0 and
levels ``-2**(k-1) .. 2**(k-1)-1`` in qparams' ONNX-exact arithmetic (float32 division, round half to even).
Each searched step runs over PTQ4ViT's grid ``Δ0 * (alpha + i * (beta - alpha) / n)``, i = 0..n, with
``Δ0 = max|.| / (2**(k-1) - 0.5)`` (per output channel for per-channel weights). Each round searches the
weight steps with the activation step fixed, then the activation step with the weights fixed. The current
step is always a candidate too (listed first, so it wins ties): no step raises the metric, so the recorded
history is non-increasing.

Per-channel weights: ``"mse"`` and ``"hessian"`` are sums over output columns, and column ``c`` of ``Ô``
depends only on column ``c`` of ``W``; each channel's step is therefore chosen independently on its own
column's error, which jointly minimises the layer metric. ``"cosine"`` does not separate over columns, so all
channels share one grid multiplier ``i`` (step ``Δ0_c * (alpha + i * (beta - alpha) / n)`` for channel c),
chosen on the whole-layer metric.

Activation quantizers plug in through :class:`ActQuantizer`: :class:`UniformActQuantizer` (the default) and
:class:`TwinActQuantizer` (PTQ4ViT twin-uniform; the searched step is ``Δ_R1`` for the softmax layout and
``Δ_R2`` for the gelu layout).

Memory. Calibration rows are processed ``chunk_rows`` at a time and every candidate is evaluated on a chunk
before the next, accumulating float64 per-column sufficient statistics. Beyond the inputs (``X`` and ``W`` held
as float32, ``G`` as float64: copies when given in other dtypes), peak memory is roughly
``28*r*K + 16*r*N + 32*K*N + 24*(n+2)*N`` bytes for ``r = chunk_rows`` (quantizing the chunk's input with its
temporaries; the chunk's float and quantized outputs and float64 error; the float and quantizing weights; the
statistics), independent of the number of tokens. Each chunk recomputes its float output and the candidates'
quantized weights (a ``K*N`` elementwise pass per candidate, small next to the ``r*K*N`` GEMM for large ``r``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from onnxsmith.calibration.metrics import MetricName, MetricSpec, metric_spec
from onnxsmith.calibration.twin_uniform import (
    Layout,
    TwinParams,
    gelu_r1_delta,
    initial_delta,
    search_grid,
    softmax_r1_candidates,
    twin_fake_quantize,
)

DEFAULT_CHUNK_ROWS = 4096


# ---------------------------------------------------------------- quantizers


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(f"{what} must be an integer in [2, 16], got {bits!r}")


def uniform_fake_quantize(x: ArrayLike, scale: ArrayLike, bits: int, axis: int | None = None) -> np.ndarray:
    """Symmetric ``bits``-bit fake quantization, ``clip(rint(x / scale), -2**(bits-1), 2**(bits-1)-1) * scale``.

    ONNX-exact (qparams' QuantizeLinear / DequantizeLinear in int8, or int16 for ``bits > 8``, zero point 0);
    ``scale`` is a scalar (``axis=None``) or 1-D along ``axis``. Float32 out.
    """
    _check_bits(bits, "bits")
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if not (scale > 0).all():
        raise ValueError("scale must be positive")
    if axis is not None:
        scale = scale.reshape([-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
    half = 2 ** (bits - 1)
    # Fused float32 form of QuantizeLinear -> clip -> DequantizeLinear: the same float32 division, rint (half to
    # even) and product, without the integer round trip (levels within ±2**15 are exact in float32).
    with np.errstate(over="ignore"):
        q = np.rint(x / scale)
    np.clip(q, -half, half - 1, out=q)
    q *= scale
    return q


class ActQuantizer(Protocol):
    """How :func:`search_layer` quantizes the activation X with one searched step.

    ``fake_quantize`` must be elementwise (so evaluating row chunks is exact) and deterministic.
    """

    bits: int

    def steps(self, x: np.ndarray, alpha: float, beta: float, n: int) -> tuple[float, np.ndarray]:
        """``(initial step, candidate steps)`` for calibration inputs ``x``."""
        ...

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        """``x`` (float32) fake-quantized with the searched ``step``; float32, ``x``'s shape."""
        ...

    def params(self, step: float) -> float | TwinParams:
        """The quantizer's parameters for ``step`` (what :class:`LayerScales` reports)."""
        ...


@dataclass(frozen=True)
class UniformActQuantizer:
    """Per-tensor symmetric ``bits``-bit uniform quantizer; initial step ``Δ0 = max|x| / (2**(bits-1) - 0.5)``."""

    bits: int

    def steps(self, x: np.ndarray, alpha: float, beta: float, n: int) -> tuple[float, np.ndarray]:
        """``(Δ0, search_grid(Δ0, alpha, beta, n))``; needs ``max|x| > 0``."""
        delta0 = initial_delta(float(np.abs(x).max(initial=0.0)), self.bits)
        return delta0, search_grid(delta0, alpha, beta, n)

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        return uniform_fake_quantize(x, np.float32(step), self.bits)

    def params(self, step: float) -> float:
        """The step as a float32-valued float."""
        return float(np.float32(step))


@dataclass(frozen=True)
class TwinActQuantizer:
    """PTQ4ViT twin-uniform quantizer (see :mod:`onnxsmith.calibration.twin_uniform`).

    ``"softmax"``: the searched step is ``Δ_R1`` over :func:`softmax_r1_candidates` (``alpha``, ``beta``, ``n``
    unused) with ``Δ_R2 = 1 / 2**(bits-1)``; initial step the coarsest candidate ``1 / 2**bits``.
    ``"gelu"``: the searched step is ``Δ_R2`` over ``search_grid(initial_delta(max x))`` (initial step that
    ``Δ0``; needs a positive sample) with ``Δ_R1 = gelu_r1_delta(Δ_R2)``.
    """

    layout: Layout
    bits: int

    def steps(self, x: np.ndarray, alpha: float, beta: float, n: int) -> tuple[float, np.ndarray]:
        if self.layout == "softmax":
            candidates = softmax_r1_candidates(self.bits)
            return float(candidates[0]), candidates
        top = float(x.max(initial=0.0))
        if top <= 0:
            raise ValueError("the gelu layout needs at least one positive sample to set its grid")
        delta0 = initial_delta(top, self.bits)
        return delta0, search_grid(delta0, alpha, beta, n)

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        return twin_fake_quantize(x, self.params(step))

    def params(self, step: float) -> TwinParams:
        if self.layout == "softmax":
            return TwinParams(self.bits, step, 1.0 / 2 ** (self.bits - 1), "softmax")
        return TwinParams(self.bits, gelu_r1_delta(step, self.bits), step, "gelu")


# ---------------------------------------------------------------- search


@dataclass
class LayerScales:
    """Result of :func:`search_layer`.

    ``weight_scale``: float32, shape ``[N]`` (per output channel) or ``()`` (per tensor).
    ``act_scale``: the activation step (float) or, for a twin quantizer, its :class:`TwinParams`.
    ``metric_value``: the layer metric at the returned scales (``history[-1]``).
    ``history``: the metric at the initial steps, then after each weight and each activation search
    (``2 * rounds + 1`` values, non-increasing).
    """

    weight_scale: np.ndarray
    act_scale: float | TwinParams
    metric_value: float
    history: list[float]


@dataclass(frozen=True)
class _Problem:
    """A validated search problem: float32 ``x [T, K]``, ``w [K, N]``, float64 ``grad [T, N]`` or None."""

    x: np.ndarray
    w: np.ndarray
    grad: np.ndarray | None
    spec: MetricSpec
    chunk_rows: int

    @property
    def count(self) -> int:
        return self.x.shape[0] * self.w.shape[1]


def _candidate_stats(
    problem: _Problem, n_candidates: int, outputs: Callable[[np.ndarray], Iterable[np.ndarray]]
) -> np.ndarray:
    """``[C, S, N]`` metric statistics of the ``C`` candidate outputs, accumulated chunk by chunk.

    ``outputs(x_chunk)`` yields each candidate's quantized output for the chunk, in candidate order.
    """
    stats = np.zeros((n_candidates, problem.spec.n_stats, problem.w.shape[1]))
    for start in range(0, problem.x.shape[0], problem.chunk_rows):
        rows = slice(start, start + problem.chunk_rows)
        reference = problem.x[rows] @ problem.w
        grad = None if problem.grad is None else problem.grad[rows]
        for i, quantized in enumerate(outputs(problem.x[rows])):
            stats[i] += problem.spec.column_stats(reference, quantized, grad)
    return stats


def initial_weight_steps(amax: ArrayLike, bits: int) -> np.ndarray:
    """Float32 ``Δ0 = amax / (2**(bits-1) - 0.5)`` per channel; an all-zero channel (``amax == 0``) gets 1."""
    return np.asarray([initial_delta(float(a), bits) if a > 0 else 1.0 for a in np.ravel(amax)], dtype=np.float32)


def _weight_grid(
    w: np.ndarray, bits: int, per_channel: bool, alpha: float, beta: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(Δ0 [N], grid [n + 1, N])``, float32: grid row i is ``Δ0 * (alpha + i * (beta - alpha) / n)``.

    ``Δ0 = max|w| / (2**(bits-1) - 0.5)`` per output column (per_channel) or over the whole tensor; an
    all-zero column or tensor gets ``Δ0 = 1`` (every step quantizes it exactly).
    """
    amax = np.abs(w).max(axis=0) if per_channel else np.full(w.shape[1], np.abs(w).max(initial=0.0))
    delta0 = initial_weight_steps(amax, bits)
    grid = np.stack([search_grid(float(d), alpha, beta, n) for d in delta0], axis=1)
    return delta0, grid


def _search_weights(
    problem: _Problem, act: ActQuantizer, act_step: float, candidates: np.ndarray, bits: int, per_column: bool
) -> tuple[np.ndarray, float, float]:
    """Best ``[N]`` weight steps among the rows of ``candidates`` ``[C, N]`` with the activation fixed.

    ``per_column``: each column takes its own best row (separable metrics); otherwise one row for all.
    Ties go to the earliest row. Returns the steps, the layer metric at them and at row 0.
    """

    def outputs(x_chunk: np.ndarray) -> Iterator[np.ndarray]:
        xq = act.fake_quantize(x_chunk, act_step)
        for scale in candidates:
            yield xq @ uniform_fake_quantize(problem.w, scale, bits, axis=1)

    stats = _candidate_stats(problem, len(candidates), outputs)
    first = problem.spec.reduce(stats[0], problem.count)
    if per_column:
        columns = np.arange(candidates.shape[1])
        best = np.argmin(stats[:, 0, :], axis=0)
        return candidates[best, columns], problem.spec.reduce(stats[best, :, columns].T, problem.count), first
    values = [problem.spec.reduce(s, problem.count) for s in stats]
    best_row = int(np.argmin(values))
    return candidates[best_row], values[best_row], first


def _search_act(
    problem: _Problem, act: ActQuantizer, candidates: np.ndarray, w_scale: np.ndarray, bits: int
) -> tuple[float, float]:
    """Best activation step among ``candidates`` with the weights fixed (ties: earliest); step and metric."""
    wq = uniform_fake_quantize(problem.w, w_scale, bits, axis=1)

    def outputs(x_chunk: np.ndarray) -> Iterator[np.ndarray]:
        for step in candidates:
            yield act.fake_quantize(x_chunk, float(step)) @ wq

    stats = _candidate_stats(problem, len(candidates), outputs)
    values = [problem.spec.reduce(s, problem.count) for s in stats]
    best = int(np.argmin(values))
    return float(candidates[best]), values[best]


def _problem(X: ArrayLike, W: ArrayLike, G: ArrayLike | None, metric: str, chunk_rows: int | None) -> _Problem:
    spec = metric_spec(metric)
    x, w = np.asarray(X, dtype=np.float32), np.asarray(W, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need X [tokens > 0, K] and W [K, N], got {x.shape} and {w.shape}")
    grad = None
    if spec.needs_grad:
        if G is None or np.shape(G) != (x.shape[0], w.shape[1]):
            raise ValueError(f"the hessian metric needs G of shape {(x.shape[0], w.shape[1])}, got {np.shape(G)}")
        grad = np.asarray(G, dtype=np.float64)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _Problem(x, w, grad, spec, chunk_rows or x.shape[0])


def search_layer(
    X: ArrayLike,
    W: ArrayLike,
    *,
    w_bits: int,
    a_bits: int,
    metric: MetricName = "mse",
    G: ArrayLike | None = None,
    n: int = 100,
    alpha: float = 0.01,
    beta: float = 1.2,
    rounds: int = 3,
    per_channel_weights: bool = True,
    act_quantizer: ActQuantizer | None = None,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> LayerScales:
    """PTQ4ViT's alternating scale search for ``O = X @ W`` (see the module docstring).

    ``X [tokens, K]`` are calibration inputs, ``W [K, N]`` the weight (both used as float32), ``G [tokens, N]``
    the output gradient (required by, and only used by, ``metric="hessian"``). Weights get ``w_bits``-bit
    symmetric steps, per output channel when ``per_channel_weights``; the activation uses ``act_quantizer``
    (default ``UniformActQuantizer(a_bits)``, per tensor), whose ``bits`` must equal ``a_bits``. Candidates
    come from the grid ``(alpha, beta, n)``; ``rounds`` rounds of weight-then-activation search start
    from the initial steps ``Δ0`` (``rounds=0``: the initial steps, ``history`` their metric alone). ``chunk_rows`` bounds the rows evaluated at once (None: all); the result
    does not depend on it except for float64 summation order. Raises ValueError on bad shapes, bits, metric
    or a missing ``G``, and when ``X`` is all zero.
    """
    _check_bits(w_bits, "w_bits")
    _check_bits(a_bits, "a_bits")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    act = UniformActQuantizer(a_bits) if act_quantizer is None else act_quantizer
    if act.bits != a_bits:
        raise ValueError(f"act_quantizer.bits = {act.bits} differs from a_bits = {a_bits}")
    problem = _problem(X, W, G, metric, chunk_rows)
    w_scale, grid = _weight_grid(problem.w, w_bits, per_channel_weights, alpha, beta, n)
    act_step, act_grid = act.steps(problem.x, alpha, beta, n)
    per_column = per_channel_weights and problem.spec.separable

    history: list[float] = []
    if rounds == 0:
        history.append(_search_weights(problem, act, act_step, w_scale[None], w_bits, per_column)[1])
    for _ in range(rounds):
        candidates = np.vstack([w_scale, grid])
        w_scale, value, initial = _search_weights(problem, act, act_step, candidates, w_bits, per_column)
        if not history:
            history.append(initial)
        history.append(value)
        act_step, value = _search_act(problem, act, np.concatenate([[act_step], act_grid]), w_scale, w_bits)
        history.append(value)
    return LayerScales(
        weight_scale=w_scale if per_channel_weights else np.float32(w_scale[0]).reshape(()),
        act_scale=act.params(act_step),
        metric_value=history[-1],
        history=history,
    )


# ---------------------------------------------------------------- activation x activation MatMul


@dataclass
class MatMulScales:
    """Result of :func:`search_activation_matmul`: each input's step (float) or :class:`TwinParams`, the metric
    at them and its history (initial, then after each input's search; non-increasing)."""

    a_scale: float | TwinParams
    b_scale: float | TwinParams
    metric_value: float
    history: list[float]


def search_activation_matmul(
    A: list[np.ndarray],
    B: list[np.ndarray],
    *,
    bits: int,
    metric: MetricName = "mse",
    G: list[np.ndarray] | None = None,
    quantizers: tuple[ActQuantizer, ActQuantizer] | None = None,
    n: int = 100,
    alpha: float = 0.01,
    beta: float = 1.2,
    rounds: int = 3,
) -> MatMulScales:
    """PTQ4ViT's alternating search for ``O = A @ B`` with two per-tensor quantized activations.

    ``A``, ``B`` and ``G`` (``dL/dO``, for ``metric="hessian"`` only) are aligned lists of per-sample arrays
    (``numpy.matmul`` shapes; samples may differ in size, e.g. sequence length). ``quantizers`` default to
    ``UniformActQuantizer(bits)`` for both inputs (e.g. pass a softmax :class:`TwinActQuantizer` for
    attention probabilities). Each of ``rounds`` rounds searches A's step with B fixed, then B's with A fixed,
    over the current step followed by the quantizer's grid (ties keep the earliest); ``rounds=0`` returns the
    initial steps. The metric treats O as one flat column (samples may differ in every axis, e.g. attention
    scores ``[heads, T, T]`` of sequences of different lengths).
    """
    _check_bits(bits, "bits")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    spec = metric_spec(metric)
    qa, qb = quantizers or (UniformActQuantizer(bits), UniformActQuantizer(bits))
    a = [np.asarray(x, dtype=np.float32) for x in A]
    b = [np.asarray(x, dtype=np.float32) for x in B]
    if not a or len(a) != len(b):
        raise ValueError(f"need equally many (> 0) A and B samples, got {len(a)} and {len(b)}")
    references = [x @ y for x, y in zip(a, b)]
    grads: list[np.ndarray | None] = [None] * len(a)
    if spec.needs_grad:
        if G is None or len(G) != len(a) or any(np.shape(g) != o.shape for g, o in zip(G, references)):
            raise ValueError("the hessian metric needs one G per sample, each of A @ B's shape")
        grads = [np.asarray(g, dtype=np.float64).reshape(-1, 1) for g in G]
    count = sum(o.size for o in references)
    step_a, grid_a = qa.steps(np.concatenate([x.ravel() for x in a]), alpha, beta, n)
    step_b, grid_b = qb.steps(np.concatenate([x.ravel() for x in b]), alpha, beta, n)

    def values(candidates: np.ndarray, search_a: bool) -> list[float]:
        stats = np.zeros((len(candidates), spec.n_stats, 1))
        for x, y, reference, grad in zip(a, b, references, grads):
            fixed = qb.fake_quantize(y, step_b) if search_a else qa.fake_quantize(x, step_a)
            for i, step in enumerate(candidates):
                out = qa.fake_quantize(x, float(step)) @ fixed if search_a else fixed @ qb.fake_quantize(y, float(step))
                stats[i] += spec.column_stats(reference.reshape(-1, 1), out.reshape(-1, 1), grad)
        return [spec.reduce(s, count) for s in stats]

    history = [values(np.asarray([step_a]), True)[0]]
    for _ in range(rounds):
        scores = values(np.concatenate([[step_a], grid_a]), True)
        step_a = float(np.concatenate([[step_a], grid_a])[int(np.argmin(scores))])
        history.append(min(scores))
        scores = values(np.concatenate([[step_b], grid_b]), False)
        step_b = float(np.concatenate([[step_b], grid_b])[int(np.argmin(scores))])
        history.append(min(scores))
    return MatMulScales(qa.params(step_a), qb.params(step_b), history[-1], history)
