"""Blocked symmetric INT4 weights: packing, the reference quantizer, and the scale choices of ``int4-weight``.

A weight is handled in GEMM form ``O = X @ W`` with ``W [K, N]``; one scale per block of ``block`` consecutive
input channels (rows) of one output channel (column): ``scales [K / block, N]``. Levels are ``-8 .. 7`` (zero
point 0), ``q = clip(rint(w / s), -8, 7)`` (round half to even, as ``QuantizeLinear``), ``w_hat = q * s``.

Packing follows ONNX's INT4 tensor type (element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high
nibble, an odd count padded with a zero nibble); onnxruntime's ``MatMulNBits`` stores unsigned nibbles ``q + 8``
the same way, per output channel and block.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from numpy.typing import ArrayLike

from onnxsmith.calibration.blocks import BlockGrid

INT4_MIN, INT4_MAX = -8, 7
BLOCK_SIZES = (16, 32, 64, 128, 256)
TENSORRT_BLOCK_SIZES = (64, 128)
"""TensorRT's INT4 weight-only blocked ``DequantizeLinear`` accepts these block sizes only."""
CLIP_RATIOS = np.linspace(0.5, 8 / 7, 40)
"""The MSE search's candidate steps, as multiples of the RTN step ``max|w| / 7`` (``8/7``: the block's largest
magnitude lands on level ``-8`` when negative)."""


def pack_int4(values: ArrayLike) -> np.ndarray:
    """``values`` (flattened, each in ``-8 .. 7`` or ``0 .. 15``) two per byte, low nibble first: uint8
    ``[ceil(n / 2)]``. Raises ValueError for values outside ``-8 .. 15``."""
    flat = np.asarray(values).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < INT4_MIN or flat.max() > 15):
        raise ValueError(f"INT4 values must lie in [-8, 15], got [{flat.min()}, {flat.max()}]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: ArrayLike, count: int, signed: bool = True) -> np.ndarray:
    """The first ``count`` nibbles of ``packed`` (low nibble first) as int8: ``-8 .. 7`` when ``signed``, else
    ``0 .. 15``."""
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if not 0 <= count <= 2 * data.size:
        raise ValueError(f"count {count} does not fit {data.size} packed bytes")
    nibbles = np.empty(2 * data.size, dtype=np.int8)
    nibbles[0::2] = data & 0xF
    nibbles[1::2] = data >> 4
    nibbles = nibbles[:count]
    return np.where(nibbles > INT4_MAX, nibbles - 16, nibbles).astype(np.int8) if signed else nibbles


def int4_initializer(name: str, levels: ArrayLike) -> onnx.TensorProto:
    """An ONNX ``INT4`` (type 22) initializer holding integer ``levels`` (``-8 .. 7``), packed."""
    array = np.asarray(levels)
    if array.size and (array.min() < INT4_MIN or array.max() > INT4_MAX):
        raise ValueError(f"signed INT4 levels must lie in [-8, 7], got [{array.min()}, {array.max()}]")
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=list(array.shape))
    tensor.raw_data = pack_int4(array).tobytes()
    return tensor


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


def gptq_quantize(w: ArrayLike, gram: ArrayLike, block: int, mse: bool = True, damp: float = 0.01,
                  steps: ArrayLike | None = None, levels: tuple[int, int] = (INT4_MIN, INT4_MAX),
                  act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding (Frantar et al.): quantize ``W [K, N]`` one input channel at a time, spreading each
    channel's rounding error over the channels not yet quantized through the inverse of the Gram matrix
    ``G = X^T X / T`` (the layer's output-error Hessian), so the output error, not the weight error, is what the
    rounding minimises.

    Channels go in order, each block's step chosen when its first channel is reached, from the updated weights
    of the block (MSE-clipped with ``diag(G)`` as channel weights, or round-to-nearest), unless ``steps``
    ``[K / block, N]`` fixes them. ``act_order`` takes the channels by decreasing ``diag(G)`` instead, with the
    steps fixed beforehand (``steps``, else chosen on the original weights: GPTQ's "static groups"), so blocks
    stay contiguous in the stored layout. ``levels`` (default INT4's) bound the integers. ``damp`` adds
    ``damp * mean(diag G)`` to the diagonal; channels that never fire (zero diagonal) are left to the others.
    Returns int8 levels ``[K, N]`` and float32 steps ``[K / block, N]``.
    """
    weight = torch.from_numpy(np.array(w, dtype=np.float32))
    k, n = weight.shape
    if steps is None:
        check_block(k, block)
    elif k % block:
        raise ValueError(f"block {block} does not divide K = {k}")
    h = torch.from_numpy(np.array(gram, dtype=np.float64))
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    weight[dead, :] = 0.0
    channel_weights = torch.diag(h).to(torch.float32).numpy()
    fixed = steps is not None or act_order
    if steps is not None:
        steps = np.array(steps, dtype=np.float32)
    elif act_order:
        steps = mse_scales(weight.numpy(), block, channel_weights) if mse else rtn_scales(weight.numpy(), block)
    else:
        steps = np.zeros((k // block, n), dtype=np.float32)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    weight, h = weight[order], h[order][:, order]
    row_steps = torch.from_numpy(BlockGrid(k, n, block, 1).expand(steps))[order] if fixed else None
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    low, high = levels
    quantized = torch.zeros((k, n), dtype=torch.float32)
    for start in range(0, k, block):
        if not fixed:
            group = weight[start:start + block].numpy()
            steps[start // block] = (mse_scales(group, block, channel_weights[start:start + block]) if mse
                                     else rtn_scales(group, block))[0]
        errors = torch.zeros((block, n), dtype=torch.float32)
        for offset in range(block):
            row = start + offset
            step = row_steps[row] if fixed else torch.from_numpy(steps[start // block])
            q = torch.clamp(torch.round(weight[row] / step), low, high)
            quantized[row] = q
            error = (weight[row] - q * step) / h_inv[row, row]
            weight[row + 1:start + block] -= torch.outer(h_inv[row, row + 1:start + block], error)
            errors[offset] = error
        weight[start + block:] -= h_inv[start:start + block, start + block:].T @ errors
    result = torch.empty_like(quantized)
    result[order] = quantized
    return result.numpy().astype(np.int8), steps
