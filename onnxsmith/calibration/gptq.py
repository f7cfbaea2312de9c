"""GPTQ rounding of blocked weights, in torch (the Cholesky factor and the row updates)."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

from onnxsmith.calibration.blocks import BlockGrid
from onnxsmith.calibration.int4 import check_block, mse_scales, rtn_scales
from onnxsmith.core.int4 import INT4_MAX, INT4_MIN


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
