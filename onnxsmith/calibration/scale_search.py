"""PTQ4ViT layer-wise scale search for a linear layer ``O = X @ W`` (numpy only).

Metrics (``"mse"``, ``"cosine"``, ``"hessian"``) are those of :mod:`onnxsmith.calibration.metrics`.

Search (:func:`search_layer`). Weights and activations use k-bit symmetric quantization with zero point 0 and
levels ``-2**(k-1) .. 2**(k-1)-1`` in qparams' ONNX-exact arithmetic (float32 division, round half to even).
Each searched step runs over PTQ4ViT's grid ``Δ0 * (alpha + i * (beta - alpha) / n)``, i = 0..n, with
``Δ0 = max|.| / (2**(k-1) - 0.5)`` over the step's block (weights) or feature group (activations). Each round
searches the weight steps with the activation steps fixed, then the activation steps with the weights fixed.
The current step is always a candidate too (listed first, so it wins ties): no step raises the metric, so the
recorded history is non-increasing (exactly for one input block and one feature group; otherwise up to float32
rounding, as the output is then a fixed part plus the searched part, summed in another order).

Weight blocks (PTQ-SL sub-layer granularity, :mod:`onnxsmith.calibration.blocks`): a grid of input blocks x
output blocks over ``W``; per channel is one input block of one column each (the default), per tensor one
block. The input blocks are searched one after another, each with the others fixed. ``"mse"`` and
``"hessian"`` are sums over output columns, and column ``c`` of ``Ô`` depends, within one input block, only on
its own output block's step; each output block's step is therefore chosen independently on its own columns'
error, which jointly minimises the layer metric. ``"cosine"`` does not separate over columns, so all output
blocks of an input block share one grid multiplier ``i``, chosen on the whole-layer metric. Activation feature
groups (``act_groups``) are searched one after another the same way, each on the whole-layer metric.

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

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from onnxsmith.calibration.blocks import BlockGrid, initial_block_steps
from onnxsmith.calibration.metrics import MetricName, MetricSpec, metric_spec
from onnxsmith.calibration.qparams import MIN_SCALE
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
        """``(Δ0, search_grid(Δ0, alpha, beta, n))``. When ``max|x| == 0`` (e.g. a dead ReLU on the calibration
        data) every step quantizes ``x`` exactly: the one candidate is :data:`MIN_SCALE`, the step
        :func:`~onnxsmith.calibration.qparams.symmetric_scale` gives an all-zero range."""
        amax = float(np.abs(x).max(initial=0.0))
        if amax == 0:
            return float(MIN_SCALE), np.array([MIN_SCALE], dtype=np.float32)
        delta0 = initial_delta(amax, self.bits)
        return delta0, search_grid(delta0, alpha, beta, n)

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        return uniform_fake_quantize(x, np.float32(step), self.bits)

    def params(self, step: float) -> float:
        """The step as a float32-valued float."""
        return float(np.float32(step))


@dataclass(frozen=True)
class FloatActQuantizer:
    """No activation quantization (weight-only layers): ``X`` stays float, there is no step to search.

    ``bits`` only satisfies :func:`search_layer`'s check; ``params`` is None.
    """

    bits: int

    def steps(self, x: np.ndarray, alpha: float, beta: float, n: int) -> tuple[float, np.ndarray]:
        return 1.0, np.empty(0, dtype=np.float32)

    def fake_quantize(self, x: np.ndarray, step: float) -> np.ndarray:
        return x

    def params(self, step: float) -> None:
        return None


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

    ``weight_scale``: float32 block steps of the weight grid, shape ``grid.shape`` = ``(input blocks, output
    blocks)``; ``(1, N)`` per channel, ``(1, 1)`` per tensor.
    ``act_scale``: the activation step (float) or, for a twin quantizer, its :class:`TwinParams`; with
    ``act_groups > 1`` a float32 array of one step per feature group.
    ``metric_value``: the layer metric at the returned scales (``history[-1]``).
    ``history``: the metric at the initial steps, then after each weight and each activation search
    (``2 * rounds + 1`` values, non-increasing).
    """

    weight_scale: np.ndarray
    act_scale: float | TwinParams | np.ndarray
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


