"""Hypothesis strategies for random *valid* ONNX models (``onnx.checker`` and onnxruntime both accept them).

A model is a chain of blocks over one float32 activation that lives in one of three layouts:

- ``image`` ``[B, C, H, W]``: Conv (bias or not, kernel 1 or 3, padding or not), Conv -> BatchNormalization,
  residual Conv + Add, per-channel Add/Mul, activations; leaves through Reshape/Transpose (to ``seq``) or
  Flatten (to ``flat``);
- ``seq`` ``[B, S, D]``: MatMul (+ bias Add), residual MatMul + Add, LayerNormalization (opset >= 17), Softmax,
  GELU in its Erf form, attention (``softmax(q @ k^T * s) @ v``, one head in 3-D or several heads through
  Reshape/Transpose); leaves through Flatten (fixed S) or ReduceMean (to ``flat``);
- ``flat`` ``[B, D]``: Gemm (transB 0/1, bias or not, alpha/beta), MatMul, BatchNormalization, LayerNormalization,
  Softmax, activations.

Every weight is drawn as an initializer or a Constant node; the opset comes from {13, 17, 19, 21}; the batch
dimension is symbolic or fixed; channel sizes are sometimes multiples of 4/8/16/32 (2:4 sparsity, INT4 blocks)
and sometimes not (passes must skip them cleanly). Sometimes a weight is tied (reused by a later layer of the
same weight shape, possibly in another role, e.g. MatMul and Gemm transB), a Conv output feeds both a BatchNorm and
an Add (unfoldable), an opset-13 model lists its initializers as graph inputs too, Constant nodes use
``value_float``, and the graph has a dead node, a foldable constant expression and a second output. Graphs stay small (widths <= 32, <= 8 blocks) so one case runs in ~0.1 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSETS = (13, 17, 19, 21)
IR_FOR_OPSET = {13: 7, 17: 8, 19: 9, 21: 10}
WIDTHS = (3, 4, 5, 6, 8, 12, 16, 24, 32)
"""Channel / hidden sizes: multiples of 4, 8, 16 and 32 (sparsity, INT4 blocks) and odd sizes (skips)."""

Dim = int | str


@dataclass
class FuzzModel:
    """A generated model and how it was built (for failure messages)."""

    model: onnx.ModelProto
    blocks: list[str]
    opset: int

    def __repr__(self) -> str:
        return f"FuzzModel(opset={self.opset}, blocks={self.blocks}, nodes={len(self.model.graph.node)})"


@dataclass
class _Builder:
    draw: st.DrawFn
    opset: int
    rng: np.random.Generator
    const_share: float
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0
    blocks: list[str] = field(default_factory=list)
    weights: dict[tuple[int, ...], str] = field(default_factory=dict)

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"n_{op.lower()}"), **attrs))
        return out

    def tensor(self, array: np.ndarray, prefix: str) -> str:
        """A constant as an initializer or (drawn) a Constant node."""
        name = self.fresh(prefix)
        value = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.rng.random() < self.const_share:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_const"), value=value))
        else:
            self.inits.append(value)
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, prefix: str = "w") -> str:
        """A fresh weight, or (drawn) one an earlier layer already uses when the shape matches (tied weights)."""
        if shape in self.weights and self.draw(st.integers(0, 3)) == 0:
            self.blocks.append("tied")
            return self.weights[shape]
        values = (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        self.weights[shape] = self.tensor(values, prefix)
        return self.weights[shape]

    def vector(self, size: int, prefix: str, low: float | None = None, high: float | None = None) -> str:
        if low is None:
            values = self.rng.standard_normal(size) * 0.5
        else:
            values = self.rng.uniform(low, high, size)
        return self.tensor(values.astype(np.float32), prefix)

    def scalar(self, value: float, prefix: str = "s") -> str:
        if self.rng.random() < self.const_share / 2:  # the value_float form of Constant
            name = self.fresh(prefix)
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_const"), value_float=value))
            return name
        return self.tensor(np.array(value, np.float32), prefix)

    def ints(self, values: list[int], prefix: str = "shape") -> str:
        return self.tensor(np.array(values, np.int64), prefix)

    # elementwise pieces shared by every layout -------------------------------------------------------------
    def activation(self, x: str) -> str:
        kind = self.draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "gelu"]))
        self.blocks.append(kind.lower())
        if kind != "gelu":
            return self.node(kind, [x])
        scaled = self.node("Mul", [x, self.scalar(float(1 / np.sqrt(2)))])
        erf = self.node("Erf", [scaled])
        plus = self.node("Add", [erf, self.scalar(1.0)])
        return self.node("Mul", [self.node("Mul", [x, plus]), self.scalar(0.5)])

    def batchnorm(self, x: str, channels: int) -> str:
        params = [self.vector(channels, "bn_scale", 0.5, 2.0), self.vector(channels, "bn_bias"),
                  self.vector(channels, "bn_mean"), self.vector(channels, "bn_var", 0.5, 2.0)]
        eps = self.draw(st.sampled_from([1e-5, 1e-3]))
        return self.node("BatchNormalization", [x, *params], epsilon=eps)

    def layernorm(self, x: str, width: int) -> str:
        gamma = self.vector(width, "gamma", 0.5, 2.0)
        beta = self.vector(width, "beta")
        return self.node("LayerNormalization", [x, gamma, beta], axis=-1)


def _width(draw: st.DrawFn, aligned_only: bool = False) -> int:
    return draw(st.sampled_from((4, 8, 16, 32) if aligned_only else WIDTHS))


def _image_block(b: _Builder, x: str, shape: list[Dim]) -> tuple[str, list[Dim], str]:
    """One block on ``[B, C, H, W]``; returns the new tensor, its shape and its layout."""
    draw = b.draw
    channels, height = shape[1], shape[2]
    kind = draw(st.sampled_from(["conv", "conv", "conv_bn", "residual", "act", "channel_affine", "to_seq",
                                 "to_flat", "bn_branch"]))
    if kind in ("conv", "conv_bn"):
        out_channels = _width(draw)
        kernel = draw(st.sampled_from([1, 3]))
        pad = 1 if kernel == 3 and (height < 4 or draw(st.booleans())) else 0
        inputs = [x, b.weight((out_channels, channels, kernel, kernel), channels * kernel * kernel)]
        if draw(st.booleans()):
            inputs.append(b.vector(out_channels, "bias"))
        attrs = {"kernel_shape": [kernel, kernel]}
        if pad:
            attrs["pads"] = [pad] * 4
        y = b.node("Conv", inputs, **attrs)
        b.blocks.append(f"conv{kernel}x{kernel}{'p' if pad else ''}->{out_channels}")
        size = height - kernel + 1 + 2 * pad
        if kind == "conv_bn":
            y = b.batchnorm(y, out_channels)
            b.blocks.append("bn")
        return y, [shape[0], out_channels, size, size], "image"
    if kind == "bn_branch":  # the Conv output feeds the BatchNorm and an Add: the BN cannot be folded away
        y = b.node("Conv", [x, b.weight((channels, channels, 1, 1), channels)], kernel_shape=[1, 1])
        b.blocks.append("conv-bn-branch")
        return b.node("Add", [b.batchnorm(y, channels), y]), shape, "image"
    if kind == "residual":
        y = b.node("Conv", [x, b.weight((channels, channels, 3, 3), channels * 9), b.vector(channels, "bias")],
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        b.blocks.append("residual-conv")
        return b.node("Add", [x, b.activation(y)]), shape, "image"
    if kind == "act":
        return b.activation(x), shape, "image"
    if kind == "channel_affine":
        op = draw(st.sampled_from(["Add", "Mul"]))
        b.blocks.append(f"channel-{op.lower()}")
        const = b.tensor((b.rng.uniform(0.5, 1.5, (channels, 1, 1))).astype(np.float32), "affine")
        return b.node(op, [x, const]), shape, "image"
    if kind == "to_seq":
        b.blocks.append("reshape-transpose")
        flat = b.node("Reshape", [x, b.ints([0, channels, -1])])
        return b.node("Transpose", [flat], perm=[0, 2, 1]), [shape[0], height * height, channels], "seq"
    b.blocks.append("flatten")
    if draw(st.booleans()):
        pooled = b.node("GlobalAveragePool", [x])
        return b.node("Flatten", [pooled], axis=1), [shape[0], channels], "flat"
    return b.node("Flatten", [x], axis=1), [shape[0], channels * height * height], "flat"


def _linear(b: _Builder, x: str, width: int, out: int, bias: bool) -> str:
    y = b.node("MatMul", [x, b.weight((width, out), width)])
    if bias:
        y = b.node("Add", [y, b.vector(out, "bias")])
    return y


def _attention(b: _Builder, x: str, shape: list[Dim]) -> tuple[str, list[Dim]]:
    draw = b.draw
    width = shape[2]
    head_choices = [h for h in (1, 2, 4) if width % h == 0 and width // h >= 2]
    heads = draw(st.sampled_from(head_choices))
    q, k, v = (_linear(b, x, width, width, draw(st.booleans())) for _ in range(3))
    scale = b.scalar(float(1 / np.sqrt(width // heads)))
    if heads == 1:
        scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 2, 1])])
        probs = b.node("Softmax", [b.node("Mul", [scores, scale])], axis=-1)
        ctx = b.node("MatMul", [probs, v])
    else:
        split = b.ints([0, 0, heads, width // heads])
        qh = b.node("Transpose", [b.node("Reshape", [q, split])], perm=[0, 2, 1, 3])
        kh = b.node("Transpose", [b.node("Reshape", [k, split])], perm=[0, 2, 3, 1])
        vh = b.node("Transpose", [b.node("Reshape", [v, split])], perm=[0, 2, 1, 3])
        probs = b.node("Softmax", [b.node("Mul", [b.node("MatMul", [qh, kh]), scale])], axis=-1)
        merged = b.node("Transpose", [b.node("MatMul", [probs, vh])], perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [merged, b.ints([0, 0, width])])
    b.blocks.append(f"attention-h{heads}")
    if draw(st.booleans()):
        ctx = b.node("Add", [x, _linear(b, ctx, width, width, True)])
        b.blocks.append("residual")
    return ctx, shape


def _seq_block(b: _Builder, x: str, shape: list[Dim]) -> tuple[str, list[Dim], str]:
    draw = b.draw
    width = shape[2]
    kinds = ["linear", "linear", "residual", "act", "softmax", "attention", "affine", "to_flat"]
    if b.opset >= 17:
        kinds.append("layernorm")
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        out = _width(draw)
        b.blocks.append(f"matmul->{out}")
        return _linear(b, x, width, out, draw(st.booleans())), [shape[0], shape[1], out], "seq"
    if kind == "residual":
        inner = _width(draw)
        b.blocks.append(f"residual-mlp-{inner}")
        h = b.activation(_linear(b, x, width, inner, draw(st.booleans())))
        return b.node("Add", [x, _linear(b, h, inner, width, draw(st.booleans()))]), shape, "seq"
    if kind == "act":
        return b.activation(x), shape, "seq"
    if kind == "softmax":
        b.blocks.append("softmax")
        return b.node("Softmax", [x], axis=-1), shape, "seq"
    if kind == "layernorm":
        b.blocks.append("layernorm")
        return b.layernorm(x, width), shape, "seq"
    if kind == "attention":
        y, shape = _attention(b, x, shape)
        return y, shape, "seq"
    if kind == "affine":
        op = draw(st.sampled_from(["Add", "Mul"]))
        b.blocks.append(op.lower())
        return b.node(op, [x, b.vector(width, "affine", 0.5, 1.5)]), shape, "seq"
    if isinstance(shape[1], int) and draw(st.booleans()):
        b.blocks.append("flatten")
        return b.node("Flatten", [x], axis=1), [shape[0], shape[1] * width], "flat"
    b.blocks.append("reducemean")
    if b.opset >= 18:
        y = b.node("ReduceMean", [x, b.ints([1], "axes")], keepdims=0)
    else:
        y = b.node("ReduceMean", [x], axes=[1], keepdims=0)
    return y, [shape[0], width], "flat"


def _flat_block(b: _Builder, x: str, shape: list[Dim]) -> tuple[str, list[Dim], str]:
    draw = b.draw
    width = shape[1]
    kinds = ["gemm", "gemm", "matmul", "bn", "act", "softmax", "affine"]
    if b.opset >= 17:
        kinds.append("layernorm")
    kind = draw(st.sampled_from(kinds))
    if kind == "gemm":
        out = _width(draw)
        trans_b = draw(st.integers(0, 1))
        w_shape = (out, width) if trans_b else (width, out)
        inputs = [x, b.weight(w_shape, width)]
        attrs: dict = {"transB": trans_b} if trans_b or draw(st.booleans()) else {}
        if draw(st.booleans()):
            bias_shape = draw(st.sampled_from([(out,), (out,), (1, out), (1,)]))
            inputs.append(b.tensor(b.rng.standard_normal(bias_shape).astype(np.float32), "bias"))
            if draw(st.booleans()):
                attrs["beta"] = 0.5
        if draw(st.booleans()):
            attrs["alpha"] = 2.0
        b.blocks.append(f"gemm{'T' if trans_b else ''}->{out}")
        return b.node("Gemm", inputs, **attrs), [shape[0], out], "flat"
    if kind == "matmul":
        out = _width(draw)
        b.blocks.append(f"matmul->{out}")
        return _linear(b, x, width, out, draw(st.booleans())), [shape[0], out], "flat"
    if kind == "bn":
        b.blocks.append("bn")
        return b.batchnorm(x, width), shape, "flat"
    if kind == "act":
        return b.activation(x), shape, "flat"
    if kind == "softmax":
        b.blocks.append("softmax")
        return b.node("Softmax", [x], axis=-1), shape, "flat"
    if kind == "layernorm":
        b.blocks.append("layernorm")
        return b.layernorm(x, width), shape, "flat"
    op = draw(st.sampled_from(["Add", "Mul"]))
    b.blocks.append(op.lower())
    return b.node(op, [x, b.vector(width, "affine", 0.5, 1.5)]), shape, "flat"


_BLOCKS = {"image": _image_block, "seq": _seq_block, "flat": _flat_block}


@st.composite
def fuzz_models(draw: st.DrawFn, max_blocks: int = 8, opsets: tuple[int, ...] = OPSETS,
                layouts: tuple[str, ...] = ("image", "seq", "flat")) -> FuzzModel:
    """A random valid float32 model (see the module docstring), checked with ``onnx.checker`` (full check)."""
    opset = draw(st.sampled_from(opsets))
    layout = draw(st.sampled_from(layouts))
    seed = draw(st.integers(0, 2**32 - 1))
    const_share = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
    b = _Builder(draw, opset, np.random.default_rng(seed), const_share)
    batch: Dim = draw(st.sampled_from(["N", 1, 2]))
    if layout == "image":
        size = draw(st.sampled_from([3, 4, 5]))
        shape: list[Dim] = [batch, draw(st.sampled_from([3, 4, 8])), size, size]
    elif layout == "seq":
        shape = [batch, draw(st.sampled_from(["S", 3, 4])), _width(draw)]
    else:
        shape = [batch, _width(draw)]
    x = "x"
    graph_inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)]
    b.blocks.append(f"{layout}{shape}")
    extra_outputs = []
    n_blocks = draw(st.integers(1, max_blocks))
    for i in range(n_blocks):
        x, shape, layout = _BLOCKS[layout](b, x, shape)
        if i < n_blocks - 1 and not extra_outputs and draw(st.integers(0, 9)) == 0:
            extra_outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, shape))
            b.blocks.append("extra-output")
    if draw(st.integers(0, 3)) == 0:  # a constant expression constant folding can evaluate
        folded = b.node("Mul", [b.scalar(1.5), b.scalar(2.0)])
        x = b.node("Add", [x, folded])
        b.blocks.append("foldable")
    if draw(st.integers(0, 3)) == 0:  # a dead branch
        b.node("Mul", ["x", "x"])
        b.blocks.append("dead")
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape), *extra_outputs]
    if b.inits and opset == 13 and draw(st.integers(0, 4)) == 0:  # old exporters list initializers as inputs too
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits]
        b.blocks.append("initializers-as-inputs")
    graph = helper.make_graph(b.nodes, "fuzz", graph_inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    return FuzzModel(model, b.blocks, opset)
