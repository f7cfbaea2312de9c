"""Lossless: constant-weight MatMul/Gemm as a 1x1 Conv, the form TensorRT's 2:4 sparse kernels pick.

TensorRT's structured-sparsity tactics (``--sparsity=enable``) are usually chosen for Convolution layers, not for
MatMul/FullyConnected; NVIDIA's BERT demo therefore builds every fully connected layer as a 1x1 convolution. This
pass writes the same shape:

``x [..., K] -> Reshape [-1, K, 1, 1] -> Conv(W' [N, K, 1, 1], bias [N]) -> Reshape [..., N]``

``W'`` is the GEMM weight with its output channels first (MatMul ``[K, N]`` transposed; Gemm ``transB=1``
as it is, ``transB=0`` transposed) and Gemm's ``alpha`` folded in; the bias is Gemm's ``beta * C`` (``C``
must be per output channel: ``[N]``, ``[1, N]`` or a scalar). The weight keeps its dtype (float32, float16), so
a weight that is N:M sparse on its input axis (MatMul axis 0, Gemm axis 1 with ``transB=1`` else 0) is N:M
sparse on the Conv's input axis 1. The final Reshape writes the node's original output tensor (graph outputs
and consumers are untouched); its shape is ``Concat(Slice(Shape(x), 0, -1), [N])`` at run time, or a
constant when every leading dimension of ``x`` is a known integer.

Eligible: ``MatMul`` with a constant 2-D weight (input 1) and an activation of rank >= 2 (or of unknown
rank); ``Gemm`` with a constant 2-D ``B``, ``transA=0``, any ``transB``/``alpha``/``beta`` and an absent or
constant per-output-channel ``C``. With ``only_sparse`` (default) the weight must also be ``n:m`` sparse on
its input axis; ``exclude_regex`` keeps matching node names as they are. Every other MatMul/Gemm is reported
as skipped with the reason.

Run it after ``prune-nm`` and before quantization: with INT8, ``int8-qdq`` with ``sparse_outputs=True`` adds the
Q/DQ pair on the sparse Conv's output (recipe ``esparse24-w8a8``). Use it for TensorRT engines only: on onnxruntime's CPU the Conv form is about 2.4x slower than the
MatMul it replaces. A float32 ``[2048, 576] x [576, 1536]`` GEMM, onnxruntime 1.32, 2 vCPUs (AMD EPYC), all
graph optimizations; the median of 20 runs after 3 warm-ups, over 12 repeats of the command below: MatMul
48 ms (44-52, one outlier at 78), 1x1 Conv 118 ms (106-129)::

    python - <<'PY'
    import statistics, time, numpy as np
    from onnx import TensorProto, helper as h, numpy_helper
    from onnxsmith.backends.onnxruntime import create_session
    from onnxsmith.core.pass_base import PassContext
    from onnxsmith.passes.sparse_conv import SparseGemmToConv
    w = numpy_helper.from_array(np.random.rand(576, 1536).astype(np.float32), "w")
    io = [h.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [2048, 576]), ("y", [2048, 1536]))]
    mm = h.make_model(h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", io[:1], io[1:], [w]))
    x = {"x": np.random.rand(2048, 576).astype(np.float32)}
    conv = SparseGemmToConv(only_sparse=False).run(mm, PassContext()).model
    for label, model in (("MatMul", mm), ("1x1 Conv", conv)):
        session, times = create_session(model), []
        for _ in range(23):
            start = time.perf_counter(); session.run(None, x); times.append(time.perf_counter() - start)
        print(label, f"{statistics.median(times[3:]) * 1e3:.1f} ms")
    PY
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.sparsity import check_pattern, satisfies_nm
from onnxsmith.core.options import PassOptions, check_patterns, option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult, Tolerance
from onnxsmith.core.graph import export_graph, import_graph, unique_name
from onnxsmith.analysis.weights import weight_input_axis


@dataclass(frozen=True)
class SparseGemmToConvOptions(PassOptions):
    n: int = option(2, "the N:M pattern a weight must satisfy: n of every m", minimum=1)
    m: int = option(4, "the N:M pattern's group size", minimum=2)
    only_sparse: bool = option(True, "rewrite only GEMMs whose weight is N:M sparse (false: every eligible GEMM)")
    exclude_regex: tuple[str, ...] = option((), "node-name patterns left as they are", check=check_patterns)

    def check(self) -> None:
        check_pattern(self.n, self.m)


class SparseGemmToConv(Pass):
    """Rewrite eligible (by default: N:M sparse) constant-weight MatMul/Gemm nodes as 1x1 Conv; see the module
    docstring."""

    name = "sparse-gemm-to-conv"
    description = "N:M sparse MatMul/Gemm -> Reshape + 1x1 Conv + Reshape (TensorRT picks sparse Conv tactics)"
    lossless = True
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)
    min_opset = 13

    Options = SparseGemmToConvOptions

    def configure(self) -> None:
        self.exclude = [re.compile(pattern) for pattern in self.options.exclude_regex]

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        names = _Names(graph)
        details = []
        for node in [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]:
            label = node.name or node.outputs[0].name
            reason = self.skip_reason(node)
            if reason is not None:
                details.append({"node": label, "kind": "skipped", "reason": reason})
                continue
            shape = [_in_channels(node), _out_channels(node)]
            _rewrite(graph, node, names)
            details.append({"node": label, "kind": "rewritten", "shape": shape})
        rewritten = sum(d["kind"] == "rewritten" for d in details)
        changes = {"rewritten": rewritten, "skipped": len(details) - rewritten}
        if not rewritten:
            return PassResult(model, False, changes, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_graph(graph, model), True, changes, details)

    def skip_reason(self, node: gs.Node) -> str | None:
        """Why ``node`` (a MatMul or Gemm) stays as it is, or None when it is rewritten."""
        if any(pattern.search(node.name) for pattern in self.exclude):
            return "excluded"
        reason = _shape_reason(node)
        if reason is not None:
            return reason
        if self.options.only_sparse and not satisfies_nm(node.inputs[1].values, self.options.n, self.options.m, _in_axis(node)):
            return f"weight is not {self.options.n}:{self.options.m} on the input axis"
        return None


def _shape_reason(node: gs.Node) -> str | None:
    """Why ``node`` cannot be written as a 1x1 Conv whatever its values, or None."""
    x, weight = node.inputs[0], node.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return "weight (input 1) is not a constant 2-D tensor"
    if not isinstance(x, gs.Variable):
        return "input 0 is a constant, not an activation"
    if x.shape is not None and len(x.shape) < 2:
        return f"activation has rank {len(x.shape)}, need >= 2"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "transA Gemm"
        if _gemm_bias(node, _out_channels(node)) is None:
            return "bias C is not a constant per output channel"
    return None


def _in_axis(node: gs.Node) -> int:
    """The constant 2-D weight's input-channel axis (Gemm 1 with ``transB=1``, else 0)."""
    return weight_input_axis(node, node, 1)


