"""Range searches: turn observer statistics into a clipping range ``(lo, hi)`` for b-bit quantization.

Every search returns Python floats with ``lo <= hi``. Symmetric searches return ``(-t, t)``; asymmetric ones
return a range inside the observed ``[min, max]`` except :func:`mse_range`, whose asymmetric candidates already
include 0 (see there). Ranges are turned into ``QuantizeLinear`` parameters by :mod:`~onnxsmith.calibration.qparams`,
which extends asymmetric ranges to include 0.
"""

from __future__ import annotations

import numpy as np

from onnxsmith.calibration.observers import HistogramObserver, MinMaxObserver, Observer

Range = tuple[float, float]


def minmax_range(observer: MinMaxObserver | HistogramObserver, symmetric: bool) -> Range:
    """The observed range: ``(min, max)``, or ``(-a, a)`` with ``a = max(|min|, |max|)`` when symmetric."""
    if not isinstance(observer, (MinMaxObserver, HistogramObserver)):
        raise TypeError(f"minmax_range needs a MinMaxObserver or HistogramObserver, got {type(observer).__name__}")
    low, high = _observed(observer)
    if symmetric:
        amax = max(-low, high)
        return -amax, amax
    return low, high


def percentile_range(hist: HistogramObserver, percentile: float = 99.999, symmetric: bool = True) -> Range:
    """Clip the rarest ``100 - percentile`` percent of the values, at histogram-bin resolution.

    Symmetric: ``(-t, t)`` where ``t`` is the upper edge of the bin of ``|v|`` (the histogram folded around 0)
    at which the cumulative count reaches ``percentile`` percent, so at least that share of the values has
    ``|v| <= t``. Asymmetric: at most ``100 - percentile`` percent of the values lie below ``lo`` and at most as
    many above ``hi`` (each tail separately, ``lo`` and ``hi`` on bin edges). Both are clamped to the observed
    min/max, so the range never exceeds :func:`minmax_range`. ``percentile`` must be in ``(50, 100]``.
    """
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    low, high = _observed(hist)
    if symmetric:
        folded = _folded(hist)
        cumulative = np.cumsum(folded)
        index = int(np.searchsorted(cumulative, percentile / 100 * cumulative[-1], side="left"))
        amax = min(_folded_edge(hist, index + 1), max(-low, high))
        return -amax, amax
    counts, edges = hist.histogram, hist.edges
    allowed = (100 - percentile) / 100 * counts.sum()
    below = np.concatenate([[0], np.cumsum(counts)])  # below[k]: values under edges[k]
    above = below[-1] - below  # above[k]: values at or over edges[k], for k < bins
    lo_index = int(np.flatnonzero(below <= allowed)[-1])
    hi_index = int(np.argmax(above <= allowed))
    return max(float(edges[lo_index]), low), min(float(edges[hi_index]), high)


