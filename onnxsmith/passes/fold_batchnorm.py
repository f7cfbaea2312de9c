"""Lossless: fold inference-mode BatchNormalization into the Conv, Gemm or MatMul that feeds it.

With ``f = scale / sqrt(var + eps)`` per channel, ``BN(y) = f * y + (B - f * mean)``; the factor goes into the
weight's output channels and the shift into the bias. Conv output channels are axis 0 of the weight; Gemm's
output columns are weight axis 0 with ``transB=1`` else axis 1; a MatMul folds only when its output is 2-D
(BN's channel axis 1 is then the weight's axis 1), and the shift becomes an ``Add``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.pass_base import Pass, PassContext, PassResult, Tolerance
from onnxsmith.core.graph import export_graph, import_graph


class FoldBatchNorm(Pass):
    """Fold every foldable BatchNormalization; the producer must feed only the BN and have constant weights."""

    name = "fold-batchnorm"
    description = "fold BatchNormalization into the preceding Conv/Gemm/MatMul"
    lossless = True
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        names = set(graph.tensors())
        folded: dict[str, int] = {}
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            producer = _foldable_producer(bn, graph)
            if producer is None:
                continue
            factor, shift = _affine(bn)
            if not _FOLDERS[producer.op](producer, bn, factor, shift, names):
                continue
            folded[producer.op] = folded.get(producer.op, 0) + 1
        if not folded:
            return PassResult(model, False, {"folded": 0})
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_graph(graph, model), True, {"folded": sum(folded.values()), **{
            f"into_{op.lower()}": count for op, count in folded.items()}})


def _foldable_producer(bn: gs.Node, graph: gs.Graph) -> gs.Node | None:
    if bn.attrs.get("training_mode", 0) or any(len(o.outputs) for o in bn.outputs[1:]):
        return None
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    x = bn.inputs[0]
    if len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
        return None
    producer = x.inputs[0]
    if producer.op not in _FOLDERS or len(producer.inputs) < 2 or not isinstance(producer.inputs[1], gs.Constant):
        return None
    return producer


def _affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    scale, bias, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    factor = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return factor, bias - factor * mean


def _fold_conv(conv: gs.Node, bn: gs.Node, factor: np.ndarray, shift: np.ndarray, names: set[str]) -> bool:
    weight = conv.inputs[1].values
    if weight.shape[0] != factor.shape[0]:
        return False
    scaled = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
    bias = _constant_bias(conv, 2, factor.shape[0])
    if bias is None:
        return False
    conv.inputs[1] = _constant(names, conv.inputs[1].name, scaled.astype(weight.dtype))
    new_bias = _constant(names, conv.name + "_bias", (bias * factor + shift).astype(weight.dtype))
    conv.inputs = [conv.inputs[0], conv.inputs[1], new_bias]
    _bypass(conv, bn)
    return True


def _fold_gemm(gemm: gs.Node, bn: gs.Node, factor: np.ndarray, shift: np.ndarray, names: set[str]) -> bool:
    weight = gemm.inputs[1].values
    out_axis = 0 if gemm.attrs.get("transB", 0) else 1
    if weight.ndim != 2 or weight.shape[out_axis] != factor.shape[0]:
        return False
    bias = _constant_bias(gemm, 2, factor.shape[0])
    if bias is None:
        return False
    bias = bias * gemm.attrs.get("beta", 1.0)
    scaled = weight * (factor[:, None] if out_axis == 0 else factor[None, :])
    gemm.inputs[1] = _constant(names, gemm.inputs[1].name, scaled.astype(weight.dtype))
    new_bias = _constant(names, gemm.name + "_bias", (bias * factor + shift).astype(weight.dtype))
    gemm.inputs = [gemm.inputs[0], gemm.inputs[1], new_bias]
    gemm.attrs["beta"] = 1.0
    _bypass(gemm, bn)
    return True


def _fold_matmul(matmul: gs.Node, bn: gs.Node, factor: np.ndarray, shift: np.ndarray, names: set[str]) -> bool:
    weight = matmul.inputs[1].values
    out = matmul.outputs[0]
    if weight.ndim != 2 or weight.shape[1] != factor.shape[0] or out.shape is None or len(out.shape) != 2:
        return False
    matmul.inputs[1] = _constant(names, matmul.inputs[1].name, (weight * factor[None, :]).astype(weight.dtype))
    shift_tensor = _constant(names, matmul.name + "_bn_shift", shift.astype(weight.dtype))
    bn.op = "Add"
    bn.attrs.clear()
    bn.inputs = [out, shift_tensor]
    bn.outputs = [bn.outputs[0]]
    return True


def _constant_bias(node: gs.Node, index: int, channels: int) -> np.ndarray | None:
    """The node's bias broadcast to ``channels`` (zeros when absent), or None when it is not per-channel."""
    if len(node.inputs) <= index or node.inputs[index].name == "":
        return np.zeros(channels)
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        return None
    values = tensor.values.astype(np.float64)
    if values.size not in (1, channels) or (values.ndim == 2 and values.shape[0] != 1):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).copy()


def _constant(names: set[str], base: str, values: np.ndarray) -> gs.Constant:
    name, suffix = f"{base}_bnfold", 1
    while name in names:
        name, suffix = f"{base}_bnfold{suffix}", suffix + 1
    names.add(name)
    return gs.Constant(name, values)


def _bypass(producer: gs.Node, bn: gs.Node) -> None:
    """Make the producer write the BN's output tensor and drop the BN."""
    bn_out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    producer.outputs = [bn_out]


_FOLDERS = {"Conv": _fold_conv, "Gemm": _fold_gemm, "MatMul": _fold_matmul}
