"""Sub-layer granularity (PTQ-SL): one quantization step per block of a weight ``W [K, N]``.

A weight is viewed in GEMM form ``O = X @ W``: rows are the ``K`` input channels (a Conv's im2col rows, each
input channel contributing ``unit = kh * kw`` consecutive rows), columns the ``N`` output channels. A grid
cuts the output channels into ``n_V`` blocks and the input channels into ``n_H`` blocks; every block has one
step. ``n_V = N, n_H = 1`` is per-channel quantization, ``n_V = n_H = 1`` per-tensor.

Block sizes follow ONNX's blocked quantization (``DequantizeLinear`` opset 21, ``block_size``): ``ceil(D / n)``
channels per block along an axis of ``D`` channels, the last block shorter when ``D`` is not a multiple. The
realised number of blocks is therefore ``ceil(D / ceil(D / n))``, which can be below ``n`` (10 channels in
"6 blocks" are 5 blocks of 2); :attr:`BlockGrid.shape` says what was realised. This convention is what lets
every grid be emitted as one blocked ``DequantizeLinear``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from onnxsmith.calibration.twin_uniform import initial_delta

_GRID_PATTERN = re.compile(r"^(all|\d+)x(all|\d+)$")


@dataclass(frozen=True)
class GridSpec:
    """A requested grid: ``out_blocks`` (``n_V``; None: one per output channel) x ``in_blocks`` (``n_H``;
    None: one per input channel)."""

    out_blocks: int | None
    in_blocks: int | None

    @classmethod
    def parse(cls, text: str) -> GridSpec:
        """``"per-channel"``, ``"per-tensor"`` or ``"NVxNH"`` with each side a positive count or ``all``
        (e.g. ``"16x4"``, ``"allx2"``); raises ValueError otherwise."""
        if not isinstance(text, str):
            raise ValueError(f"grid must be a string such as '16x4', got {text!r}")
        named = {"per-channel": "allx1", "per-tensor": "1x1"}
        match = _GRID_PATTERN.match(named.get(text.strip(), text.strip()))
        if match is None:
            raise ValueError(f"grid must be 'per-channel', 'per-tensor' or 'NVxNH' (counts or 'all'), got {text!r}")
        out_blocks, in_blocks = (None if side == "all" else int(side) for side in match.groups())
        if out_blocks == 0 or in_blocks == 0:
            raise ValueError(f"grid counts must be positive, got {text!r}")
        return cls(out_blocks, in_blocks)

    def __str__(self) -> str:
        return "x".join("all" if n is None else str(n) for n in (self.out_blocks, self.in_blocks))

    def grid(self, k: int, n: int, unit: int = 1) -> BlockGrid:
        """The realised grid for a ``[K, N]`` weight whose input channels are ``unit`` rows each."""
        if unit < 1 or k % unit:
            raise ValueError(f"K = {k} is not a whole number of {unit}-row input channels")
        channels = k // unit
        in_size = block_size(channels, self.in_blocks or channels)
        out_size = block_size(n, self.out_blocks or n)
        return BlockGrid(k, n, in_size * unit, out_size, unit)


def block_size(channels: int, blocks: int) -> int:
    """Channels per block when ``channels`` are cut into at most ``blocks`` equal blocks (last one shorter)."""
    if channels < 1 or blocks < 1:
        raise ValueError(f"need channels >= 1 and blocks >= 1, got {channels} and {blocks}")
    return math.ceil(channels / min(blocks, channels))


@dataclass(frozen=True)
class BlockGrid:
    """A realised grid over ``W [k, n]``: blocks of ``row_block`` rows x ``col_block`` columns (the last ones
    shorter); ``unit`` rows make one input channel (``row_block`` is a multiple of it)."""

    k: int
    n: int
    row_block: int
    col_block: int
    unit: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(input blocks, output blocks)``: the shape of a block-scale array."""
        return math.ceil(self.k / self.row_block), math.ceil(self.n / self.col_block)

    @property
    def scales(self) -> int:
        """The number of distinct steps the grid stores."""
        rows, cols = self.shape
        return rows * cols

    @property
    def channel_block(self) -> int:
        """Input channels per block (``block_size`` of a blocked ``DequantizeLinear`` on the input axis)."""
        return self.row_block // self.unit

    def row_slices(self) -> list[slice]:
        return [slice(start, min(start + self.row_block, self.k)) for start in range(0, self.k, self.row_block)]

    def col_slices(self) -> list[slice]:
        return [slice(start, min(start + self.col_block, self.n)) for start in range(0, self.n, self.col_block)]

    def expand(self, block_values: ArrayLike) -> np.ndarray:
        """``[k, n]``: each element gets its block's value from ``block_values`` of :attr:`shape`."""
        values = np.asarray(block_values)
        if values.shape != self.shape:
            raise ValueError(f"block values must have shape {self.shape}, got {values.shape}")
        rows = np.repeat(values, self.row_block, axis=0)[: self.k]
        return np.repeat(rows, self.col_block, axis=1)[:, : self.n]

    def expand_columns(self, block_values: ArrayLike) -> np.ndarray:
        """``[..., n]`` from ``[..., output blocks]``: each column gets its output block's value."""
        values = np.asarray(block_values)
        return np.repeat(values, self.col_block, axis=-1)[..., : self.n]

    def sum_columns(self, per_column: ArrayLike) -> np.ndarray:
        """``[..., output blocks]``: ``per_column [..., n]`` summed within each output block."""
        values = np.asarray(per_column)
        return np.add.reduceat(values, np.arange(0, self.n, self.col_block), axis=-1)

    def block_absmax(self, w: ArrayLike) -> np.ndarray:
        """``max|w|`` of each block of ``w [k, n]``, shape :attr:`shape`."""
        a = np.abs(np.asarray(w, dtype=np.float32))
        if a.shape != (self.k, self.n):
            raise ValueError(f"w must have shape {(self.k, self.n)}, got {a.shape}")
        rows = np.maximum.reduceat(a, np.arange(0, self.k, self.row_block), axis=0)
        return np.maximum.reduceat(rows, np.arange(0, self.n, self.col_block), axis=1)


def initial_weight_steps(amax: ArrayLike, bits: int) -> np.ndarray:
    """Float32 ``Δ0 = amax / (2**(bits-1) - 0.5)`` per element of ``amax`` (shape kept); ``amax == 0`` gets 1."""
    amax = np.asarray(amax)
    steps = [initial_delta(float(a), bits) if a > 0 else 1.0 for a in amax.ravel()]
    return np.asarray(steps, dtype=np.float32).reshape(amax.shape)


def initial_block_steps(w: ArrayLike, grid: BlockGrid, bits: int) -> np.ndarray:
    """Float32 ``Δ0 = max|block| / (2**(bits-1) - 0.5)`` per block (an all-zero block gets 1), shape ``grid.shape``."""
    return initial_weight_steps(grid.block_absmax(w), bits)