def entropy_range(hist: HistogramObserver, bits: int = 8, symmetric: bool = True) -> Range:
    """The threshold ``t`` whose ``bits``-bit quantization loses least information (minimum KL divergence).

    Reference: the calibration of NVIDIA's "8-bit Inference with TensorRT" (Migacz, GTC 2017), run on the
    histogram of ``|v|`` (folded around 0), with onnxruntime's ``get_entropy_threshold`` details where the
    slides are silent. For every candidate ``i`` from ``levels`` to the number of folded bins: P is the first
    ``i`` bins with the clipped tail (bins ``i`` and up) added to the last one; Q is the same ``i`` bins
    *without* the tail, merged into ``levels`` groups and spread back evenly over the bins where P is non-zero
    (zero bins stay zero). ``t`` is the upper edge of bin ``i - 1`` for the ``i`` minimising KL(P||Q) (the
    smallest on ties), capped at ``max|v|``. Q is built from the unclipped bins, not from P, as in the
    reference: quantizing P itself would make the first candidate always win (Q == P there).

    Details that differ from onnxruntime: groups are split evenly (their sizes differ by at most one bin) and
    the first folded bin counts as much as the second, both as NVIDIA's pytorch-quantization
    (``_compute_amax_entropy``) does; the latter stops a spike of exact zeros (ReLU outputs), which every grid
    represents exactly, from dragging ``t`` down. Q is kept in floats (onnxruntime truncates it to integers),
    and only Q is smoothed: each of its empty bins gets ``1e-4`` counts, as onnxruntime's
    ``smooth_distribution`` gives them (P's empty bins add nothing to the divergence).

    ``levels`` is ``2**(bits-1)``: a symmetric grid spends half its levels on each sign. Asymmetric: ``levels`` is
    ``2**bits`` when all values share one sign (the asymmetric grid then spends every level on that side), else
    ``2**(bits-1)``; the result is ``(max(min, -t), min(max, t))``. The histogram needs ``bins >= 2 * levels``.
    """
    low, high = _observed(hist)
    levels = 2**bits if not symmetric and (low >= 0 or high <= 0) else 2 ** (bits - 1)
    if hist.bins < 2 * levels:
        raise ValueError(f"entropy_range with {levels} levels needs a histogram of at least {2 * levels} bins")
    if low == high == 0:
        return 0.0, 0.0
    folded = _folded(hist)
    folded[0] = folded[1]
    tails = np.concatenate([np.cumsum(folded[::-1])[::-1], [0]])  # tails[i]: count in folded bins i and above
    divergences = [_clipping_divergence(folded[:i], int(tails[i]), levels) for i in range(levels, folded.size + 1)]
    amax = min(_folded_edge(hist, levels + int(np.argmin(divergences))), max(-low, high))
    return (-amax, amax) if symmetric else (max(low, -amax), min(high, amax))


