"""Observers: watch tensors during calibration and keep streaming statistics of bounded size.

An observer only accumulates statistics; turning them into a clipping range is the job of
:mod:`onnxsmith.calibration.range_search`, and turning a range into ``QuantizeLinear`` parameters the job of
:mod:`onnxsmith.calibration.qparams` (the split torch.ao uses). Every observer's state has a size fixed at
construction (or by the first batch), so peak memory does not grow with the number of calibration samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.calibration.qparams import fake_quantize


class Observer(ABC):
    """Streaming statistics of every value passed to :meth:`observe`.

    ``name`` (optional, settable) is the watched tensor's name, used in error messages. ``count`` is the number
    of elements seen so far.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.count = 0

    def observe(self, array: np.ndarray) -> None:
        """Add every element of ``array`` (any shape, real dtype) to the statistics.

        Empty arrays are ignored. Raises ValueError, naming the observer, if ``array`` holds NaN or Inf; the
        statistics are then unchanged.
        """
        values = np.asarray(array)
        if values.size == 0:
            return
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise TypeError(f"{self._label()} observes real numbers, got dtype {values.dtype}")
        values = values.astype(np.float64, copy=False)
        if not np.isfinite(values).all():
            raise ValueError(f"{self._label()} got NaN or Inf values")
        self._update(values)
        self.count += values.size

    @abstractmethod
    def state_bytes(self) -> int:
        """Bytes held in the observer's arrays; independent of how many batches were observed."""

    @abstractmethod
    def _update(self, values: np.ndarray) -> None:
        """Fold a non-empty, finite float64 batch into the statistics."""

    def _label(self) -> str:
        kind = type(self).__name__
        return f"{kind} {self.name!r}" if self.name is not None else kind


class MinMaxObserver(Observer):
    """Running minimum and maximum over all elements (``min``/``max`` are Python floats, None before data)."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.min: float | None = None
        self.max: float | None = None

    def state_bytes(self) -> int:
        return 0  # two Python floats, no arrays

    def _update(self, values: np.ndarray) -> None:
        low, high = float(values.min()), float(values.max())
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)


class PerChannelMinMaxObserver(Observer):
    """Running minimum and maximum of every channel (index along ``axis``; negative axes count from the end).

    The first batch fixes the channel count; a later batch with another channel count, or too few dimensions
    for ``axis``, raises ValueError. ``min``/``max`` are float64 arrays of shape ``(channels,)``, None before data.
    """

    def __init__(self, axis: int, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = axis
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def state_bytes(self) -> int:
        return 0 if self.min is None else self.min.nbytes + self.max.nbytes

    def _update(self, values: np.ndarray) -> None:
        if not -values.ndim <= self.axis < values.ndim:
            raise ValueError(f"{self._label()}: axis {self.axis} is out of range for shape {values.shape}")
        channels = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        if self.min is not None and channels.shape[0] != self.min.size:
            raise ValueError(
                f"{self._label()}: batch has {channels.shape[0]} channels along axis {self.axis}, "
                f"earlier batches had {self.min.size}"
            )
        low, high = channels.min(axis=1), channels.max(axis=1)
        self.min = low if self.min is None else np.minimum(self.min, low)
        self.max = high if self.max is None else np.maximum(self.max, high)


class ChannelNormObserver(Observer):
    """Running sum of squares of every channel (index along ``axis``), Wanda's ``‖X_j‖₂²`` over all tokens.

    ``sum_squares`` is a float64 array of shape ``(channels,)`` (None before data) and ``norms`` its square root.
    The first batch fixes the channel count; a batch with another count raises ValueError.
    """

    def __init__(self, axis: int = -1, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = axis
        self.sum_squares: np.ndarray | None = None

    @property
    def norms(self) -> np.ndarray | None:
        return None if self.sum_squares is None else np.sqrt(self.sum_squares)

    def state_bytes(self) -> int:
        return 0 if self.sum_squares is None else self.sum_squares.nbytes

    def _update(self, values: np.ndarray) -> None:
        if not -values.ndim <= self.axis < values.ndim:
            raise ValueError(f"{self._label()}: axis {self.axis} is out of range for shape {values.shape}")
        channels = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        if self.sum_squares is not None and channels.shape[0] != self.sum_squares.size:
            raise ValueError(f"{self._label()}: batch has {channels.shape[0]} channels along axis {self.axis}, "
                             f"earlier batches had {self.sum_squares.size}")
        squares = np.einsum("ct,ct->c", channels, channels)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares


class GramObserver(Observer):
    """Running ``X^T X`` of the rows of ``X [tokens, channels]`` (the last axis is the channel axis).

    ``gram`` is ``X^T X / tokens`` (float64 ``[channels, channels]``; None before data): the Hessian of a linear
    layer's mean squared output error with respect to its weight, up to a factor 2. The first batch fixes the
    channel count; a batch with another count raises ValueError.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.sum_outer: np.ndarray | None = None
        self.rows = 0

    @property
    def gram(self) -> np.ndarray | None:
        return None if self.sum_outer is None else self.sum_outer / max(self.rows, 1)

    def state_bytes(self) -> int:
        return 0 if self.sum_outer is None else self.sum_outer.nbytes

    def _update(self, values: np.ndarray) -> None:
        rows = values.reshape(-1, values.shape[-1])
        if self.sum_outer is not None and rows.shape[1] != self.sum_outer.shape[0]:
            raise ValueError(f"{self._label()}: batch has {rows.shape[1]} channels, earlier batches had "
                             f"{self.sum_outer.shape[0]}")
        outer = rows.T @ rows
        self.sum_outer = outer if self.sum_outer is None else self.sum_outer + outer
        self.rows += rows.shape[0]


