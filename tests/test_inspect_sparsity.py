"""inspect-sparsity: N:M patterns on each GEMM weight's input axis (float, QDQ, transposed), table, CLI."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.core.sparsity import nm_mask, satisfies_nm
from onnxsmith.optimizer.cli import main
from onnxsmith.analysis.sparsity import WeightSparsity, format_table, inspect_sparsity
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.prune_nm import PruneNM
from onnxsmith.passes.qdq_int8 import QuantizeInt8
from onnxsmith.passes.shape_inference import ShapeInference

RNG = np.random.default_rng(0)


def nm_weight(shape, n, m, axis, dtype=np.float32):
    """A random weight that is n:m sparse along ``axis`` (no zeros elsewhere)."""
    weight = RNG.uniform(0.5, 1.5, shape) * RNG.choice([-1, 1], shape)
    return np.where(nm_mask(RNG.random(shape), n, m, axis), weight, 0).astype(dtype)


def mixed_model():
    """MatMul 2:4, Gemm(transB=1) 4:8 only, MatMul 2:4 on the wrong (output) axis, an activation MatMul, a dense
    Conv, a 2:4 Conv and a grouped 2:4 Conv."""
    gemm = nm_weight((64, 64), 4, 8, axis=1)
    assert not satisfies_nm(gemm, 2, 4, 1)
    weights = {
        "w_mm": nm_weight((64, 64), 2, 4, axis=0),
        "w_gemm": gemm,
        "w_wrong": nm_weight((64, 64), 2, 4, axis=1),
        "w_dense_conv": RNG.standard_normal((16, 16, 3, 3)).astype(np.float32),
        "w_sparse_conv": nm_weight((16, 16, 3, 3), 2, 4, axis=1),
        "w_group_conv": nm_weight((16, 8, 1, 1), 2, 4, axis=1),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm"], ["a"], name="mm_2of4"),
        helper.make_node("Gemm", ["a", "w_gemm"], ["b"], name="gemm_4of8", transB=1),
        helper.make_node("MatMul", ["b", "w_wrong"], ["c"], name="mm_wrong_axis"),
        helper.make_node("MatMul", ["c", "c_t"], ["y"], name="activations"),
        helper.make_node("Conv", ["img", "w_dense_conv"], ["i1"], name="conv_dense", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["i1", "w_sparse_conv"], ["i2"], name="conv_2of4", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["i2", "w_group_conv"], ["z"], name="conv_grouped", group=2),
    ]
    nodes.insert(3, helper.make_node("Transpose", ["c"], ["c_t"], name="transpose"))
    return graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 16, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 5, 5])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mixed.onnx"
    onnx.save(mixed_model(), path)
    return path


def test_patterns_and_axes_per_weight():
    rows = {row.node: row for row in inspect_sparsity(mixed_model())}
    assert list(rows) == ["mm_2of4", "gemm_4of8", "mm_wrong_axis", "conv_dense", "conv_2of4", "conv_grouped"]
    expected = {"mm_2of4": ("MatMul", 0, "2:4"), "gemm_4of8": ("Gemm", 1, "4:8"), "mm_wrong_axis": ("MatMul", 0, None),
                "conv_dense": ("Conv", 1, None), "conv_2of4": ("Conv", 1, "2:4"), "conv_grouped": ("Conv", 1, "2:4")}
    assert {name: (row.op, row.axis, row.pattern) for name, row in rows.items()} == expected
    assert rows["mm_2of4"].zero_fraction == 0.5 and rows["conv_dense"].zero_fraction == 0.0
    assert rows["gemm_4of8"].zero_fraction == 0.5 and rows["gemm_4of8"].weight == "w_gemm"
    assert rows["conv_grouped"].group == 2 and rows["conv_2of4"].group == 1
    assert rows["conv_2of4"].shape == [16, 16, 3, 3] and not rows["mm_2of4"].quantized


def test_pattern_preference_is_the_sparsest_then_the_smaller_group():
    weight = nm_weight((64, 8), 1, 4, axis=0)
    model = graphs.make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(weight, "w")])
    assert inspect_sparsity(model)[0].pattern == "2:4"
    assert inspect_sparsity(model, patterns=((4, 8), (2, 4), (1, 4)))[0].pattern == "1:4"
    assert inspect_sparsity(model, patterns=((4, 8), (2, 8)))[0].pattern == "2:8"
    with pytest.raises(ValueError):
        inspect_sparsity(model, patterns=((4, 4),))


def test_qdq_transposed_and_zero_point_weights_read_the_integers():
    levels = np.where(nm_weight((64, 32), 2, 4, axis=0) != 0, RNG.integers(1, 127, (64, 32)), 0).astype(np.int8)
    tied = nm_weight((32, 64), 2, 4, axis=1)  # read as Transpose -> [64, 32]: input axis 0 is the constant's 1
    zero_point = np.full(32, 128, np.uint8)
    shifted = np.where(levels != 0, 129 + levels.astype(np.int32) // 2, 128).astype(np.uint8)  # 0 -> 128
    inits = {"w_q": levels, "w_scale": np.full(32, 0.01, np.float32), "w_tied": tied,
             "w_u8": shifted, "w_u8_scale": np.full(32, 0.01, np.float32), "w_u8_zp": zero_point}
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], name="dq", axis=1),
        helper.make_node("MatMul", ["x", "w_dq"], ["a"], name="int8_fc"),
        helper.make_node("Transpose", ["w_tied"], ["w_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["b"], name="tied_fc"),
        helper.make_node("DequantizeLinear", ["w_u8", "w_u8_scale", "w_u8_zp"], ["w_u8_dq"], name="dq_u8", axis=1),
        helper.make_node("MatMul", ["x", "w_u8_dq"], ["c"], name="uint8_fc"),
    ]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 32]) for n in "abc"],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()], opset=13)
    rows = {row.node: row for row in inspect_sparsity(model)}
    assert (rows["int8_fc"].pattern, rows["int8_fc"].axis, rows["int8_fc"].quantized) == ("2:4", 0, True)
    assert rows["int8_fc"].weight == "w_q" and rows["int8_fc"].zero_fraction == 0.5
    assert (rows["tied_fc"].pattern, rows["tied_fc"].axis, rows["tied_fc"].shape) == ("2:4", 1, [32, 64])
    assert (rows["uint8_fc"].pattern, rows["uint8_fc"].zero_fraction) == ("2:4", 0.5)


def test_blocked_zero_points_are_repeated_over_their_blocks():
    mask = nm_weight((64, 32), 2, 4, axis=0) != 0
    zero_point = RNG.integers(100, 120, (4, 32)).astype(np.uint8)  # one per block of 16 input channels
    full = np.repeat(zero_point, 16, axis=0)
    levels = np.where(mask, full.astype(np.int32) + RNG.integers(1, 100, (64, 32)), full).astype(np.uint8)
    inits = {"w_q": levels, "w_scale": np.full((4, 32), 0.01, np.float32), "w_zp": zero_point}
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq", axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()], opset=21)
    (row,) = inspect_sparsity(model)
    assert (row.pattern, row.zero_fraction, row.quantized) == ("2:4", 0.5, True)


def test_pruned_then_quantized_model_is_reported_2_of_4():
    model = graphs.matmul_add_gelu()
    feeds = [{"x": RNG.standard_normal((2, 3, 16)).astype(np.float32)} for _ in range(2)]
    passes = [ShapeInference(), PruneNM(min_channels=8), QuantizeInt8()]
    quantized = PassManager(passes, probe_feeds=feeds[:1]).run(model, PassContext(calibration_data=feeds)).model
    rows = inspect_sparsity(quantized)
    assert [(row.node, row.pattern, row.quantized) for row in rows] == [("fc1", "2:4", True), ("fc2", "2:4", True)]


def test_format_table_aligns_columns_and_summarises():
    rows = [WeightSparsity("encoder.layer.0.fc1", "MatMul", "w1", [576, 1536], 0, 0.5, "2:4"),
            WeightSparsity("head", "Gemm", "w2", [10, 576], 1, 0.0, None),
            WeightSparsity("stem", "Conv", "w3", [32, 16, 3, 3], 1, 0.5, "2:4", group=2)]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["node", "op", "shape", "axis", "zeros", "pattern"]
    assert lines[1].split() == ["encoder.layer.0.fc1", "MatMul", "576x1536", "0", "50.0%", "2:4"]
    assert lines[2].split() == ["head", "Gemm", "10x576", "1", "0.0%", "-"]
    assert lines[3].split() == ["stem", "Conv", "g=2", "32x16x3x3", "1", "50.0%", "2:4"]
    assert len({line.index("%") for line in lines[1:4]}) == 1  # right-aligned zeros column
    assert lines[-1] == "2 of 3 GEMM weights are 2:4 sparse on the input axis"
    rows[1].pattern = "4:8"
    assert format_table(rows).splitlines()[-1] == \
        "3 of 3 GEMM weights are N:M sparse on the input axis (2:4: 2, 4:8: 1)"
    assert format_table([]).splitlines()[-1] == "no MatMul/Gemm/Conv with a constant weight found"


def test_cli_prints_the_table(model_file, capsys):
    assert main(["inspect-sparsity", str(model_file)]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:-1]}
    assert table == {"mm_2of4": "2:4", "gemm_4of8": "4:8", "mm_wrong_axis": "-", "conv_dense": "-",
                     "conv_2of4": "2:4", "conv_grouped": "2:4"}
    assert out.splitlines()[-1] == "4 of 6 GEMM weights are N:M sparse on the input axis (2:4: 3, 4:8: 1)"


def test_cli_json_parses(model_file, capsys):
    assert main(["inspect-sparsity", str(model_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(w["node"], w["axis"], w["pattern"]) for w in report["weights"]][:3] == [
        ("mm_2of4", 0, "2:4"), ("gemm_4of8", 1, "4:8"), ("mm_wrong_axis", 0, None)]
    assert report["summary"].startswith("4 of 6 GEMM weights")


@pytest.mark.parametrize(("content", "message"), [(None, "model file not found"),
                                                  (b"garbage" * 20, "not a valid ONNX model")])
def test_cli_bad_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "in.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect-sparsity", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("optimize: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_cli_help_and_main_epilog_mention_the_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect-sparsity", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: optimize inspect-sparsity" in text and "--json" in text and "examples:" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "optimize inspect-sparsity model.onnx" in capsys.readouterr().out
