"""INT4 packing: ONNX's INT4 tensor type (element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high
nibble, an odd count padded with a zero nibble); onnxruntime's ``MatMulNBits`` stores unsigned nibbles ``q + 8``
the same way, per output channel and block."""

from __future__ import annotations

import numpy as np
import onnx
from numpy.typing import ArrayLike

INT4_MIN, INT4_MAX = -8, 7


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
