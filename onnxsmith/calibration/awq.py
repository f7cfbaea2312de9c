"""Activation-aware weight scaling (AWQ-style) for blocked INT4 weights.

Layers reading the same input ``X [T, K]`` (q/k/v after one norm) share one per-input-channel factor ``s [K]``:
their weights become ``diag(s) W`` and the input ``X diag(s)^-1``, which the graph absorbs into the op producing
``X`` (see :mod:`onnxsmith.rewrite.channel_scaling`). Salient input channels (large activations) get ``s > 1``, so
their weights use more of the INT4 grid. Following AWQ, ``s = a ** alpha`` with ``a_j`` the channel's activation
magnitude (here its RMS ``sqrt(E[x_j**2])``, read off the Gram matrix's diagonal), normalised by
``sqrt(max s * min s)``; ``alpha`` is searched on a grid in ``[0, 1]`` minimising the summed output error of the
group's layers on the calibration tokens, ``sum_i tr(D_i^T G D_i)`` with ``G = X^T X / T`` and
``D_i = W_i - diag(s)^-1 Q(diag(s) W_i)`` (``alpha = 0`` is plain round-to-nearest, so the chosen factor never
does worse on the calibration tokens). Steps inside the search are round-to-nearest; the caller may refine
them (MSE clipping) once ``s`` is fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxsmith.calibration.int4 import dequantize_blocks, output_error, quantize_blocks, rtn_scales


@dataclass(frozen=True)
class AwqChoice:
    """The chosen factor ``s [K]`` (all ones when ``alpha == 0``), its ``alpha``, and the group's output error
    with it and with plain round-to-nearest (``alpha = 0``)."""

    factors: np.ndarray
    alpha: float
    error: float
    rtn_error: float


def awq_factors(gram: np.ndarray, alpha: float) -> np.ndarray:
    """``s = a ** alpha / sqrt(max * min)`` with ``a = sqrt(diag(gram))`` (channels that never fire get the
    smallest non-zero magnitude)."""
    rms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    positive = rms[rms > 0]
    floor = positive.min() if positive.size else 1.0
    s = np.maximum(rms, floor) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def search_awq(gram: np.ndarray, weights: Sequence[np.ndarray], block: int, grid: int = 20) -> AwqChoice:
    """The ``alpha`` in ``{0, 1/grid, ..., 1}`` minimising the group's output error (ties keep the smaller
    ``alpha``)."""
    g = np.asarray(gram, dtype=np.float64).astype(np.float32)

    def error(factors: np.ndarray) -> float:
        total = 0.0
        for w in weights:
            scaled = w * factors[:, None]
            steps = rtn_scales(scaled, block)
            restored = dequantize_blocks(quantize_blocks(scaled, steps, block), steps, block) / factors[:, None]
            total += output_error(g, w - restored)
        return total

    ones = np.ones(g.shape[0], np.float32)
    rtn_error = error(ones)
    best = AwqChoice(ones, 0.0, rtn_error, rtn_error)
    for step in range(1, grid + 1):
        alpha = step / grid
        factors = awq_factors(g, alpha)
        value = error(factors)
        if value < best.error:
            best = AwqChoice(factors, alpha, value, rtn_error)
    return best