def _in_channels(node: gs.Node) -> int:
    return int(node.inputs[1].values.shape[_in_axis(node)])


def _out_channels(node: gs.Node) -> int:
    return int(node.inputs[1].values.shape[1 - _in_axis(node)])


def _gemm_bias(node: gs.Node, channels: int) -> np.ndarray | None:
    """Gemm's ``beta * C`` as ``[channels]`` float64 (zeros when C is absent), or None when C is not a constant
    that varies only along the output channels."""
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return np.zeros(channels)
    c = node.inputs[2]
    if not isinstance(c, gs.Constant):
        return None
    values = c.values.astype(np.float64)
    if values.ndim > 2 or any(d != 1 for d in values.shape[:-1]) or values.size not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)) * node.attrs.get("beta", 1.0)


def _conv_weight(node: gs.Node) -> np.ndarray:
    """The weight as ``[N, K, 1, 1]`` in its own dtype, Gemm's alpha folded in."""
    weight = node.inputs[1].values
    if _in_axis(node) == 0:
        weight = weight.T
    alpha = node.attrs.get("alpha", 1.0) if node.op == "Gemm" else 1.0
    if alpha != 1.0:
        weight = (weight.astype(np.float64) * alpha).astype(weight.dtype)
    return np.ascontiguousarray(weight).reshape(*weight.shape, 1, 1)


def _rewrite(graph: gs.Graph, node: gs.Node, names: _Names) -> None:
    """Replace ``node`` by Reshape -> 1x1 Conv -> Reshape writing its output tensor."""
    x, y = node.inputs[0], node.outputs[0]
    base = node.name or y.name
    weight = _conv_weight(node)
    channels, depth = weight.shape[:2]
    bias = []
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name != "":
        bias = [gs.Constant(names.tensor(f"{base}_conv_bias"), _gemm_bias(node, channels).astype(weight.dtype))]
    target = _output_shape(graph, x, base, channels, names)
    node.outputs.clear()
    node.inputs.clear()
    flat = _add(graph, names, "Reshape", f"{base}_to_nchw", [x, _ints(names, f"{base}_nchw_shape", [-1, depth, 1, 1])],
                x.dtype)
    conv_weight = gs.Constant(names.tensor(f"{base}_conv_weight"), weight)
    conv_out = _add(graph, names, "Conv", f"{base}_conv1x1", [flat, conv_weight, *bias], x.dtype,
                    {"kernel_shape": [1, 1]})
    graph.nodes.append(gs.Node("Reshape", names.node(f"{base}_from_nchw"), inputs=[conv_out, target], outputs=[y]))


def _output_shape(graph: gs.Graph, x: gs.Variable, base: str, channels: int, names: _Names) -> gs.Tensor:
    """``[*x.shape[:-1], channels]``: a constant when every leading dim of x is a known int, else computed from
    ``Shape(x)`` at run time."""
    if x.shape is not None and all(isinstance(d, int) and d >= 0 for d in x.shape[:-1]):
        return _ints(names, f"{base}_out_shape", [*x.shape[:-1], channels])
    shape = _add(graph, names, "Shape", f"{base}_x_shape", [x], np.int64)
    bounds = [_ints(names, f"{base}_slice_{label}", [value])
              for label, value in (("start", 0), ("end", -1), ("axis", 0))]
    leading = _add(graph, names, "Slice", f"{base}_leading_dims", [shape, *bounds], np.int64)
    return _add(graph, names, "Concat", f"{base}_out_shape", [leading, _ints(names, f"{base}_channels", [channels])],
                np.int64, {"axis": 0})


def _ints(names: _Names, name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(names.tensor(name), np.array(values, np.int64))


def _add(graph: gs.Graph, names: _Names, op: str, name: str, inputs: list[gs.Tensor], dtype: np.dtype,
         attrs: dict | None = None) -> gs.Variable:
    """Append node ``op`` named ``name`` (made unique) and return its new output variable."""
    output = gs.Variable(names.tensor(name), dtype=dtype)
    graph.nodes.append(gs.Node(op, names.node(name), attrs=attrs or {}, inputs=inputs, outputs=[output]))
    return output


class _Names:
    """Unique tensor and node names for a graph: a taken name gets a numeric suffix."""

    def __init__(self, graph: gs.Graph) -> None:
        self.tensors = set(graph.tensors())
        self.nodes = {n.name for n in graph.nodes}

    def tensor(self, name: str) -> str:
        return unique_name(self.tensors, name)

    def node(self, name: str) -> str:
        return unique_name(self.nodes, name)
