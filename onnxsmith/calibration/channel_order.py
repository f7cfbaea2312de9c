"""Choosing a lossless channel permutation for a region of layers (PTQ-SL's function-preserving reordering).

A region's ``C`` channels are the output channels of its producers and the input channels of its consumers.
Producers are given in GEMM form ``[K_p, C]`` (columns are the region's channels), consumers as ``[C * unit,
N_c]`` (channel ``c`` owns rows ``c * unit .. (c + 1) * unit - 1``: im2col rows are channel-major). A
permutation ``p`` means new channel ``i`` is old channel ``p[i]``; it only moves channels within consecutive
groups of ``group`` channels (attention heads; ``group = C`` is free).

The objective is the sum over the region's layers of the relative weight quantization error
``||W - Q(W)||² / ||W||²`` after permuting, where ``Q`` is the sub-layer fake quantization of
:mod:`onnxsmith.calibration.blocks` with the initial max-based steps. Strategies (:data:`STRATEGIES`) sort
channels by their producers' or consumers' ranges, cluster them with k-means on (min, max) as RPTQ does, or
(``"auto"``) keep whichever of these and the identity scores best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from onnxsmith.calibration.blocks import GridSpec, initial_block_steps
from onnxsmith.calibration.scale_search import uniform_fake_quantize

KMEANS_ITERATIONS = 100
MIN_GAIN = 1e-9
"""A strategy replaces a better-ranked candidate only when it lowers the objective by more than this fraction
(so a tie broken by summation rounding keeps the earlier candidate, the identity first)."""


class GemmWeight(NamedTuple):
    """A layer's weight in GEMM form ``[K, N]`` whose input channels are ``unit`` rows each."""

    w: np.ndarray
    unit: int = 1


@dataclass(frozen=True)
class OrderChoice:
    """The chosen permutation (new channel ``i`` = old channel ``permutation[i]``), the strategy that gave it
    (``"identity"`` when no reordering won) and the objective before and after."""

    permutation: np.ndarray
    strategy: str
    error_before: float
    error_after: float


@dataclass(frozen=True)
class _Region:
    producers: list[GemmWeight]
    consumers: list[GemmWeight]
    spec: GridSpec
    bits: int
    group: int

    @property
    def channels(self) -> int:
        if self.producers:
            return self.producers[0].w.shape[1]
        return self.consumers[0].w.shape[0] // self.consumers[0].unit


def choose_permutation(
    producers: Sequence[GemmWeight | np.ndarray],
    consumers: Sequence[GemmWeight | np.ndarray],
    spec: GridSpec,
    bits: int,
    strategy: str = "auto",
    group: int | None = None,
) -> OrderChoice:
    """The permutation ``strategy`` picks for a region (plain arrays are weights with ``unit = 1``).

    ``group`` (default: all channels) must divide the channel count. ``"auto"`` tries the identity first and
    keeps a strategy only when it lowers the objective by more than :data:`MIN_GAIN`, so its
    ``error_after <= error_before``. Raises ValueError for an unknown strategy, no layers, channel counts that
    disagree or a group that does not divide them.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    names = ["identity", *_ORDERS] if strategy == "auto" else [strategy]
    region = _region(producers, consumers, spec, bits, group)
    before = _objective(region, np.arange(region.channels))
    best: OrderChoice | None = None
    for name in names:
        permutation = np.arange(region.channels) if name == "identity" else _ORDERS[name](region)
        error = before if name == "identity" else _objective(region, permutation)
        if best is None or error < best.error_after * (1 - MIN_GAIN):
            best = OrderChoice(permutation, name, before, error)
    return best


def _objective(region: _Region, permutation: np.ndarray) -> float:
    """Sum of the layers' relative quantization errors with the channels permuted."""
    layers = [GemmWeight(w[:, permutation], unit) for w, unit in region.producers]
    layers += [GemmWeight(_permute_rows(w, permutation, unit), unit) for w, unit in region.consumers]
    return float(sum(_relative_error(w, unit, region.spec, region.bits) for w, unit in layers))


def _relative_error(w: np.ndarray, unit: int, spec: GridSpec, bits: int) -> float:
    w = w.astype(np.float32)
    energy = float(np.sum(np.square(w, dtype=np.float64)))
    if energy == 0.0:
        return 0.0
    grid = spec.grid(w.shape[0], w.shape[1], unit)
    quantized = uniform_fake_quantize(w, grid.expand(initial_block_steps(w, grid, bits)), bits)
    return float(np.sum(np.square(w - quantized, dtype=np.float64))) / energy


