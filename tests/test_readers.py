"""Calibration data readers: every source form, and a clear one-line error for each kind of bad data."""

import logging

import numpy as np
import onnx
import pytest

import graphs
from onnxsmith.calibration.readers import load_calibration, random_calibration
from onnxsmith.core.errors import UserError

MODEL = graphs.matmul_add_gelu()  # input x: float32 [N, S, 16]


def x(batch=1, seq=5, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((batch, seq, 16)).astype(dtype)


def test_npz_samples_become_batch_1_feeds(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=x(batch=3))
    feeds = load_calibration(path, MODEL)
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 5, 16)


def test_folder_of_npz_and_npy_files_with_varying_sequence_lengths(tmp_path):
    np.savez(tmp_path / "a.npz", x=x(seq=3))
    np.save(tmp_path / "b.npy", x(seq=9))
    feeds = load_calibration(tmp_path, MODEL)
    assert [f["x"].shape[1] for f in feeds] == [3, 9]


def test_a_negative_dimension_is_free_as_paddle2onnx_writes_it():
    model = onnx.ModelProto()
    model.CopyFrom(MODEL)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert load_calibration([{"x": x(batch=1)}, {"x": x(batch=3)}], model)[1]["x"].shape == (3, 5, 16)


def test_iterable_of_feeds():
    feeds = load_calibration(({"x": x(seq=s)} for s in (2, 4)), MODEL)
    assert len(feeds) == 2


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"pixels": x()}, r"missing \['x'\], unexpected \['pixels'\]"),
        ({"x": x(dtype=np.float64)}, "has dtype float64, the model expects float32"),
        ({"x": x()[0]}, "expects rank 3"),
        ({"x": np.ones((1, 5, 8), np.float32)}, "size 8 on axis 2, the model expects 16"),
        ({"x": np.full((1, 5, 16), np.nan, np.float32)}, "contains NaN or Inf"),
        ({"x": np.full((1, 5, 16), np.inf, np.float32)}, "contains NaN or Inf"),
        ({"x": np.ones((1, 0, 16), np.float32)}, "is empty"),
        ({"x": [[1.0]]}, "expected a numpy array"),
    ],
)
def test_bad_feeds_are_one_line_errors(feed, message):
    with pytest.raises(UserError, match=message) as info:
        load_calibration([feed], MODEL)
    assert "\n" not in str(info.value) and "sample 0" in str(info.value)


def test_an_empty_input_beside_a_filled_one_is_accepted():
    """A KV-cache model's prefill feed: tokens plus an empty past."""
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Concat", ["past", "x"], ["y"], axis=1)], "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, n, 4]) for n in ("past", "x")],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "total", 4])]))
    for name in ("past", "x"):
        model.graph.input[("past", "x").index(name)].type.tensor_type.shape.dim[1].dim_param = name
    prefill = {"past": np.zeros((1, 0, 4), np.float32), "x": np.ones((1, 3, 4), np.float32)}
    assert len(load_calibration([prefill], model)) == 1
    with pytest.raises(UserError, match="input 'past' is empty"):
        load_calibration([{"past": np.zeros((1, 0, 4), np.float32), "x": np.zeros((1, 0, 4), np.float32)}], model)


def test_empty_sources_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="holds no calibration samples"):
        load_calibration([], MODEL)
    with pytest.raises(UserError, match="calibration data not found"):
        load_calibration(tmp_path / "nope.npz", MODEL)
    (tmp_path / "data.txt").write_text("1 2 3")
    with pytest.raises(UserError, match="expected .npz"):
        load_calibration(tmp_path / "data.txt", MODEL)
    (tmp_path / "broken.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(UserError, match="cannot read calibration data broken.npz"):
        load_calibration(tmp_path / "broken.npz", MODEL)


def test_npz_with_different_sample_counts(tmp_path):
    model = graphs.attention_block()
    path = tmp_path / "c.npz"
    np.savez(path, x=x(batch=2), extra=x(batch=3))
    with pytest.raises(UserError, match="unexpected \\['extra'\\]"):
        load_calibration(path, model)


def test_random_fallback_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        feeds = random_calibration(MODEL, count=3)
    assert len(feeds) == 3 and "NO CALIBRATION DATA" in caplog.text