_RANGE_MARGIN = 2.0**-20
"""Relative headroom above the first ``max|v|``, so every observed value lies strictly inside the range."""


class ChannelEntropyObserver(ChannelNormObserver):
    """Per-channel histograms and their entropy, plus the channel norms of :class:`ChannelNormObserver`.

    Channel ``c`` is histogrammed over a symmetric range ``[-R_c, R_c)`` in ``bins`` equal bins of width
    ``w_c = R_c / (bins/2)``, value ``v`` in bin ``floor(v / w_c) + bins/2``: the first batch with a non-zero value
    in the channel sets ``R_c`` just above that batch's ``max|v|``, and a later batch reaching ``R_c`` doubles it
    until every value lies below (bin pairs merge exactly, so the histogram is the one the final range would give
    in one shot, whatever the batching).
    ``entropy`` is ``H_c = -Σ p log p`` (nats) of each channel's histogram: 0 for a constant channel, at most
    ``log(bins)``. ``histograms`` is int64 ``(channels, bins)``; both are None before data.
    """

    def __init__(self, axis: int = -1, bins: int = 256, name: str | None = None) -> None:
        super().__init__(axis, name)
        if bins < 4 or bins % 4:
            raise ValueError(f"ChannelEntropyObserver needs a multiple of 4 bins (>= 4), got {bins}")
        self.bins = bins
        self.histograms: np.ndarray | None = None
        self.range_max: np.ndarray | None = None

    @property
    def entropy(self) -> np.ndarray | None:
        if self.histograms is None:
            return None
        p = self.histograms / self.histograms.sum(axis=1, keepdims=True)
        return (p * -np.log(np.where(p > 0, p, 1.0))).sum(axis=1)

    def state_bytes(self) -> int:
        if self.histograms is None:
            return 0
        return super().state_bytes() + self.histograms.nbytes + self.range_max.nbytes

    def _update(self, values: np.ndarray) -> None:
        super()._update(values)
        channels = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        amax = np.abs(channels).max(axis=1)
        if self.histograms is None:
            self.histograms = np.zeros((channels.shape[0], self.bins), dtype=np.int64)
            self.range_max = np.zeros(channels.shape[0])
        unset = self.range_max == 0
        self.range_max[unset] = amax[unset] * (1 + _RANGE_MARGIN)
        while (grow := (self.range_max <= amax) & (amax > 0)).any():
            self._double(grow)
        half = self.bins // 2
        width = np.where(self.range_max > 0, self.range_max / half, 1.0)[:, None]
        slots = np.clip(np.floor(channels / width).astype(np.int64) + half, 0, self.bins - 1)
        offsets = (np.arange(channels.shape[0]) * self.bins)[:, None]
        counts = np.bincount((slots + offsets).ravel(), minlength=self.histograms.size)
        self.histograms += counts.reshape(self.histograms.shape)

    def _double(self, rows: np.ndarray) -> None:
        """Double ``R`` of the ``rows`` channels: old bins ``2j, 2j + 1`` become new bin ``j + bins/4``."""
        old = self.histograms[rows]
        merged = np.zeros_like(old)
        quarter = self.bins // 4
        pairs = old[:, 0::2] + old[:, 1::2]
        merged[:, quarter:quarter + pairs.shape[1]] = pairs
        self.histograms[rows] = merged
        self.range_max[rows] *= 2


