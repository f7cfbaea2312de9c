import os

import numpy as np
import onnx
import pytest

import graphs
from onnxsmith.core.errors import UserError
from onnxsmith.core import model_io
from onnxsmith.core.model_io import load_model, save_model


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out.onnx"
    save_model(graphs.conv_bn_relu(), target)
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert load_model(target).graph.node[0].op_type == "Conv"


def test_save_into_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="output folder does not exist"):
        save_model(graphs.conv_bn_relu(), tmp_path / "missing" / "out.onnx")


def test_large_models_get_external_data_beside_them(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 100)
    target = tmp_path / "big.onnx"
    save_model(graphs.conv_bn_relu(), target)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    reloaded = load_model(target)
    weight = onnx.numpy_helper.to_array(reloaded.graph.initializer[0])
    assert weight.shape == (8, 3, 3, 3)
    np.testing.assert_array_equal(weight, onnx.numpy_helper.to_array(graphs.conv_bn_relu().graph.initializer[0]))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "model file is empty"), (b"\x00\xffnot a protobuf at all" * 10, "not a valid ONNX model")],
)
def test_bad_model_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        load_model(tmp_path / "nope.onnx")
