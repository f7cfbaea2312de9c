"""Layer-output metrics for scale searches; lower is always better.

* ``"mse"``: mean over elements of ``(Ô - O)**2``.
* ``"cosine"``: ``1 - cos(vec(O), vec(Ô))`` in ``[0, 2]`` (0 best). Both all-zero counts as identical (0),
  exactly one all-zero as orthogonal (1).
* ``"hessian"``: PTQ4ViT's Hessian-guided metric, mean over elements of ``(G * (Ô - O))**2`` with
  ``G = dL/dO`` of ``O``'s shape, i.e. ``E[(Ô - O)^T diag(G**2) (Ô - O)]``. ``G = 1`` gives ``"mse"``.

Each metric is also available as per-output-column sufficient statistics (:class:`MetricSpec`), which lets a
search accumulate it chunk by chunk and per channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

MetricName = Literal["mse", "cosine", "hessian"]
Metric = Callable[..., float]
METRICS: tuple[str, ...] = ("mse", "cosine", "hessian")


@dataclass(frozen=True)
class MetricSpec:
    """A metric as per-column sufficient statistics (``[S, N]`` float64 sums over rows) and their reduction.

    ``reduce(stats, count)`` takes the statistics of ``count`` elements; ``separable`` metrics have ``S = 1``
    and a reduction monotone in the column sums, so minimising each column minimises the metric.
    """

    column_stats: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
    reduce: Callable[[np.ndarray, int], float]
    n_stats: int
    separable: bool
    needs_grad: bool


def _squared_error_stats(output: np.ndarray, quantized: np.ndarray, grad: np.ndarray | None) -> np.ndarray:
    """Per-column ``sum((grad * (quantized - output))**2)`` (``grad = 1`` when None), shape ``[1, N]``."""
    diff = np.subtract(quantized, output, dtype=np.float64)
    if grad is not None:
        diff *= grad
    return np.einsum("tn,tn->n", diff, diff)[None]


def _cosine_stats(output: np.ndarray, quantized: np.ndarray, grad: np.ndarray | None) -> np.ndarray:
    """Per-column ``[sum(O*Ô), sum(O*O), sum(Ô*Ô)]``, shape ``[3, N]``; ``grad`` is unused."""
    o, q = output.astype(np.float64), quantized.astype(np.float64)
    return np.stack([np.einsum("tn,tn->n", o, q), np.einsum("tn,tn->n", o, o), np.einsum("tn,tn->n", q, q)])


def _mean_reduce(stats: np.ndarray, count: int) -> float:
    return float(stats.sum() / count)


def _cosine_reduce(stats: np.ndarray, count: int) -> float:
    dot, norm_o, norm_q = stats.sum(axis=1)
    if norm_o == 0 or norm_q == 0:
        return 0.0 if norm_o == norm_q else 1.0
    return float(1.0 - dot / np.sqrt(norm_o * norm_q))


SPECS: dict[str, MetricSpec] = {
    "mse": MetricSpec(_squared_error_stats, _mean_reduce, 1, separable=True, needs_grad=False),
    "cosine": MetricSpec(_cosine_stats, _cosine_reduce, 3, separable=False, needs_grad=False),
    "hessian": MetricSpec(_squared_error_stats, _mean_reduce, 1, separable=True, needs_grad=True),
}


def metric_spec(name: str) -> MetricSpec:
    if name not in SPECS:
        raise ValueError(f"unknown metric {name!r}; use one of {METRICS}")
    return SPECS[name]


def as_columns(a: ArrayLike) -> np.ndarray:
    """``a`` as a 2-D ``[rows, columns]`` view, columns being the last axis (a 0-d/1-D array is one column)."""
    a = np.asarray(a)
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(-1, 1)


def evaluate_metric(spec: MetricSpec, output: ArrayLike, quantized: ArrayLike, grad: ArrayLike | None = None) -> float:
    output, quantized = np.asarray(output), np.asarray(quantized)
    if output.shape != quantized.shape:
        raise ValueError(f"output and quantized shapes differ: {output.shape} vs {quantized.shape}")
    if spec.needs_grad:
        if grad is None or np.shape(grad) != output.shape:
            raise ValueError(f"the hessian metric needs a gradient of shape {output.shape}, got {np.shape(grad)}")
        grad = as_columns(np.asarray(grad, dtype=np.float64))
    else:
        grad = None
    stats = spec.column_stats(as_columns(output), as_columns(quantized), grad)
    return spec.reduce(stats, output.size)


def mse(output: ArrayLike, quantized: ArrayLike) -> float:
    """Mean over elements of ``(quantized - output)**2`` in float64; shapes must match."""
    return evaluate_metric(SPECS["mse"], output, quantized)


def cosine(output: ArrayLike, quantized: ArrayLike) -> float:
    """``1 - cosine similarity`` of the flattened tensors in float64: 0 best, 2 worst (lower is better).

    Both all-zero counts as identical (0); exactly one all-zero as orthogonal (1).
    """
    return evaluate_metric(SPECS["cosine"], output, quantized)


def hessian(output: ArrayLike, quantized: ArrayLike, grad: ArrayLike) -> float:
    """PTQ4ViT's Hessian-guided metric: mean over elements of ``(grad * (quantized - output))**2`` (float64).

    ``grad = dL/dO`` must have ``output``'s shape; ``grad = 1`` everywhere gives :func:`mse`.
    """
    return evaluate_metric(SPECS["hessian"], output, quantized, grad)


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(signal / noise)`` in dB from the two energies (sums of
    squares); ``inf`` for zero noise, ``-inf`` for zero signal with noise."""
    if noise_energy == 0:
        return float("inf")
    if signal_energy == 0:
        return float("-inf")
    return float(10 * np.log10(signal_energy / noise_energy))


def metric_fn(name: str) -> Metric:
    """The metric ``name`` as ``f(output, quantized, grad=None) -> float`` (lower is better).

    ``"mse"`` and ``"cosine"`` ignore ``grad``; ``"hessian"`` requires it. Raises ValueError for other names.
    """
    return partial(evaluate_metric, metric_spec(name))