class HistogramObserver(Observer):
    """Histogram of all values over a symmetric range ``[-R, R]`` with ``bins`` equal bins, plus exact min/max.

    Bin ``k`` holds the values ``v`` with ``edges[k] <= v < edges[k+1]``; the last bin also holds ``v == R``.
    The edges are ``(k - bins/2) * width`` rounded once to float64, so ``0`` is always an edge.

    The first batch with a non-zero value sets ``R`` to its ``max|v|`` (rounded up by a few ulps at most, so that
    ``edges[-1] >= max|v|``); while only zeros have been seen ``R`` is a tiny placeholder, and the zeros sit in
    bin ``bins/2`` whatever ``R`` becomes. A batch beyond ``R`` doubles ``R`` until it fits. Doubling is exact:
    the bin count is even and the range symmetric, so every doubled edge is an old edge (``2m * width`` is
    ``m * 2width`` rounded the same way) and each new bin is the union of at most two old bins. The histogram
    therefore equals ``np.histogram(all_values, bins=edges)`` over the final edges, whatever the batching.
    """

    _PLACEHOLDER_RANGE = 1e-8

    def __init__(self, bins: int = 2048, name: str | None = None) -> None:
        super().__init__(name)
        if bins < 2 or bins % 2:
            raise ValueError(f"HistogramObserver needs an even number of bins >= 2, got {bins}")
        self.bins = bins
        self.min: float | None = None
        self.max: float | None = None
        self._width = 2 * self._PLACEHOLDER_RANGE / bins
        # counts[k] for bin k < bins; counts[bins] holds the values exactly equal to R, which stay in the last
        # bin only until R doubles (then they belong to bin 3*bins/4), so they are kept apart.
        self._counts = np.zeros(bins + 1, dtype=np.int64)

    @property
    def histogram(self) -> np.ndarray:
        """Counts per bin (int64, length ``bins``)."""
        counts = self._counts[:-1].copy()
        counts[-1] += self._counts[-1]
        return counts

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (float64), symmetric around 0: ``edges[0] == -R``, ``edges[-1] == R``."""
        half = self.bins // 2
        return np.arange(-half, half + 1, dtype=np.float64) * self._width

    @property
    def range_max(self) -> float:
        """``R``: the histogram covers ``[-R, R]`` and ``R >= max|v|`` over every observed value."""
        return (self.bins // 2) * self._width  # == edges[-1], the same float64 product

    def state_bytes(self) -> int:
        return self._counts.nbytes

    def _update(self, values: np.ndarray) -> None:
        low, high = float(values.min()), float(values.max())
        amax = max(-low, high)
        if amax > 0 and (self.max is None or max(-self.min, self.max) == 0):
            self._width = self._width_for(amax)  # only zeros so far: they stay in bin bins/2 for any width
        while self.range_max < amax:
            self._double()
        self._counts += np.bincount(self._slots(values.ravel()), minlength=self.bins + 1)
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)

    def _slots(self, values: np.ndarray) -> np.ndarray:
        """Slot ``k`` of each value: ``edges[k] <= v < edges[k+1]``, or ``bins`` for ``v == R`` (see __init__).

        ``floor(v / width)`` is off by at most one from the edge comparison (both round once), so one
        correction step against the edges makes it exact (``np.histogram`` does the same).
        """
        edges = self.edges
        slots = np.floor(values / self._width).astype(np.int64) + self.bins // 2
        np.clip(slots, 0, self.bins, out=slots)
        slots -= values < edges[slots]
        slots += (slots < self.bins) & (values >= edges[np.minimum(slots + 1, self.bins)])
        return slots

    def _width_for(self, amax: float) -> float:
        """The smallest bin width (up to rounding) whose top edge ``(bins/2) * width`` is at least ``amax``."""
        width = amax / (self.bins // 2)
        while (self.bins // 2) * width < amax:
            width = float(np.nextafter(width, np.inf))
        return width

    def _double(self) -> None:
        """Double ``R``: old bin (or top slot) ``k`` lies inside new bin ``(k + bins/2) // 2``."""
        counts = np.zeros_like(self._counts)
        np.add.at(counts, (np.arange(self.bins + 1) + self.bins // 2) // 2, self._counts)
        self._counts = counts
        self._width *= 2


class QuantizationNoiseObserver(Observer):
    """Signal and quantization-noise energy of a tensor under fixed QuantizeLinear parameters.

    Each batch is fake-quantized exactly as ONNX QuantizeLinear/DequantizeLinear would (per-tensor, or per-axis
    with ``axis``); :meth:`sqnr_db` is 10·log10(Σx² / Σ(x − x̂)²) over everything observed.
    """

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.zero_point = np.asarray(zero_point)
        self.axis = axis
        self.signal = 0.0
        self.noise = 0.0

    def state_bytes(self) -> int:
        return 16

    def _update(self, values: np.ndarray) -> None:
        original = values.astype(np.float32)
        restored = fake_quantize(original, self.scale, self.zero_point, self.zero_point.dtype, axis=self.axis)
        self.signal += float(np.sum(np.square(original, dtype=np.float64)))
        self.noise += float(np.sum(np.square(original.astype(np.float64) - restored.astype(np.float64))))

    def sqnr_db(self) -> float:
        """The SQNR in dB (``inf`` when quantization is exact on the observed values)."""
        return sqnr_db(self.signal, self.noise)


class ReservoirObserver(Observer):
    """A uniform random sample of at most ``capacity`` observed values (reservoir sampling, fixed seed).

    Searches that need raw values (e.g. the twin-uniform step search) read ``sample``; memory is bounded by
    ``capacity`` whatever the number of batches.
    """

    def __init__(self, capacity: int = 2**18, name: str | None = None, seed: int = 0) -> None:
        super().__init__(name)
        self.capacity = capacity
        self._values = np.empty(capacity, dtype=np.float32)
        self._filled = 0
        self._rng = np.random.default_rng(seed)

    @property
    def sample(self) -> np.ndarray:
        """The sampled values (float32, at most ``capacity``)."""
        return self._values[: self._filled]

    def state_bytes(self) -> int:
        return self._values.nbytes

    def _update(self, values: np.ndarray) -> None:
        flat = values.ravel().astype(np.float32)
        room = self.capacity - self._filled
        head, tail = flat[:room], flat[room:]
        self._values[self._filled : self._filled + head.size] = head
        self._filled += head.size
        if tail.size:
            seen_before = self.count + head.size
            positions = seen_before + np.arange(1, tail.size + 1)
            keep = self._rng.random(tail.size) < self.capacity / positions
            slots = self._rng.integers(0, self.capacity, int(keep.sum()))
            self._values[slots] = tail[keep]


class SampleObserver(Observer):
    """The first ``max_samples`` observed arrays, whole and in order (float32 copies).

    Searches that need aligned raw samples of several tensors (a layer's input rows and its output gradient
    rows) read ``samples``: observers of different tensors fed the same feeds in the same order keep the same
    feeds. Memory is bounded by ``max_samples`` times the largest observed array.
    """

    def __init__(self, max_samples: int = 32, name: str | None = None) -> None:
        super().__init__(name)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.samples: list[np.ndarray] = []

    def rows(self) -> np.ndarray:
        """The samples as one float32 ``[rows, last axis]`` matrix (all leading axes flattened into rows)."""
        if not self.samples:
            raise ValueError(f"{self._label()} observed nothing")
        return np.concatenate([s.reshape(-1, s.shape[-1]) for s in self.samples])

    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.samples)

    def _update(self, values: np.ndarray) -> None:
        if len(self.samples) < self.max_samples:
            self.samples.append(values.astype(np.float32))
