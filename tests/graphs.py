"""Small hand-made ONNX graphs for tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8) if opset <= 17 else model.ir_version
    onnx.checker.check_model(model)
    return model


def batchnorm_parameters(rng: np.random.Generator, prefix: str, channels: int) -> list[onnx.TensorProto]:
    """Scale, bias, mean and variance initializers named ``{prefix}_scale`` etc. (variances positive)."""
    return [
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}_bias"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), f"{prefix}_var"),
    ]


def conv_bn_relu(opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8 ch, bias) -> BatchNorm -> Relu -> Conv(4 ch, no bias) -> BatchNorm -> y."""
    rng = _rng()
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    inits += batchnorm_parameters(rng, "bn1", 8) + batchnorm_parameters(rng, "bn2", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["n1"],
                         name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["y"],
                         name="bn2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
        opset,
    )


def gemm_matmul_bn() -> onnx.ModelProto:
    """x[N,16] -> Gemm(transB, bias) -> BN -> MatMul(const [8,6]) -> BN -> y[N,6]."""
    rng = _rng()
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "wg"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bg"),
        numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "wm"),
    ]
    inits += batchnorm_parameters(rng, "bn1", 8) + batchnorm_parameters(rng, "bn2", 6)
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["g", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["n1"],
                         name="bn1"),
        helper.make_node("MatMul", ["n1", "wm"], ["m"], name="matmul"),
        helper.make_node("BatchNormalization", ["m", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["y"],
                         name="bn2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )


def constant_node_weights(opset: int = 17) -> onnx.ModelProto:
    """Weights held in Constant nodes, a foldable constant expression and a dead branch.

    y = MatMul(x, Constant W) + (Constant a * Constant b); a dead Mul hangs off x.
    """
    rng = _rng()
    w = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="const_w", value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["a"], name="const_a", value_floats=[1.0, 2.0, 3.0, 4.0, 5.0]),
        helper.make_node("Constant", [], ["b"], name="const_b", value_float=0.5),
        helper.make_node("Mul", ["a", "b"], ["ab"], name="fold_me"),
        helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "ab"], ["y"], name="add"),
        helper.make_node("Mul", ["x", "x"], ["dead"], name="dead_mul"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        opset=opset,
    )


def matmul_add_gelu(opset: int = 17) -> onnx.ModelProto:
    """x[N,S,16] -> MatMul W1[16,32] + b1 -> GELU (Erf form) -> MatMul W2[32,8] + b2 -> y."""
    rng = _rng()
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "inv_sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Mul", ["hb", "inv_sqrt2"], ["hs"], name="gelu_scale"),
        helper.make_node("Erf", ["hs"], ["he"], name="gelu_erf"),
        helper.make_node("Add", ["he", "one"], ["h1"], name="gelu_add"),
        helper.make_node("Mul", ["hb", "h1"], ["hm"], name="gelu_mul"),
        helper.make_node("Mul", ["hm", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["y"], name="fc2_bias"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
        inits,
        opset,
    )


def attention_block(opset: int = 17) -> onnx.ModelProto:
    """Single-head self-attention with a boolean mask (Where), shape arithmetic, residual Add and LayerNorm.

    x[N,S,16]; q,k,v = x@W; s = (q @ k^T) * c; p = Softmax(Where(mask, s, -1e4)); o = (p @ v) @ Wo + bo;
    y = LayerNorm(o + x). The mask is x's sequence length compared with itself (shape arithmetic).
    """
    rng = _rng()
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.25, f"w{n}") for n in "qkvo"]
    inits += [
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bo"),
        numpy_helper.from_array(np.array(0.25, np.float32), "c"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "c"], ["ss"], name="scale"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "axis1"], ["seq"], name="seq_len", axis=0),
        helper.make_node("Equal", ["seq", "seq"], ["mask"], name="mask"),
        helper.make_node("Where", ["mask", "ss", "neg"], ["masked"], name="where"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["ob"], name="o_bias"),
        helper.make_node("Add", ["ob", "x"], ["res"], name="residual"),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["y"], name="layernorm", axis=-1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 16])],
        inits,
        opset,
    )


def transformer_block(hidden: int = 32, inner: int = 64) -> onnx.ModelProto:
    """x [N, S, hidden] -> LayerNorm (uneven gamma) -> q, k, v (summed) and a SwiGLU MLP (gate/up -> down), plus
    the residual x: six constant-weight MatMuls, none writing the graph output."""
    rng = np.random.default_rng(3)
    gamma = np.exp(rng.standard_normal(hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
    inits += [_normal(rng, (hidden, hidden), f"w{name}") for name in "qkv"]
    inits += [_normal(rng, (hidden, inner), "wg"), _normal(rng, (hidden, inner), "wu"),
              _normal(rng, (inner, hidden), "wd")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["ln", f"w{name}"], [name], name=f"{name}_proj") for name in "qkv"]
    nodes += [
        helper.make_node("Add", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], ["attn"], name="attn"),
        helper.make_node("MatMul", ["ln", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["ln", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["h"], name="gated"),
        helper.make_node("MatMul", ["h", "wd"], ["down"], name="down_proj"),
        helper.make_node("Add", ["attn", "down"], ["mix"], name="mix"),
        helper.make_node("Add", ["mix", "x"], ["y"], name="residual"),
    ]
    return make_model(nodes, [_float("x", ["N", "S", hidden])], [_float("y", ["N", "S", hidden])], inits)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _float(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
