"""Observers: streaming statistics equal the all-at-once numpy result, with state that does not grow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxsmith.calibration.observers import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

# Float32 batches of different shapes and magnitudes, empty ones included.
BATCHES = st.lists(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0]),
    ),
    min_size=1,
    max_size=8,
)


def _all_values(batches: list[np.ndarray]) -> np.ndarray:
    """All values as float64 (given float32 data and a float range, np.histogram would bin with float32 edges)."""
    return np.concatenate([np.ravel(b) for b in batches]).astype(np.float64)


@settings(max_examples=150, deadline=None)
@given(batches=BATCHES)
def test_minmax_streaming_equals_numpy(batches: list[np.ndarray]) -> None:
    observer = MinMaxObserver()
    for batch in batches:
        observer.observe(batch)
    values = _all_values(batches)
    assert observer.count == values.size
    if values.size == 0:
        assert observer.min is None and observer.max is None
    else:
        assert (observer.min, observer.max) == (values.min(), values.max())


@settings(max_examples=150, deadline=None)
@given(batches=BATCHES, bins=st.sampled_from([2, 4, 6, 10, 64, 2048]))
def test_histogram_streaming_equals_numpy_over_final_range(batches: list[np.ndarray], bins: int) -> None:
    observer = HistogramObserver(bins)
    for batch in batches:
        observer.observe(batch)
    values = _all_values(batches)
    histogram, edges = observer.histogram, observer.edges
    assert histogram.dtype == np.int64 and histogram.shape == (bins,) and edges.shape == (bins + 1,)
    assert histogram.sum() == observer.count == values.size
    np.testing.assert_array_equal(edges, -edges[::-1])
    assert edges[0] == -observer.range_max
    np.testing.assert_array_equal(histogram, np.histogram(values, bins=edges)[0])
    if bins & (bins - 1) == 0:  # float32 data, power-of-two bins: the edges are exactly np.linspace's
        uniform = np.histogram(values, bins=bins, range=(-observer.range_max, observer.range_max))[0]
        np.testing.assert_array_equal(histogram, uniform)
    if values.size:
        amax = np.abs(values).max()
        assert (observer.min, observer.max) == (values.min(), values.max())
        assert amax <= observer.range_max and (amax == 0 or observer.range_max <= 2 * amax)


@settings(max_examples=100, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), min_size=1, max_size=6),
    axis=st.sampled_from([1, -2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_per_channel_streaming_equals_numpy(shapes: list[tuple[int, int]], axis: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batches = [rng.normal(scale=10, size=(rows, 3, cols)).astype(np.float32) for rows, cols in shapes]
    observer = PerChannelMinMaxObserver(axis)
    for batch in batches:
        observer.observe(batch)
    channels = np.concatenate([np.moveaxis(b, 1, 0).reshape(3, -1) for b in batches], axis=1)
    if channels.size == 0:
        assert observer.min is None
    else:
        np.testing.assert_array_equal(observer.min, channels.min(axis=1))
        np.testing.assert_array_equal(observer.max, channels.max(axis=1))
    assert observer.count == channels.size


def test_histogram_doubling_by_hand() -> None:
    observer = HistogramObserver(bins=4)
    observer.observe(np.array([1.0, -1.0, 0.25]))  # R = 1: edges -1, -0.5, 0, 0.5, 1
    np.testing.assert_array_equal(observer.edges, [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_array_equal(observer.histogram, [1, 0, 1, 1])  # 1.0 sits in the closed last bin
    observer.observe(np.array([3.0]))  # R doubles twice: 4, edges -4, -2, 0, 2, 4; 1.0 moves to bin [0, 2)
    assert observer.range_max == 4.0
    np.testing.assert_array_equal(observer.histogram, [0, 1, 2, 1])
    assert (observer.min, observer.max, observer.count) == (-1.0, 3.0, 4)


def test_histogram_zeros_then_data() -> None:
    observer = HistogramObserver(bins=8)
    observer.observe(np.zeros((2, 3), dtype=np.float32))
    assert observer.range_max > 0 and observer.histogram[4] == 6
    observer.observe(np.array([0.5, -3.0]))  # the first non-zero batch sets R = 3 exactly (bin width 0.75)
    assert observer.range_max == 3.0
    np.testing.assert_array_equal(observer.histogram, [1, 0, 0, 0, 7, 0, 0, 0])
    np.testing.assert_array_equal(observer.histogram, np.histogram([0] * 6 + [0.5, -3.0], bins=observer.edges)[0])


@pytest.mark.parametrize(
    "make", [MinMaxObserver, lambda: PerChannelMinMaxObserver(axis=-1), lambda: HistogramObserver(bins=512)]
)
def test_state_does_not_grow_with_samples(make) -> None:
    rng = np.random.default_rng(0)
    observer = make()
    sizes = {}
    for step in range(1, 1001):
        observer.observe(rng.normal(scale=1.01**step, size=(rng.integers(1, 5), 4)))
        if step in (10, 1000):
            sizes[step] = observer.state_bytes()
    assert sizes[10] == sizes[1000]
    assert observer.count > 1000


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "make", [MinMaxObserver, lambda: PerChannelMinMaxObserver(axis=0), lambda: HistogramObserver(bins=16)]
)
def test_non_finite_values_raise_and_leave_state(make, bad: float) -> None:
    observer = make()
    observer.name = "conv1_out"
    observer.observe(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="conv1_out.*NaN or Inf"):
        observer.observe(np.array([0.5, bad]))
    assert observer.count == 2 and float(np.max(observer.max)) == 2.0


def test_empty_arrays_are_ignored() -> None:
    observer = HistogramObserver(bins=16)
    observer.observe(np.zeros((0, 3), dtype=np.float32))
    assert observer.count == 0 and observer.min is None and observer.histogram.sum() == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="even"):
        HistogramObserver(bins=7)
    observer = PerChannelMinMaxObserver(axis=1, name="w")
    observer.observe(np.ones((2, 3)))
    with pytest.raises(ValueError, match="4 channels.*earlier batches had 3"):
        observer.observe(np.ones((2, 4)))
    with pytest.raises(ValueError, match="axis 1 is out of range"):
        observer.observe(np.ones(3))
    with pytest.raises(TypeError, match="real numbers"):
        MinMaxObserver().observe(np.array(["a"]))


def test_reservoir_keeps_everything_until_full_then_a_bounded_uniform_sample():
    from onnxsmith.calibration.observers import ReservoirObserver

    small = ReservoirObserver(capacity=100)
    small.observe(np.arange(60, dtype=np.float32))
    np.testing.assert_array_equal(small.sample, np.arange(60, dtype=np.float32))
    big = ReservoirObserver(capacity=1000)
    before = big.state_bytes()
    for start in range(0, 100_000, 5_000):
        big.observe(np.arange(start, start + 5_000, dtype=np.float32))
    assert big.sample.size == 1000 and big.state_bytes() == before
    assert 35_000 < big.sample.mean() < 65_000  # uniform over 0..99,999, not biased to the first batch
