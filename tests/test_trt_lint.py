"""TensorRT-readiness lint: every rule fires on a graph that breaks it and stays silent on clean graphs."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxsmith.analysis.trt_lint import RULES, Finding, lint_model
from onnxsmith.core.int4 import int4_initializer
from onnxsmith.optimizer.cli import main

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset: int = 21, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _f(name: str, shape: list, elem: int = TP.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _qdq_matmul(*, act_zp=np.int8(0), act_scale=np.float32(0.1), weight: np.ndarray | None = None,
                weight_axis: int = 1, dq_scale=None, extra_nodes=(), opset: int = 17) -> onnx.ModelProto:
    """x [2, 8] -> Q/DQ -> MatMul(DQ(int8 weight [8, 4], per-channel along ``weight_axis``)) -> y."""
    levels = weight if weight is not None else RNG.integers(-100, 100, (8, 4)).astype(np.int8)
    channels = levels.shape[weight_axis]
    inits = [_c("s", act_scale), _c("zp", act_zp), _c("ds", act_scale if dq_scale is None else dq_scale),
             _c("w_q", levels), _c("w_s", np.full(channels, 0.01, np.float32)), _c("w_zp", np.zeros(channels, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "ds", "zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=weight_axis),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"), *extra_nodes]
    return _model(nodes, [_f("x", [2, 8])], [_f("y", [2, levels.shape[1]])], inits, opset=opset)


def _rules(model: onnx.ModelProto, severity: str | None = None) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = {}
    for finding in lint_model(model):
        if severity is None or finding.severity == severity:
            found.setdefault(finding.rule, []).append(finding)
    return found


def _fires(model: onnx.ModelProto, rule: str, node: str, severity: str = "error") -> Finding:
    found = [f for f in lint_model(model) if f.rule == rule]
    assert found, f"{rule} did not fire"
    assert any(f.node == node for f in found), [f.node for f in found]
    finding = next(f for f in found if f.node == node)
    assert finding.severity == severity and finding.fix and finding.message
    return finding


def test_clean_int8_qdq_matmul_is_silent() -> None:
    assert lint_model(_qdq_matmul()) == []


def test_rules_are_documented() -> None:
    assert len(RULES) == 19 and all(RULES.values())


def test_opset_range() -> None:
    _fires(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_f("x", [1])], [_f("y", [1])], opset=7),
           "opset-range", "model")
    _fires(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_f("x", [1])], [_f("y", [1])], opset=25),
           "opset-range", "model", "warning")


def test_custom_domain_names_the_trt_form_for_matmulnbits() -> None:
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], name="nbits", domain="com.microsoft", K=8, N=4,
                            bits=4, block_size=16)
    model = _model([node], [_f("x", [2, 8])], [_f("y", [2, 4])],
                   [_c("b", np.zeros((4, 1, 8), np.uint8)), _c("s", np.ones(4, np.float32))])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert "--target tensorrt" in _fires(model, "custom-domain", "nbits").fix


def test_unsupported_op() -> None:
    model = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [_f("x", [4])], [_f("y", [None])])
    _fires(model, "unsupported-op", "u")


@pytest.mark.parametrize("case", ["topk-unsorted", "topk-k", "reduce-axes", "onehot-depth", "dropout-training",
                                  "layernorm-outputs", "pool-1d", "pool-dilation", "maxpool-indices",
                                  "scatternd-reduction", "constant-string", "unsqueeze-axes"])
def test_op_restrictions(case: str) -> None:
    x4 = _f("x", [1, 2, 8, 8])
    if case == "topk-unsorted":
        model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="n", sorted=0)], [_f("x", [4])],
                       [_f("v", [2]), _f("i", [2], TP.INT64)], [_c("k", np.array([2], np.int64))])
    elif case == "topk-k":
        model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="n")], [_f("x", [4]), _f("k", [1], TP.INT64)],
                       [_f("v", [None]), _f("i", [None], TP.INT64)])
    elif case == "reduce-axes":
        model = _model([helper.make_node("ReduceSum", ["x", "a"], ["y"], name="n")],
                       [_f("x", [2, 3]), _f("a", [1], TP.INT64)], [_f("y", None)], opset=18)
    elif case == "onehot-depth":
        model = _model([helper.make_node("OneHot", ["i", "d", "v"], ["y"], name="n")],
                       [_f("i", [3], TP.INT64), _f("d", [1], TP.INT64)], [_f("y", None)],
                       [_c("v", np.array([0.0, 1.0], np.float32))])
    elif case == "dropout-training":
        model = _model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="n")], [_f("x", [4])], [_f("y", [4])],
                       [_c("r", np.float32(0.5)), _c("t", np.bool_(True))])
    elif case == "layernorm-outputs":
        model = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="n"),
                        helper.make_node("Identity", ["mean"], ["m"], name="id")],
                       [_f("x", [2, 4])], [_f("y", [2, 4]), _f("m", None)], [_c("g", np.ones(4, np.float32))])
    elif case == "pool-1d":
        model = _model([helper.make_node("MaxPool", ["x"], ["y"], name="n", kernel_shape=[2])], [_f("x", [1, 2, 8])],
                       [_f("y", None)])
    elif case == "pool-dilation":
        model = _model([helper.make_node("MaxPool", ["x"], ["y"], name="n", kernel_shape=[2, 2], dilations=[2, 2])],
                       [x4], [_f("y", None)])
    elif case == "maxpool-indices":
        model = _model([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="n", kernel_shape=[2, 2]),
                        helper.make_node("Identity", ["idx"], ["i"], name="id")],
                       [x4], [_f("y", None), _f("i", None, TP.INT64)])
    elif case == "scatternd-reduction":
        model = _model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n", reduction="add")],
                       [_f("x", [4]), _f("i", [1, 1], TP.INT64), _f("u", [1])], [_f("y", [4])])
    elif case == "constant-string":
        model = _model([helper.make_node("Constant", [], ["c"], name="n", value_string="hi"),
                        helper.make_node("Relu", ["x"], ["y"], name="r")], [_f("x", [1])], [_f("y", [1])])
    else:
        model = _model([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                        helper.make_node("Slice", ["s", "z", "o"], ["a"], name="slice"),
                        helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="n")],
                       [_f("x", [1])], [_f("y", None)],
                       [_c("z", np.array([0], np.int64)), _c("o", np.array([1], np.int64))])
        _fires(model, "op-restriction", "n", "warning")
        return
    _fires(model, "op-restriction", "n")


def test_tensor_types() -> None:
    model = _model([helper.make_node("Cast", ["x"], ["u"], name="to_u8", to=TP.UINT8),
                    helper.make_node("Cast", ["u"], ["d"], name="to_f64", to=TP.DOUBLE),
                    helper.make_node("Cast", ["d"], ["y"], name="back", to=TP.FLOAT)],
                   [_f("x", [4]), _f("s", [1], TP.STRING)], [_f("y", [4])])
    _fires(model, "tensor-type", "u")
    _fires(model, "tensor-type", "d", "warning")
    _fires(model, "tensor-type", "s")
    assert not [f for f in lint_model(model) if f.node in ("x", "y")]  # float I/O is fine


def test_uint8_activation_qdq_names_the_int8_fix() -> None:
    model = _qdq_matmul(act_zp=np.uint8(128))
    assert "--act-dtype int8" in _fires(model, "qdq-type", "q").fix
    _fires(model, "qdq-zero-point", "dq")


def test_nonzero_int8_zero_point_and_bad_scales() -> None:
    _fires(_qdq_matmul(act_zp=np.int8(3)), "qdq-zero-point", "q")
    _fires(_qdq_matmul(act_scale=np.float32(0.0)), "qdq-scale", "q")
    model = _qdq_matmul()
    model.graph.node[0].input[1] = "x_scale"
    model.graph.input.append(_f("x_scale", []))
    _fires(model, "qdq-scale", "q")


def test_granularity_of_activations_and_weights() -> None:
    model = _qdq_matmul(act_scale=np.full(8, 0.1, np.float32), act_zp=np.zeros(8, np.int8))
    for node in model.graph.node[:2]:
        node.attribute.append(helper.make_attribute("axis", 1))
    _fires(model, "qdq-granularity", "q")
    _fires(_qdq_matmul(weight_axis=0), "qdq-granularity", "w_dq")  # scales along K, not the output channels
    assert "qdq-granularity" not in _rules(_qdq_matmul(weight_axis=1))


def _int4_matmul(*, block: int = 64, k: int = 128, n: int = 8, scale_dtype=np.float32, act=TP.FLOAT,
                 opset: int = 21, rank3: bool = False) -> onnx.ModelProto:
    levels = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    weight = int4_initializer("w_q", levels.reshape(1, k, n) if rank3 else levels)
    scales = np.full(((1,) if rank3 else ()) + (k // block, n), 0.01, scale_dtype)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w_dq", axis=-2, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, [_f("x", [2, k], act)], [_f("y", None, act)], [weight, _c("w_s", scales)], opset=opset)


def test_clean_int4_weight_only_is_silent() -> None:
    assert lint_model(_int4_matmul()) == []


@pytest.mark.parametrize("case, text", [("block", "block size 32"), ("rank", "rank 3"), ("odd", "odd last dim"),
                                         ("opset", "opset 21"), ("dtype", "differs from the activations")])
def test_int4_rules(case: str, text: str) -> None:
    model = {"block": lambda: _int4_matmul(block=32), "rank": lambda: _int4_matmul(rank3=True),
             "odd": lambda: _int4_matmul(n=7), "opset": lambda: _int4_matmul(opset=20),
             "dtype": lambda: _int4_matmul(act=TP.FLOAT16)}[case]()
    found = [f for f in lint_model(model) if f.rule == "qdq-blocked" and f.node == "w_dq"]
    assert any(text in f.message for f in found), [f.message for f in found]


def test_blocked_int8_is_refused() -> None:
    levels = RNG.integers(-100, 100, (128, 8)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w_dq", axis=0, block_size=64),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [_f("x", [2, 128])], [_f("y", None)],
                   [_c("w_q", levels), _c("w_s", np.full((2, 8), 0.01, np.float32))])
    assert "INT4 weights only" in _fires(model, "qdq-blocked", "w_dq").message


def test_int4_activation_quantization() -> None:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q4"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq4")]
    zero = onnx.helper.make_tensor("zp", TP.INT4, [], [0])
    model = _model(nodes, [_f("x", [4])], [_f("y", [4])], [_c("s", np.float32(0.1)), zero])
    _fires(model, "int4-activation", "q4")


def test_orphan_quantize_and_dangling_dequantize() -> None:
    orphan = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], name="q")], [_f("x", [4])],
                    [_f("y", [4], TP.INT8)], [_c("s", np.float32(0.1)), _c("zp", np.int8(0))])
    _fires(orphan, "orphan-quantize", "q")
    dangling = _model([helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], name="dq")],
                      [_f("x", [4], TP.INT8)], [_f("y", [4])], [_c("s", np.float32(0.1)), _c("zp", np.int8(0))])
    _fires(dangling, "dangling-dequantize", "dq")


def test_qdq_pair_mismatch() -> None:
    _fires(_qdq_matmul(dq_scale=np.float32(0.2)), "qdq-pair-mismatch", "dq", "warning")


def test_gemm_with_one_quantized_input() -> None:
    model = _qdq_matmul()
    model.graph.node[3].input[0] = "x"  # the MatMul reads the float input, the weight stays int8
    _fires(model, "gemm-partial-qdq", "mm", "warning")
    assert "gemm-partial-qdq" not in _rules(_int4_matmul())  # INT4 weight-only is a TensorRT mode


def test_batchnorm_after_quantized_conv() -> None:
    inits = [_c("s", np.float32(0.1)), _c("zp", np.int8(0)), _c("w_q", RNG.integers(-9, 9, (4, 2, 3, 3)).astype(np.int8)),
             _c("w_s", np.full(4, 0.01, np.float32)), _c("w_zp", np.zeros(4, np.int8))]
    inits += [_c(n, np.ones(4, np.float32)) for n in ("g", "b", "m", "v")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=0),
             helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    model = _model(nodes, [_f("x", [1, 2, 8, 8])], [_f("y", None)], inits, opset=17)
    _fires(model, "unfused-batchnorm", "bn", "warning")


def _two_four(k: int, n: int, axis: int) -> np.ndarray:
    weight = RNG.integers(1, 100, (k, n)).astype(np.int8)
    moved = np.moveaxis(weight, axis, 0)
    moved[1::4] = 0
    moved[2::4] = 0
    return weight


def test_two_four_along_the_wrong_axis() -> None:
    _fires(_qdq_matmul(weight=_two_four(8, 4, axis=1)), "sparse-axis", "mm", "warning")
    assert "sparse-axis" not in _rules(_qdq_matmul(weight=_two_four(8, 4, axis=0)))


def test_sparse_int8_gemm_needs_a_quantized_output() -> None:
    model = _qdq_matmul(weight=_two_four(8, 4, axis=0))
    _fires(model, "sparse-int8-output", "mm", "warning")
    quantized_out = _qdq_matmul(weight=_two_four(8, 4, axis=0), extra_nodes=[
        helper.make_node("QuantizeLinear", ["y", "s", "zp"], ["yq"], name="oq"),
        helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["z"], name="odq")])
    quantized_out.graph.output[0].name = "z"
    assert "sparse-int8-output" not in _rules(quantized_out)


def test_sparse_matmul_form_is_an_info_hint() -> None:
    model = _qdq_matmul(weight=_two_four(8, 4, axis=0))
    assert "1x1 Conv" in _fires(model, "sparse-matmul-form", "mm", "info").fix


def test_every_rule_is_exercised_here() -> None:
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    assert all(f'"{rule}"' in source for rule in RULES)


def test_lint_does_not_modify_the_model() -> None:
    model = _qdq_matmul(act_zp=np.uint8(128))
    before = model.SerializeToString()
    lint_model(model)
    assert model.SerializeToString() == before


def test_cli_lint_trt_exit_codes_and_json(tmp_path, capsys) -> None:
    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(_qdq_matmul(), clean)
    onnx.save(_qdq_matmul(act_zp=np.uint8(128)), broken)
    assert main(["lint-trt", str(clean)]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out
    assert main(["lint-trt", str(broken), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["error"] >= 2 and {"severity", "rule", "node", "message", "fix"} <= set(data["findings"][0])
    assert main(["lint-trt", str(tmp_path / "missing.onnx")]) == 2


def test_engine_without_tensorrt_is_exit_2_before_any_work(tmp_path, capsys) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the build path is exercised by test_tensorrt_builder")
    source = tmp_path / "m.onnx"
    onnx.save(_qdq_matmul(), source)
    output = tmp_path / "out.onnx"
    assert main([str(source), "-o", str(output), "--engine", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and len(err.strip().splitlines()) == 1
    assert not output.exists() and not (tmp_path / "m.plan").exists()