def mse_range(hist: HistogramObserver, bits: int = 8, symmetric: bool = True, candidates: int = 100) -> Range:
    """The candidate range with the least expected squared error of ``bits``-bit fake quantization.

    The error (rounding inside the range, clipping outside it) is integrated exactly over the histogram, taking
    each bin's values as spread uniformly over the bin. Integrating, rather than evaluating at bin centres,
    keeps the estimate right when the quantization step is as small as a bin (centres would alias with the grid).

    Symmetric candidates are ``t_k = max|v| * k / candidates`` for ``k = 1..candidates``, quantized on
    ``2**(bits-1) - 1`` levels per side (ONNX int8 with zero point 0); the result is ``(-t, t)``. Asymmetric
    candidates shrink both ends of ``(lo, hi) = (min(min, 0), max(max, 0))`` together, ``(lo * k / candidates,
    hi * k / candidates)``, quantized like :func:`~onnxsmith.calibration.qparams.asymmetric_qparams` does
    (``2**bits`` levels, integer zero point); the result contains 0. Ties go to the smallest candidate.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    low, high = _observed(hist)
    if low == high == 0:
        return 0.0, 0.0
    if symmetric:
        low, high = minmax_range(hist, symmetric=True)
    else:
        low, high = min(low, 0.0), max(high, 0.0)
    counts, edges = hist.histogram, hist.edges
    nonzero = counts > 0
    bins = (edges[:-1][nonzero], edges[1:][nonzero], counts[nonzero])
    shrinks = np.arange(1, candidates + 1) / candidates
    errors = [_quantization_error(*bins, *_grid(low * k, high * k, bits, symmetric)) for k in shrinks]
    best = float(shrinks[int(np.argmin(errors))])
    return low * best, high * best


METHODS = ("minmax", "percentile", "entropy", "mse")


def search_range(observer: Observer, method: str, bits: int = 8, symmetric: bool = True, **kwargs: float) -> Range:
    """Run the range search ``method`` (one of :data:`METHODS`) on ``observer``.

    ``kwargs`` go to the search (``percentile`` for "percentile", ``candidates`` for "mse"); ``bits`` is unused by
    "minmax" and "percentile". "minmax" takes a MinMaxObserver or HistogramObserver, the others a
    HistogramObserver; another observer is a TypeError, an unknown method a ValueError.
    """
    if method == "minmax":
        return minmax_range(observer, symmetric, **kwargs)
    if method not in METHODS:
        raise ValueError(f"unknown range search {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(observer, HistogramObserver):
        raise TypeError(f"the {method} range search needs a HistogramObserver, got {type(observer).__name__}")
    if method == "percentile":
        return percentile_range(observer, symmetric=symmetric, **kwargs)
    search = entropy_range if method == "entropy" else mse_range
    return search(observer, bits, symmetric, **kwargs)


def _observed(observer: MinMaxObserver | HistogramObserver) -> Range:
    if observer.min is None:
        raise ValueError(f"{type(observer).__name__} {observer.name!r} has observed no data")
    return observer.min, observer.max


def _folded_edge(hist: HistogramObserver, index: int) -> float:
    """Edge ``index`` of the folded histogram (edge 0 is 0, the last is ``R``)."""
    return float(hist.edges[hist.bins // 2 + index])


def _folded(hist: HistogramObserver) -> np.ndarray:
    """Counts of ``|v|``: folded bin ``i`` holds histogram bins ``bins/2 + i`` and ``bins/2 - 1 - i``."""
    counts = hist.histogram
    half = hist.bins // 2
    return counts[half:] + counts[:half][::-1]


def _clipping_divergence(bins: np.ndarray, clipped: int, levels: int) -> float:
    """KL(P||Q) for the candidate keeping ``bins`` (``clipped`` more values lie beyond them); see entropy_range."""
    size = bins.size
    reference = bins.astype(np.float64)
    reference[-1] += clipped
    group = np.arange(size) * levels // size
    support = reference > 0
    mass = np.bincount(group, weights=bins, minlength=levels)
    members = np.bincount(group[support], minlength=levels)
    spread = mass[group[support]] / members[group[support]]
    candidate = np.where(spread > 0, spread, 1e-4)
    p = reference[support] / reference.sum()
    q = candidate / (candidate.sum() + 1e-4 * (size - support.sum()))
    return float(np.sum(p * np.log(p / q)))


def _grid(low: float, high: float, bits: int, symmetric: bool) -> tuple[float, int, int]:
    """Step and integer level range ``(step, kmin, kmax)``: the grid is ``step * k`` for ``kmin <= k <= kmax``."""
    if symmetric:
        levels = 2 ** (bits - 1) - 1
        return high / levels, -levels, levels
    qmax = 2**bits - 1
    step = (high - low) / qmax
    zero_point = int(np.clip(np.round(-low / step), 0, qmax))
    return step, -zero_point, qmax - zero_point


def _quantization_error(
    starts: np.ndarray, ends: np.ndarray, counts: np.ndarray, step: float, kmin: int, kmax: int
) -> float:
    """Expected total squared error of rounding to ``step * clip(round(v / step), kmin, kmax)``.

    Each bin ``[start, end)`` holds ``count`` values spread uniformly; the error is integrated exactly.
    """
    bottom, top = (kmin - 0.5) * step, (kmax + 0.5) * step
    low_part = _clipped_integral(starts, np.minimum(ends, bottom), kmin * step)
    high_part = _clipped_integral(np.maximum(starts, top), ends, kmax * step)
    inner_start, inner_end = np.clip(starts, bottom, top), np.clip(ends, bottom, top)
    inner = _rounding_antiderivative(inner_end, step) - _rounding_antiderivative(inner_start, step)
    return float(np.sum(counts * (low_part + high_part + inner) / (ends - starts)))


def _clipped_integral(starts: np.ndarray, ends: np.ndarray, value: float) -> np.ndarray:
    """``integral of (v - value)**2`` over ``[start, end]``, 0 where the interval is empty."""
    ends = np.maximum(starts, ends)
    return ((ends - value) ** 3 - (starts - value) ** 3) / 3


def _rounding_antiderivative(v: np.ndarray, step: float) -> np.ndarray:
    """An antiderivative of ``(v - step * round(v / step))**2``: whole periods add ``step**3 / 12`` each."""
    shifted = v / step + 0.5
    periods = np.floor(shifted)
    phase = shifted - periods - 0.5
    return step**3 * (periods / 12 + (phase**3 + 0.125) / 3)
