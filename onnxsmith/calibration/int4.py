"""Blocked symmetric INT4 weights: the reference quantizer and the scale choices of ``int4-weight``.

A weight is handled in GEMM form ``O = X @ W`` with ``W [K, N]``; one scale per block of ``block`` consecutive
input channels (rows) of one output channel (column): ``scales [K / block, N]``. Levels are ``-8 .. 7`` (zero
point 0), ``q = clip(rint(w / s), -8, 7)`` (round half to even, as ``QuantizeLinear``), ``w_hat = q * s``.

Packing into ONNX's INT4 tensor type is :mod:`onnxsmith.core.int4`; GPTQ rounding (torch) is
:mod:`onnxsmith.calibration.gptq`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from onnxsmith.calibration.blocks import BlockGrid
from onnxsmith.core.int4 import INT4_MAX, INT4_MIN

BLOCK_SIZES = (16, 32, 64, 128, 256)
TENSORRT_BLOCK_SIZES = (64, 128)
"""TensorRT's INT4 weight-only blocked ``DequantizeLinear`` accepts these block sizes only."""
CLIP_RATIOS = np.linspace(0.5, 8 / 7, 40)
"""The MSE search's candidate steps, as multiples of the RTN step ``max|w| / 7`` (``8/7``: the block's largest
magnitude lands on level ``-8`` when negative)."""


def check_block(k: int, block: int) -> None:
    """Raise ValueError unless ``block`` is an allowed block size that divides ``K``."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {list(BLOCK_SIZES)}, got {block!r}")
    if k % block:
        raise ValueError(f"block size {block} does not divide K = {k}")


def block_grid(w: np.ndarray, block: int) -> BlockGrid:
    """The grid of ``W [K, N]`` with ``block`` rows by one column per step."""
    k, n = np.shape(w)
    return BlockGrid(k, n, block, 1)


def quantize_blocks(w: ArrayLike, scales: ArrayLike, block: int) -> np.ndarray:
    """Int8 levels ``clip(rint(w / s), -8, 7)`` of ``w [K, N]`` with ``scales [K / block, N]``."""
    w = np.asarray(w, dtype=np.float32)
    check_block(w.shape[0], block)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.rint(w / block_grid(w, block).expand(np.asarray(scales, dtype=np.float32)))
    return np.clip(np.nan_to_num(levels), INT4_MIN, INT4_MAX).astype(np.int8)


def dequantize_blocks(levels: ArrayLike, scales: ArrayLike, block: int) -> np.ndarray:
    """``levels * s`` per block: the float32 weight a blocked ``DequantizeLinear`` produces."""
    levels = np.asarray(levels, dtype=np.float32)
    return levels * block_grid(levels, block).expand(np.asarray(scales, dtype=np.float32))


def rtn_scales(w: ArrayLike, block: int) -> np.ndarray:
    """Round-to-nearest steps ``max|block| / 7`` (an all-zero block gets 1), float32 ``[K / block, N]``."""
    w = np.asarray(w, dtype=np.float32)
    check_block(w.shape[0], block)
    amax = block_grid(w, block).block_absmax(w)
    return np.where(amax > 0, amax / INT4_MAX, 1.0).astype(np.float32)


def mse_scales(w: ArrayLike, block: int, channel_weights: ArrayLike | None = None,
               ratios: ArrayLike = CLIP_RATIOS) -> np.ndarray:
    """Per block, the step among ``ratio * max|block| / 7`` minimising ``sum_j h_j (w_jn - w_hat_jn)**2``.

    ``channel_weights`` ``h [K]`` (e.g. the input channels' mean squares ``E[x_j**2]``, the diagonal of the
    layer's output-error Hessian) default to ones: plain weight MSE. Ties keep the earlier (smaller) ratio.
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    base = rtn_scales(w, block)
    h = np.ones(k, np.float32) if channel_weights is None else np.asarray(channel_weights, np.float32)
    if h.shape != (k,):
        raise ValueError(f"channel_weights must have shape ({k},), got {h.shape}")
    blocks = w.reshape(k // block, block, n)
    hb = h.reshape(k // block, block, 1)
    best_error = np.full(base.shape, np.inf)
    best = base.copy()
    for ratio in np.asarray(ratios, dtype=np.float32):
        step = base * ratio
        levels = np.clip(np.rint(blocks / step[:, None, :]), INT4_MIN, INT4_MAX)
        error = (hb * (blocks - levels * step[:, None, :]) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best = np.where(better, step, best)
    return best.astype(np.float32)


def output_error(gram: np.ndarray, delta: np.ndarray) -> float:
    """``sum_t ||x_t @ delta||**2 / T`` from the input Gram matrix ``gram = X^T X / T [K, K]``: the mean squared
    output error a weight error ``delta [K, N]`` causes on the calibration tokens."""
    return float(np.einsum("kn,kn->", gram @ delta, delta))
