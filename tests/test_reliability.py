"""Reliability of the ``optimize`` command: bad input is one line and exit 2, files are never damaged.

Complements test_cli.py / test_model_io.py / test_readers.py / test_recipes.py, which cover missing, empty and
garbage model files, calibration errors at the reader level and recipe errors at the loader level.
"""

import io
import os
import zipfile

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

import graphs
from onnxsmith.core.errors import UserError
from onnxsmith.core import model_io
from onnxsmith.optimizer.cli import main
from onnxsmith.core.model_io import load_model, save_model
from onnxsmith.passes.fold_batchnorm import FoldBatchNorm


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    """The stderr of a failed run, checked to be exactly one ``optimize: error:`` line without a trace."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    prefix = "optimize: error: " if expected_code == 2 else "optimize: pass failed: "
    assert err.startswith(prefix) and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(graphs.conv_bn_relu(), path)
    return path


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00" + bytes(range(256))


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", graphs.conv_bn_relu().SerializeToString())
    return buffer.getvalue()


def _truncated(fraction: float) -> bytes:
    data = graphs.conv_bn_relu().SerializeToString()
    return data[: int(len(data) * fraction)]


BAD_FILES = {
    "truncated-half": lambda: _truncated(0.5),
    "truncated-tail": lambda: _truncated(0.997),  # parses, but the opset import is cut off
    "png": _png,
    "text": lambda: b"name,value\nweight,1.0\n" * 8,
    "zip": _zip,
}


@pytest.mark.parametrize("command", [[], ["lint-trt"], ["inspect-sparsity"]], ids=["optimize", "lint", "inspect"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_non_onnx_and_corrupt_files_are_exit_2(tmp_path, capsys, command, kind):
    path = tmp_path / "in.onnx"
    path.write_bytes(BAD_FILES[kind]())
    err = one_line_error(capsys, main([*command, str(path)]))
    assert "not a valid ONNX model" in err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_every_truncation_point_is_exit_2(tmp_path, capsys):
    data = graphs.conv_bn_relu().SerializeToString()
    path = tmp_path / "in.onnx"
    for cut in range(1, len(data), 37):
        path.write_bytes(data[:cut])
        one_line_error(capsys, main([str(path), "--dry-run"]))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.ones((2, 3, 8, 8), np.float32)}, "unexpected ['pixels']"),
        ({"x": np.ones((2, 3, 4, 4), np.float32)}, "size 4 on axis 2, the model expects 8"),
        ({"x": np.ones((2, 8, 8), np.float32)}, "expects rank 4"),
        ({"x": np.ones((2, 3, 8, 8), np.float64)}, "has dtype float64, the model expects float32"),
        ({"x": np.ones((2, 3, 8, 8), np.int64)}, "has dtype int64"),
        ({"x": np.full((2, 3, 8, 8), np.nan, np.float32)}, "contains NaN or Inf"),
        ({"x": np.full((2, 3, 8, 8), -np.inf, np.float32)}, "contains NaN or Inf"),
        ({"x": np.ones((2, 3, 0, 8), np.float32)}, "has size 0 on axis 2"),
        ({"x": np.ones((0, 3, 8, 8), np.float32)}, "no calibration samples"),
    ],
    ids=["name", "shape", "rank", "float64", "int64", "nan", "inf", "empty-axis", "no-samples"],
)
@pytest.mark.parametrize("recipe", ["cleanup", "w8a8"])
def test_bad_calibration_data_is_exit_2(model_file, tmp_path, capsys, arrays, message, recipe):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)
    err = one_line_error(capsys, main([str(model_file), "--recipe", recipe, "--calib", str(calib),
                                       "-o", str(tmp_path / "out.onnx")]))
    assert message in err
    assert not (tmp_path / "out.onnx").exists()


def test_empty_calibration_folder_is_exit_2(model_file, tmp_path, capsys):
    (tmp_path / "calib").mkdir()
    err = one_line_error(capsys, main([str(model_file), "--recipe", "w8a8", "--calib", str(tmp_path / "calib")]))
    assert "no calibration samples" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('passes = ["shape-inference"]\nspeed = "max"\n', "unknown keys ['speed']"),
        ('passes = ["constant-folding"]\n[options.constant-folding]\nsize_treshold = 8\n',
         "pass 'constant-folding': no option 'size_treshold'; options: size_threshold"),
        ('passes = ["int8-qdq"]\n[options.int8-qdq]\nact_dtype = "uint8"\nbits = 4\n', "pass 'int8-qdq': no option 'bits'; options:"),
    ],
    ids=["top-level", "pass-option", "quantizer-option"],
)
def test_recipe_file_with_unknown_keys_is_exit_2(model_file, tmp_path, capsys, text, message):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(text)
    err = one_line_error(capsys, main([str(model_file), "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")]))
    assert message in err


def test_output_in_a_missing_folder_is_exit_2(model_file, tmp_path, capsys):
    err = one_line_error(capsys, main([str(model_file), "-o", str(tmp_path / "no" / "such" / "out.onnx"), "-q"]))
    assert "output folder does not exist" in err
    assert not (tmp_path / "no").exists()


def test_missing_output_folder_is_refused_before_any_work(model_file, tmp_path, capsys):
    """Checked before calibration data is even read (a long run must not end in this error)."""
    err = one_line_error(capsys, main([str(model_file), "--recipe", "w8a8", "--calib", str(tmp_path / "nope.npz"),
                                       "-o", str(tmp_path / "no" / "out.onnx"), "-q"]))
    assert "output folder does not exist" in err


# --- external data ---------------------------------------------------------------------------------------------


def write_external_model(folder, name: str = "ext.onnx", location: str = "ext.bin"):
    """conv_bn_relu saved with every tensor of >= 64 bytes in ``location`` beside it; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(graphs.conv_bn_relu(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=64)
    assert (folder / location).exists()
    return path


def set_locations(path, location: str) -> None:
    """Point every external tensor of the model file at ``path`` to ``location`` (without reading the data)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def no_external_reads(monkeypatch):
    """Fail the test if onnx reads any external tensor."""
    def refuse(*args, **kwargs):
        raise AssertionError("external data was read")

    for name in ("load_external_data_for_model", "load_external_data_for_tensor", "_read_external_data_bytes"):
        monkeypatch.setattr(external_data_helper, name, refuse)


@pytest.mark.parametrize("command", [[], ["lint-trt"], ["inspect-sparsity"]], ids=["optimize", "lint", "inspect"])
@pytest.mark.parametrize("where", ["parent", "absolute", "deep-parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_before_reading(tmp_path, capsys, no_external_reads,
                                                                            command, where):
    path = write_external_model(tmp_path / "model")
    secret = tmp_path / "secret.bin"
    os.replace(tmp_path / "model" / "ext.bin", secret)  # valid data, so only the location check can refuse it
    location = {"parent": "../secret.bin", "absolute": str(secret), "deep-parent": "sub/../../secret.bin",
                "symlink": "link.bin"}[where]
    if where == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(secret)
    set_locations(path, location)
    err = one_line_error(capsys, main([*command, str(path)]))
    assert "refusing external data of tensor 'w1'" in err and repr(location) in err and "outside" in err
    assert sorted(os.listdir(tmp_path / "model")) == sorted(["ext.onnx"] + (["link.bin"] if where == "symlink" else []))


def test_external_data_in_a_subfolder_is_allowed(tmp_path):
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    path = write_external_model(folder)
    os.replace(folder / "ext.bin", folder / "weights" / "ext.bin")
    set_locations(path, "weights/ext.bin")
    weight = onnx.numpy_helper.to_array(load_model(path).graph.initializer[0])
    np.testing.assert_array_equal(weight, onnx.numpy_helper.to_array(graphs.conv_bn_relu().graph.initializer[0]))


@pytest.mark.parametrize("command", [[], ["lint-trt"], ["inspect-sparsity"]], ids=["optimize", "lint", "inspect"])
def test_missing_external_data_file_is_exit_2(tmp_path, capsys, command):
    path = write_external_model(tmp_path)
    (tmp_path / "ext.bin").unlink()
    err = one_line_error(capsys, main([*command, str(path)]))
    assert "external data of ext.onnx is missing: ext.bin" in err


def test_truncated_external_data_file_is_exit_2(tmp_path, capsys):
    path = write_external_model(tmp_path)
    data = (tmp_path / "ext.bin").read_bytes()
    (tmp_path / "ext.bin").write_bytes(data[: len(data) // 2])
    err = one_line_error(capsys, main([str(path), "-o", str(tmp_path / "o.onnx")]))
    assert "external data" in err
    assert not (tmp_path / "o.onnx").exists()


# --- the input is never touched, outputs are atomic, no temporary files ----------------------------------------


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("recipe", ["w8a8", "sparse24"])
def test_input_and_its_external_data_are_never_modified(tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    path = write_external_model(tmp_path / "in")
    before = snapshot(tmp_path / "in")
    assert main([str(path), "--recipe", recipe, "-o", str(tmp_path / "out" / "o.onnx"), "-q"]) == 2  # no out/
    (tmp_path / "out").mkdir()
    assert main([str(path), "--recipe", recipe, "-o", str(tmp_path / "out" / "o.onnx"), "--evaluate", "-q"]) == 0
    assert snapshot(tmp_path / "in") == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # nothing left in the working directory
    assert os.listdir(tmp_path / "out") == ["o.onnx"]


def test_default_output_beside_the_input_leaves_only_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(graphs.conv_bn_relu(), tmp_path / "net.onnx")
    before = snapshot(tmp_path)
    assert main(["net.onnx", "--recipe", "w8a8", "--report", "rep", "-q"]) == 0
    after = snapshot(tmp_path)
    assert after["net.onnx"] == before["net.onnx"]
    assert sorted(after) == ["net.onnx", "net.opt.onnx", "rep/report.html", "rep/report.json", "rep/report.md"]


def test_a_failing_pass_leaves_no_files(tmp_path, monkeypatch, capsys):
    def broken(self, model, context):
        raise RuntimeError("simulated pass bug")

    monkeypatch.setattr(FoldBatchNorm, "run", broken)
    monkeypatch.chdir(tmp_path)
    onnx.save(graphs.conv_bn_relu(), tmp_path / "net.onnx")
    before = snapshot(tmp_path)
    err = one_line_error(capsys, main(["net.onnx", "-o", "out.onnx", "-q"]), expected_code=1)
    assert "fold-batchnorm" in err and "simulated pass bug" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_a_failure_while_saving_leaves_no_partial_output(tmp_path, monkeypatch, external):
    if external:
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
        monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 100)
    target = tmp_path / "out.onnx"
    save_model(graphs.conv_bn_relu(), target)  # an earlier good output, which must survive
    before = snapshot(tmp_path)
    real_write = model_io._write

    def write_then_fail(model, path, data_name=None):
        real_write(model, path, data_name)
        path.write_bytes(path.read_bytes()[:10])  # half-written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "_write", write_then_fail)
    changed = graphs.conv_bn_relu()
    changed.graph.name = "changed"
    with pytest.raises(OSError, match="No space left"):
        save_model(changed, target)
    assert snapshot(tmp_path) == before
    assert load_model(target).graph.name == "test"


def test_save_leaves_no_temporary_files_in_the_output_folder_or_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 100)
    save_model(graphs.conv_bn_relu(), "big.onnx")
    model_io.check_model(load_model("big.onnx"))  # goes through a temporary file outside the cwd
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_load_model_user_error_names_the_tensor(tmp_path):
    path = write_external_model(tmp_path / "m")
    set_locations(path, "../../etc/passwd")
    with pytest.raises(UserError, match=r"tensor 'w1' at '\.\./\.\./etc/passwd'"):
        load_model(path)
