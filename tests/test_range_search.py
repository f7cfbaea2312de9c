"""Range searches on hand-computed histograms and on distributions whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsmith.calibration.observers import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
from onnxsmith.calibration.qparams import asymmetric_qparams, dequantize, fake_quantize, symmetric_scale
from onnxsmith.calibration.range_search import (
    METHODS,
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
    search_range,
)

RNG = np.random.default_rng(20240611)
GAUSSIAN = RNG.normal(size=1_000_000)
UNIFORM = RNG.uniform(-1, 1, size=1_000_000)


def _histogram(values, bins: int = 2048) -> HistogramObserver:
    observer = HistogramObserver(bins)
    observer.observe(np.asarray(values, dtype=np.float64))
    return observer


def test_minmax() -> None:
    for observer in (MinMaxObserver(), HistogramObserver(16)):
        observer.observe(np.array([-0.5, 2.0]))
        assert minmax_range(observer, symmetric=False) == (-0.5, 2.0)
        assert minmax_range(observer, symmetric=True) == (-2.0, 2.0)
    with pytest.raises(TypeError, match="PerChannelMinMaxObserver"):
        minmax_range(PerChannelMinMaxObserver(0), symmetric=True)
    with pytest.raises(ValueError, match="'x' has observed no data"):
        minmax_range(MinMaxObserver("x"), symmetric=True)


def test_percentile_by_hand() -> None:
    # 8 bins over [-4, 4] (width 1): 1 value in [-4, -3), 9 in [-1, 0), 80 in [0, 1), 10 in [2, 3).
    hist = _histogram([-4.0] + [-0.5] * 9 + [0.5] * 80 + [2.5] * 10, bins=8)
    # |v| folded: [89, 0, 10, 1]; cumulative [89, 89, 99, 100].
    assert percentile_range(hist, 99) == (-3.0, 3.0)
    assert percentile_range(hist, 89) == (-1.0, 1.0)
    assert percentile_range(hist, 100) == (-4.0, 4.0)
    # Tails separately, at most 1 value each side at 99%: -4 is clipped, the ten 2.5s are kept (clamped to max).
    assert percentile_range(hist, 99, symmetric=False) == (-1.0, 2.5)
    assert percentile_range(hist, 90, symmetric=False) == (0.0, 1.0)  # 10 values below 0, 10 above 1
    with pytest.raises(ValueError, match="percentile"):
        percentile_range(hist, 40)


def test_outliers_percentile_clips_minmax_keeps() -> None:
    values = np.concatenate([UNIFORM, [40.0, 50.0, -45.0]])
    hist = _histogram(values)
    assert minmax_range(hist, symmetric=True) == (-50.0, 50.0)
    lo, hi = percentile_range(hist, 99.999)
    assert lo == -hi and 1.0 <= hi < 1.1
    assert np.mean(np.abs(values) <= hi) >= 0.99999
    lo, hi = percentile_range(hist, 99.999, symmetric=False)
    assert values.min() <= lo <= -1.0 and 1.0 <= hi <= values.max() and hi < 1.1
    assert np.sum(values < lo) <= 1e-5 * values.size and np.sum(values > hi) <= 1e-5 * values.size


@pytest.mark.parametrize("search", [entropy_range, mse_range])
def test_uniform_data_keeps_nearly_the_full_range(search) -> None:
    lo, hi = search(_histogram(UNIFORM))
    assert lo == -hi and 0.95 * np.abs(UNIFORM).max() <= hi <= np.abs(UNIFORM).max()


@pytest.mark.parametrize("search", [entropy_range, mse_range])
def test_gaussian_with_a_rare_outlier_clips_it(search) -> None:
    # One outlier in a million: clipping it costs (50 - t)**2 once, keeping it costs every value a 12x coarser
    # step, so MSE clips (a share above 1 / (12 * 127**2) ~ 5e-6 would be worth keeping). Entropy can go no
    # lower than 128 of the 1024 folded bins, 50 / 8 = 6.25.
    hist = _histogram(np.concatenate([GAUSSIAN, [50.0]]))
    lo, hi = search(hist)
    assert lo == -hi and 3.0 < hi < 10.0


def test_entropy_ignores_a_spike_of_zeros() -> None:
    relu = np.maximum(GAUSSIAN, 0.0)  # half the values exactly 0
    _, hi = entropy_range(_histogram(relu))
    assert 3.5 < hi <= relu.max()
    _, hi = entropy_range(_histogram(relu), symmetric=False)
    assert 3.5 < hi <= relu.max()


def _reference_entropy_threshold(folded: np.ndarray, levels: int) -> int:
    """The candidate bin count of entropy_range, written as loops over plain Python numbers."""
    folded = [int(c) for c in folded]
    folded[0] = folded[1]
    best, best_divergence = None, np.inf
    for i in range(levels, len(folded) + 1):
        p = folded[:i]
        p[-1] += sum(folded[i:])
        q = [0.0] * i
        for level in range(levels):
            members = [b for b in range(i) if b * levels // i == level]
            mass = sum(folded[b] for b in members)
            support = [b for b in members if p[b] > 0]
            for b in support:
                q[b] = mass / len(support)
        q = [v if v > 0 else 1e-4 for v in q]
        divergence = sum(pb / sum(p) * np.log((pb / sum(p)) / (qb / sum(q))) for pb, qb in zip(p, q) if pb > 0)
        if divergence < best_divergence:
            best, best_divergence = i, divergence
    return best


@pytest.mark.parametrize("seed", range(5))
def test_entropy_matches_a_plain_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_t(df=3, size=3000) * rng.uniform(0.1, 10)
    hist = _histogram(values, bins=64)
    counts = hist.histogram
    folded = counts[32:] + counts[:32][::-1]
    i = _reference_entropy_threshold(folded, levels=8)
    expected = min(hist.edges[32 + i], np.abs(values).max())
    assert entropy_range(hist, bits=4) == (-expected, expected)


def test_entropy_divergence_by_hand() -> None:
    # bins=8, bits=2 (2 levels): folded counts [5, 4, 0, 1] -> first bin counted as 4: [4, 4, 0, 1].
    # i=2: P=[4, 5], Q=[4, 4]: KL = 4/9 ln(8/9) + 5/9 ln(10/9) = 0.0062.
    # i=3: P=[4, 4, 1], Q=[4, 4, 0 -> 1e-4]: KL ~ 1/9 ln(1/9 / (1e-4/8)) = 0.75.
    # i=4: P=[4, 4, 0, 1], Q=[4, 4, 1e-4, 1]: KL = ln((9 + 1e-4) / 9) ~ 1e-5 -> wins, t = max|v| = 4.
    hist = _histogram([0.5] * 3 + [-0.5] * 2 + [1.5] * 4 + [-4.0], bins=8)
    assert entropy_range(hist, bits=2) == (-4.0, 4.0)
    # bins=16 (width 1), folded [400, 400, 1, 0, 0, 0, 0, 1]: i=2 has P=[400, 402], Q=[400, 400], KL = 3.4e-6;
    # i=3 and i=4 cost 4.8e-4 (the clipped value doubles the last group), wider groups merge 400 with 1 (> 0.1).
    hist = _histogram([0.5] * 400 + [1.5] * 400 + [2.5, -8.0], bins=16)
    assert entropy_range(hist, bits=2) == (-2.0, 2.0)


def test_mse_picks_the_best_candidate_of_true_fake_quantization() -> None:
    values = np.concatenate([RNG.laplace(size=200_000), [30.0]]).astype(np.float32)
    lo, hi = mse_range(_histogram(values), candidates=50)
    amax = float(np.abs(values).max())
    errors = {}
    for k in range(1, 51):
        t = amax * k / 50
        errors[t] = np.mean((fake_quantize(values, symmetric_scale(t), np.int8(0), np.int8) - values) ** 2)
    assert errors[min(errors, key=lambda t: abs(t - hi))] <= 1.01 * min(errors.values())
    assert lo == -hi


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", [-3.0, 0.0, 0.5, 5.0])
def test_asymmetric_ranges_contain_zero_after_qparams(method: str, shift: float) -> None:
    values = RNG.gamma(2.0, size=20_000) + shift  # skewed; all positive for shift >= 0
    hist = _histogram(values, bins=1024)
    lo, hi = search_range(hist, method, symmetric=False)
    assert lo <= hi
    if method != "mse":
        assert values.min() <= lo and hi <= values.max()
    for dtype in (np.uint8, np.int8):
        scale, zero_point = asymmetric_qparams(lo, hi, dtype)
        assert dequantize(zero_point, scale, zero_point) == 0.0
        assert fake_quantize(np.float32(0), scale, zero_point, dtype) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_ranges_stay_within_the_observed_magnitude(method: str) -> None:
    values = RNG.normal(0.3, 2.0, size=20_000)
    lo, hi = search_range(_histogram(values, bins=1024), method, symmetric=True)
    assert lo == -hi and 0 < hi <= np.abs(values).max()


def test_all_zero_data() -> None:
    hist = _histogram(np.zeros(10), bins=512)
    for method in METHODS:
        assert search_range(hist, method) == (0.0, 0.0)


def test_search_range_dispatch() -> None:
    hist = _histogram(np.concatenate([UNIFORM[:10_000], [9.0]]))
    assert search_range(hist, "percentile", percentile=99.9) == percentile_range(hist, 99.9)
    assert search_range(hist, "mse", bits=4, candidates=10) == mse_range(hist, 4, True, 10)
    assert search_range(hist, "entropy", symmetric=False) == entropy_range(hist, symmetric=False)
    minmax = MinMaxObserver()
    minmax.observe(np.array([1.0, 3.0]))
    assert search_range(minmax, "minmax", symmetric=False) == (1.0, 3.0)
    with pytest.raises(ValueError, match="valid methods: minmax, percentile, entropy, mse"):
        search_range(hist, "kl")
    with pytest.raises(TypeError, match="entropy range search needs a HistogramObserver"):
        search_range(minmax, "entropy")
    with pytest.raises(ValueError, match="at least 512 bins"):
        entropy_range(_histogram(np.abs(UNIFORM[:100]), bins=256), bits=8, symmetric=False)  # one-sided: 256 levels