def _permute_rows(w: np.ndarray, permutation: np.ndarray, unit: int) -> np.ndarray:
    rows = (permutation[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    return w[rows]


def _region(
    producers: Sequence[GemmWeight | np.ndarray],
    consumers: Sequence[GemmWeight | np.ndarray],
    spec: GridSpec,
    bits: int,
    group: int | None,
) -> _Region:
    producers = [_gemm(p) for p in producers]
    consumers = [_gemm(c) for c in consumers]
    if not producers and not consumers:
        raise ValueError("a region needs at least one producer or consumer weight")
    counts = {w.shape[1] for w, _ in producers} | {w.shape[0] // unit for w, unit in consumers}
    if len(counts) != 1 or any(w.shape[0] % unit for w, unit in consumers):
        raise ValueError(f"producers and consumers disagree on the channel count: {sorted(counts)}")
    channels = counts.pop()
    group = channels if group is None else group
    if group < 1 or channels % group:
        raise ValueError(f"group {group} does not divide {channels} channels")
    return _Region(producers, consumers, spec, bits, group)


def _gemm(weight: GemmWeight | np.ndarray) -> GemmWeight:
    if isinstance(weight, GemmWeight):
        return weight
    return GemmWeight(np.asarray(weight))


def _within_groups(region: _Region, keys: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Each group's channels (indices ``start .. start + group``) in the order ``keys(indices)`` gives."""
    pieces = []
    for start in range(0, region.channels, region.group):
        indices = np.arange(start, start + region.group)
        pieces.append(indices[keys(indices)])
    return np.concatenate(pieces)


def _producer_ranges(region: _Region) -> np.ndarray:
    ranges = np.zeros(region.channels)
    for w, _ in region.producers:
        ranges = np.maximum(ranges, np.abs(w).max(axis=0))
    return ranges


def _consumer_ranges(region: _Region) -> np.ndarray:
    ranges = np.zeros(region.channels)
    for w, _ in region.consumers:
        ranges = np.maximum(ranges, np.abs(w).reshape(region.channels, -1).max(axis=1))
    return ranges


def _by_producer_range(region: _Region) -> np.ndarray:
    ranges = _producer_ranges(region)
    return _within_groups(region, lambda idx: np.argsort(ranges[idx], kind="stable"))


def _by_consumer_range(region: _Region) -> np.ndarray:
    ranges = _consumer_ranges(region)
    return _within_groups(region, lambda idx: np.argsort(ranges[idx], kind="stable"))


def _by_kmeans(region: _Region) -> np.ndarray:
    """RPTQ's reorder index: cluster (min, max) per channel, clusters by centroid max, then by max inside."""
    features = _channel_features(region)
    clusters = min(max(_output_blocks(region), 1), region.group)

    def order(indices: np.ndarray) -> np.ndarray:
        points = features[indices]
        labels, centroids = _kmeans(points, clusters)
        cluster_rank = np.argsort(np.argsort(centroids[:, 1], kind="stable"), kind="stable")
        return np.lexsort((points[:, 1], cluster_rank[labels]))

    return _within_groups(region, order)


def _channel_features(region: _Region) -> np.ndarray:
    """``[C, 2]``: each channel's (min, max) over the producers' columns, or the consumers' rows without any."""
    if region.producers:
        columns = np.concatenate([w for w, _ in region.producers], axis=0)
        return np.stack([columns.min(axis=0), columns.max(axis=0)], axis=1).astype(np.float64)
    rows = np.concatenate([w.reshape(region.channels, -1) for w, _ in region.consumers], axis=1)
    return np.stack([rows.min(axis=1), rows.max(axis=1)], axis=1).astype(np.float64)


def _output_blocks(region: _Region) -> int:
    """How many channel blocks the grid cuts the region into (producer output blocks, else consumer input)."""
    if region.producers:
        w, unit = region.producers[0]
        return region.spec.grid(w.shape[0], w.shape[1], unit).shape[1]
    w, unit = region.consumers[0]
    return region.spec.grid(w.shape[0], w.shape[1], unit).shape[0]


def _kmeans(points: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on ``points [n, f]`` (``clusters <= n``), deterministic: the initial centroids are the
    points at evenly spaced quantiles of the points sorted by their last feature. Returns (labels, centroids);
    an empty cluster keeps its centroid."""
    ranked = np.argsort(points[:, -1], kind="stable")
    centroids = points[ranked[np.linspace(0, len(points) - 1, clusters).round().astype(int)]].copy()
    labels = np.full(len(points), -1)
    for _ in range(KMEANS_ITERATIONS):
        distances = np.square(points[:, None, :] - centroids[None, :, :]).sum(axis=2)
        new_labels = distances.argmin(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for k in range(clusters):
            if np.any(labels == k):
                centroids[k] = points[labels == k].mean(axis=0)
    return labels, centroids


_ORDERS: dict[str, Callable[[_Region], np.ndarray]] = {
    "producer-range": _by_producer_range,
    "consumer-range": _by_consumer_range,
    "kmeans": _by_kmeans,
}
STRATEGIES = ("auto", *_ORDERS)
"""Strategy names :func:`choose_permutation` accepts."""
