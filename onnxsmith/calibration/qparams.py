"""Quantization parameters and the exact arithmetic of ONNX ``QuantizeLinear`` / ``DequantizeLinear``.

Scales are float32 and zero points the quantized integer type, as the ONNX operators take them. ``quantize``
and ``dequantize`` reproduce onnxruntime's CPU kernels bit for bit: ``x / scale`` is divided in float32 (not
float64, not a multiplication by ``1 / scale``), rounded half to even, offset by the zero point and saturated;
dequantization computes ``float32(q - zero_point) * scale`` in float32.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

QUANTIZED_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16))
# Smallest normal float32: the scale used when a range is empty (or a scale would be subnormal).
MIN_SCALE = np.finfo(np.float32).tiny


def symmetric_scale(amax: ArrayLike, bits: int = 8) -> np.ndarray:
    """Scale for symmetric ``bits``-bit quantization of ``[-amax, amax]``; the zero point is 0.

    ``scale = amax / (2**(bits-1) - 1)`` elementwise (so per-channel ``amax`` arrays give per-channel scales),
    rounded to float32 (0-d for a scalar ``amax``). ``amax`` must be finite and >= 0. A scale below the smallest
    normal float32, in particular for ``amax == 0``, becomes :data:`MIN_SCALE`: dividing by it is safe, 0 still
    maps to 0 and any non-zero value saturates.
    """
    amax = np.asarray(amax, dtype=np.float64)
    if not np.isfinite(amax).all() or (amax < 0).any():
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return _safe_scale(amax / (2 ** (bits - 1) - 1))


def asymmetric_qparams(lo: ArrayLike, hi: ArrayLike, dtype: DTypeLike = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, zero_point)`` mapping ``[lo, hi]`` onto the full range ``[qmin, qmax]`` of ``dtype``.

    The range is first extended to include 0 (ONNX and onnxruntime require 0 to be exactly representable:
    it quantizes to the zero point and back to 0). Then ``scale = (hi - lo) / (qmax - qmin)`` as float32 (see
    :func:`symmetric_scale` for an empty range) and ``zero_point = round(qmin - lo / scale)`` (half to even,
    with the float32 scale) clipped to ``[qmin, qmax]``, as ``dtype``. Rounding the zero point can move the
    representable range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` by up to half a step against the
    extended range. Works elementwise for per-channel arrays; needs finite ``lo <= hi``. ``dtype`` is uint8,
    int8, uint16 or int16.
    """
    dtype, qmin, qmax = _quantized_type(dtype)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (lo > hi).any():
        raise ValueError(f"need finite lo <= hi, got lo={lo}, hi={hi}")
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zero_point = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(dtype)
    return scale, zero_point


def quantize(
    x: ArrayLike, scale: ArrayLike, zero_point: ArrayLike, dtype: DTypeLike, axis: int | None = None
) -> np.ndarray:
    """ONNX ``QuantizeLinear``: ``saturate(round_half_to_even(x / scale) + zero_point)`` as ``dtype``.

    ``x`` is cast to float32 and divided by the float32 ``scale`` in float32, as onnxruntime does (exact for
    float32 ``x``; ``±inf`` saturates). Per-tensor (``axis=None``) ``scale`` and ``zero_point`` are scalars;
    per-axis they are 1-D with ``x.shape[axis]`` entries. ``scale`` must be positive and ``zero_point``
    representable in ``dtype`` (uint8, int8, uint16 or int16).
    """
    dtype, qmin, qmax = _quantized_type(dtype)
    x = np.asarray(x, dtype=np.float32)
    scale = _parameter(_checked_scale(scale), x.shape, axis, "scale")
    zero_point = np.asarray(zero_point)
    if ((zero_point < qmin) | (zero_point > qmax)).any():
        raise ValueError(f"zero_point {zero_point} does not fit {dtype}")
    offset = _parameter(zero_point.astype(np.float64), x.shape, axis, "zero_point")
    with np.errstate(over="ignore"):
        steps = np.rint(x / scale)
    return np.clip(steps.astype(np.float64) + offset, qmin, qmax).astype(dtype)


def dequantize(q: ArrayLike, scale: ArrayLike, zero_point: ArrayLike, axis: int | None = None) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``float32(q - zero_point) * scale`` in float32.

    ``scale`` and ``zero_point`` are laid out as for :func:`quantize`; the result is float32 of ``q``'s shape.
    """
    q = np.asarray(q)
    scale = _parameter(_checked_scale(scale), q.shape, axis, "scale")
    offset = _parameter(np.asarray(zero_point).astype(np.int32), q.shape, axis, "zero_point")
    return (q.astype(np.int32) - offset).astype(np.float32) * scale


def fake_quantize(
    x: ArrayLike, scale: ArrayLike, zero_point: ArrayLike, dtype: DTypeLike, axis: int | None = None
) -> np.ndarray:
    """``dequantize(quantize(x, ...))``: the float32 values a QuantizeLinear -> DequantizeLinear pair outputs."""
    return dequantize(quantize(x, scale, zero_point, dtype, axis), scale, zero_point, axis)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = scale.astype(np.float32)
    return np.where(scale < MIN_SCALE, MIN_SCALE, scale).astype(np.float32)


def _checked_scale(scale: ArrayLike) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return scale


def _quantized_type(dtype: DTypeLike) -> tuple[np.dtype, int, int]:
    dtype = np.dtype(dtype)
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"unsupported quantized type {dtype}; use one of {[str(t) for t in QUANTIZED_DTYPES]}")
    info = np.iinfo(dtype)
    return dtype, int(info.min), int(info.max)


def _parameter(values: np.ndarray, shape: tuple[int, ...], axis: int | None, what: str) -> np.ndarray:
    """``values`` shaped to broadcast against an array of ``shape``: a scalar, or 1-D along ``axis``."""
    if axis is None:
        if values.size != 1:
            raise ValueError(f"per-tensor {what} must be a scalar, got shape {values.shape}")
        return values.reshape(())
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for shape {shape}")
    if values.shape != (shape[axis],):
        raise ValueError(f"per-axis {what} must have shape ({shape[axis]},) for axis {axis}, got {values.shape}")
    layout = [1] * len(shape)
    layout[axis] = shape[axis]
    return values.reshape(layout)
