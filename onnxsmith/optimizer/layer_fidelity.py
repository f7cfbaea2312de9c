"""Per-layer fidelity: the SQNR of every activation a quantized model quantizes.

A quantized input is a tensor ``V`` read by a compute node and produced by a chain of quantization nodes
(``QuantizeLinear``, ``DequantizeLinear``, ``Clip``, ``Less``, ``Where``) holding at least one activation
``DequantizeLinear``, whose root ``T`` is a tensor of the reference model: a QDQ pair, a k-bit ``Clip -> Q -> DQ``,
a twin-uniform ``Where`` of two branches. The two parts of a dual-GEMM twin split (chains sharing one ``Less``)
count as one input, their sum. The quantized model runs once per feed with ``T`` and ``V`` as extra outputs, and
the SQNR is ``10 log10(sum T^2 / sum (V - T)^2)``: only that input's quantization noise, on the activations the
quantized model actually sees. Inputs are named by ``T``, or ``T (node)`` when layers quantize ``T`` separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from tqdm import tqdm

from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.collection import with_outputs
from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.core.feeds import Feed

CHAIN_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip", "Less", "Where"})
HISTOGRAM_TENSORS = 32
"""At most this many activation histograms (worst SQNR first) are kept."""
HISTOGRAM_BINS = 64
"""Bins of each activation histogram (before trimming empty ends)."""


def quantized_inputs(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, tuple[str, list[str]]]:
    """``{label: (root T, [visible tensors summed into the input])}`` for every quantized input (see module)."""
    producers = {out: node for node in quantized.graph.node for out in node.output}
    initializers = {t.name for t in quantized.graph.initializer}
    originals = {out for node in reference.graph.node for out in node.output} | {i.name for i in reference.graph.input}
    groups: dict[tuple[str, tuple[str, ...]], tuple[list[str], str]] = {}
    for node in quantized.graph.node:
        if node.op_type in CHAIN_OPS:
            continue
        for name in node.input:
            if name in originals:
                continue
            chain = _chain(name, producers, initializers, originals)
            if chain is None:
                continue
            root, splits = chain
            visible, consumer = groups.setdefault((root, splits or (name,)), ([], node.name))
            if name not in visible:
                visible.append(name)
    per_root: dict[str, int] = {}
    for root, _ in groups:
        per_root[root] = per_root.get(root, 0) + 1
    return {
        (root if per_root[root] == 1 else f"{root} ({consumer})"): (root, visible)
        for (root, _), (visible, consumer) in groups.items()
    }


def _chain(
    name: str, producers: dict[str, onnx.NodeProto], initializers: set[str], originals: set[str]
) -> tuple[str, tuple[str, ...]] | None:
    """``(root, names of the Less nodes on the way)`` when ``name`` is made by inserted quantization nodes, with
    an activation DequantizeLinear, from exactly one reference tensor; None otherwise."""
    roots: set[str] = set()
    splits: set[str] = set()
    activation_dq = False
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in originals:
            roots.add(tensor)
            continue
        if tensor in initializers:
            continue
        node = producers.get(tensor)
        if node is None or node.op_type not in CHAIN_OPS:
            return None
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Less":
            splits.add(node.name)
        if node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            activation_dq = True
        stack += [i for i in (node.input if node.op_type == "Where" else node.input[:1]) if i]
    if not activation_dq or len(roots) != 1:
        return None
    return roots.pop(), tuple(sorted(splits))


def activation_sqnr(
    reference: onnx.ModelProto, quantized: onnx.ModelProto, feeds: Sequence[Feed], *, progress: bool = True
) -> dict[str, float]:
    """SQNR (dB) of each quantized input over ``feeds``, keyed as :func:`quantized_inputs`; empty if none."""
    return activation_fidelity(reference, quantized, feeds, progress=progress, histograms=0)[0]


def activation_fidelity(
    reference: onnx.ModelProto, quantized: onnx.ModelProto, feeds: Sequence[Feed], *, progress: bool = True,
    histograms: int = HISTOGRAM_TENSORS, bins: int = HISTOGRAM_BINS,
) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """:func:`activation_sqnr` plus a ``bins``-bin histogram of the values of at most ``histograms`` root tensors
    ``T`` (those of the worst SQNR first), ``{T: {"edges": [bins + 1 floats], "counts": [bins ints]}}``.

    The counts are exact over all ``feeds``: the bins are equal and their range grows by doubling
    (:class:`GrowingHistogram`); empty bins at both ends are trimmed, so fewer than ``bins`` may remain.
    """
    inputs = quantized_inputs(reference, quantized)
    if not inputs:
        return {}, {}
    names = sorted({root for root, _ in inputs.values()} | {v for _, vs in inputs.values() for v in vs})
    session = create_session(with_outputs(quantized, names))
    signal = dict.fromkeys(inputs, 0.0)
    noise = dict.fromkeys(inputs, 0.0)
    roots = sorted({root for root, _ in inputs.values()}) if histograms > 0 else []
    grown = {root: GrowingHistogram(bins) for root in roots}
    for feed in tqdm(feeds, desc="layer SQNR", unit="batch", leave=False, disable=None if progress else True):
        values = run_session(session, feed, names)
        for label, (root, visible) in inputs.items():
            t = values[root].astype(np.float64)
            v = sum(values[name].astype(np.float64) for name in visible)
            signal[label] += float(np.sum(t * t))
            noise[label] += float(np.sum((v - t) ** 2))
        for root, histogram in grown.items():
            histogram.add(values[root])
    sqnr = {label: sqnr_db(signal[label], noise[label]) for label in inputs}
    worst: dict[str, float] = {}
    for label, (root, _) in inputs.items():
        worst[root] = min(worst.get(root, np.inf), sqnr[label])
    chosen = sorted(grown, key=lambda root: (worst[root], root))[:histograms]
    return sqnr, {root: grown[root].as_dict() for root in chosen if grown[root].total}


class GrowingHistogram:
    """An exact histogram of equal bins over a range that doubles (merging bin pairs) to fit new values.

    It counts in ``FINE * bins`` bins: the first finite values set the range ``[low, low + FINE * bins * width)``;
    a value outside it doubles ``width`` (keeping ``low``, or moving it down by the old span) until every value
    fits. :meth:`as_dict` trims empty bins at both ends and merges runs of fine bins into at most ``bins``. Non-finite
    values are not counted.
    """

    FINE = 16

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.fine = self.FINE * bins
        self.counts = np.zeros(self.fine, dtype=np.int64)
        self.low = 0.0
        self.width = 0.0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.width == 0.0:
            span = hi - lo
            self.low = lo
            self.width = (span if span > 0 else max(abs(lo), 1.0) * 1e-3) / (self.fine - 1)
        while lo < self.low or hi >= self.low + self.fine * self.width:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(self.fine, dtype=np.int64)
            if lo < self.low:  # grow downwards: the old bins become the upper half
                self.counts[self.fine // 2:] = merged
                self.low -= self.fine * self.width
            else:
                self.counts[: self.fine // 2] = merged
            self.width *= 2.0
        index = np.minimum(((x - self.low) / self.width).astype(np.int64), self.fine - 1)
        self.counts += np.bincount(index, minlength=self.fine)

    def as_dict(self) -> dict[str, list]:
        """``{"edges": [...], "counts": [...]}``: at most ``bins`` equal bins over the non-empty range."""
        nonzero = np.flatnonzero(self.counts)
        first, last = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, self.fine)
        group = -(-(last - first) // self.bins)
        last = min(first + group * -(-(last - first) // group), self.fine)
        counts = np.add.reduceat(self.counts[first:last], np.arange(0, last - first, group))
        edges = self.low + self.width * np.append(np.arange(first, last, group), last)
        return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