def blocked_fake_quantize(w: ArrayLike, block_scales: ArrayLike, grid: BlockGrid, bits: int) -> np.ndarray:
    """``w [k, n]`` symmetric ``bits``-bit fake-quantized with one step per block of ``grid`` (ONNX-exact)."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape != (grid.k, grid.n):
        raise ValueError(f"w must have shape {(grid.k, grid.n)}, got {w.shape}")
    return uniform_fake_quantize(w, grid.expand(np.asarray(block_scales, dtype=np.float32)), bits)


class _ActGroups:
    """The activation quantizer applied per feature group (``slices`` of X's columns), one step per group."""

    def __init__(self, quantizer: ActQuantizer, slices: list[slice]) -> None:
        self.quantizer, self.slices = quantizer, slices

    def fake_quantize(self, x_chunk: np.ndarray, steps: np.ndarray) -> np.ndarray:
        if len(self.slices) == 1:
            return self.quantizer.fake_quantize(x_chunk, float(steps[0]))
        out = np.empty_like(x_chunk)
        for columns, step in zip(self.slices, steps):
            out[:, columns] = self.quantizer.fake_quantize(x_chunk[:, columns], float(step))
        return out


def _search_weights(
    problem: _Problem, act: _ActGroups, act_steps: np.ndarray, w_steps: np.ndarray, delta0: np.ndarray,
    grid: BlockGrid, bits: int, options: tuple[float, float, int],
) -> tuple[np.ndarray, float, float]:
    """One pass over the grid's input blocks, each searching its row of block steps with everything else fixed.

    Candidates for input block ``r`` are its current steps, then ``search_grid(Δ0)`` of every block. Separable
    metrics pick each output block's best candidate on its own columns; others one candidate row for all.
    Ties go to the earliest candidate. Returns the steps, the layer metric at them and at the initial steps.
    """
    w_steps = w_steps.copy()
    separable = problem.spec.separable
    first = value = math.nan
    for r, rows in enumerate(grid.row_slices()):
        candidates = np.vstack([w_steps[r], np.stack([search_grid(float(d), *options) for d in delta0[r]], axis=1)])
        others = blocked_fake_quantize(problem.w, w_steps, grid, bits) if grid.shape[0] > 1 else None
        if others is not None:
            others[rows] = 0

        def outputs(x_chunk: np.ndarray) -> Iterator[np.ndarray]:
            xq = act.fake_quantize(x_chunk, act_steps)
            fixed = 0 if others is None else xq @ others
            for steps in candidates:
                yield fixed + xq[:, rows] @ uniform_fake_quantize(problem.w[rows], grid.expand_columns(steps), bits)

        stats = _candidate_stats(problem, len(candidates), outputs)
        if r == 0:
            first = problem.spec.reduce(stats[0], problem.count)
        if separable:
            best = np.argmin(grid.sum_columns(stats[:, 0, :]), axis=0)
            w_steps[r] = candidates[best, np.arange(candidates.shape[1])]
            value = problem.spec.reduce(stats[grid.expand_columns(best), :, np.arange(grid.n)].T, problem.count)
        else:
            values = [problem.spec.reduce(s, problem.count) for s in stats]
            best_row = int(np.argmin(values))
            w_steps[r], value = candidates[best_row], values[best_row]
    return w_steps, value, first


def _search_act(
    problem: _Problem, act: _ActGroups, act_steps: np.ndarray, grids: list[np.ndarray], w_scale: np.ndarray,
    grid: BlockGrid, bits: int,
) -> tuple[np.ndarray, float]:
    """Each feature group's step in turn among its current step and ``grids[g]`` with everything else fixed
    (ties: earliest); the steps and the metric at them."""
    act_steps = act_steps.copy()
    wq = blocked_fake_quantize(problem.w, w_scale, grid, bits)
    value = math.nan
    for g, columns in enumerate(act.slices):
        candidates = np.concatenate([[act_steps[g]], grids[g]])

        def outputs(x_chunk: np.ndarray) -> Iterator[np.ndarray]:
            fixed = 0
            if len(act.slices) > 1:
                others = act.fake_quantize(x_chunk, act_steps)
                others[:, columns] = 0
                fixed = others @ wq
            for step in candidates:
                yield fixed + act.quantizer.fake_quantize(x_chunk[:, columns], float(step)) @ wq[columns]

        stats = _candidate_stats(problem, len(candidates), outputs)
        values = [problem.spec.reduce(s, problem.count) for s in stats]
        best = int(np.argmin(values))
        act_steps[g], value = candidates[best], values[best]
    return act_steps, value


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
    weight_grid: BlockGrid | None = None,
    act_groups: BlockGrid | None = None,
    act_quantizer: ActQuantizer | None = None,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> LayerScales:
    """PTQ4ViT's alternating scale search for ``O = X @ W`` (see the module docstring).

    ``X [tokens, K]`` are calibration inputs, ``W [K, N]`` the weight (both used as float32), ``G [tokens, N]``
    the output gradient (required by, and only used by, ``metric="hessian"``). Weights get ``w_bits``-bit
    symmetric steps, one per block of ``weight_grid`` (a :class:`BlockGrid` over ``[K, N]``; default per output
    channel). The activation uses ``act_quantizer`` (default ``UniformActQuantizer(a_bits)``, per tensor),
    whose ``bits`` must equal ``a_bits``; ``act_groups`` (a grid over ``[K, 1]``) gives each of its input blocks
    of X's features its own step (uniform quantizers only). Candidates come from the grid ``(alpha, beta,
    n)``; ``rounds`` rounds of weight-then-activation search start from the initial steps ``Δ0``
    (``rounds=0``: the initial steps, ``history`` their metric alone). ``chunk_rows`` bounds the rows evaluated
    at once (None: all); the result does not depend on it except for float64 summation order. Raises
    ValueError on bad shapes, bits, grids, metric or a missing ``G``, and when ``X`` is all zero.
    """
    _check_bits(w_bits, "w_bits")
    _check_bits(a_bits, "a_bits")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    act = UniformActQuantizer(a_bits) if act_quantizer is None else act_quantizer
    if act.bits != a_bits:
        raise ValueError(f"act_quantizer.bits = {act.bits} differs from a_bits = {a_bits}")
    problem = _problem(X, W, G, metric, chunk_rows)
    k, n_out = problem.w.shape
    grid = weight_grid or BlockGrid(k, n_out, k, 1)
    groups = act_groups or BlockGrid(k, 1, k, 1)
    if (grid.k, grid.n) != (k, n_out) or (groups.k, groups.n) != (k, 1):
        raise ValueError(f"grids must cover W {(k, n_out)} and X's {k} features, got {(grid.k, grid.n)} and "
                         f"{(groups.k, groups.n)}")
    if groups.shape[0] > 1 and not isinstance(act, UniformActQuantizer):
        raise ValueError("activation groups need the uniform activation quantizer")
    acts = _ActGroups(act, groups.row_slices())
    starts = [act.steps(problem.x[:, columns], alpha, beta, n) for columns in acts.slices]
    act_steps = np.asarray([step for step, _ in starts], dtype=np.float64)
    act_grids = [candidates for _, candidates in starts]
    delta0 = initial_block_steps(problem.w, grid, w_bits)
    w_scale = delta0.copy()

    history: list[float] = []
    if rounds == 0:
        stats = _candidate_stats(problem, 1, lambda x_chunk: [acts.fake_quantize(x_chunk, act_steps) @
                                                               blocked_fake_quantize(problem.w, w_scale, grid, w_bits)])
        history.append(problem.spec.reduce(stats[0], problem.count))
    for _ in range(rounds):
        w_scale, value, initial = _search_weights(problem, acts, act_steps, w_scale, delta0, grid, w_bits,
                                                  (alpha, beta, n))
        if not history:
            history.append(initial)
        history.append(value)
        act_steps, value = _search_act(problem, acts, act_steps, act_grids, w_scale, grid, w_bits)
        history.append(value)
    act_scale = act.params(float(act_steps[0])) if len(acts.slices) == 1 else act_steps.astype(np.float32)
    return LayerScales(weight_scale=w_scale, act_scale=act_scale, metric_value=history[-1], history=history)


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
