"""Where a GEMM's weight enters and which of its axes are the output and input channels (read-only queries)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


def is_float(tensor: gs.Tensor) -> bool:
    """Whether the tensor's known element type is float32 or float16."""
    return tensor.dtype is not None and np.dtype(tensor.dtype) in FLOAT_TYPES


def weight_site(node: gs.Node) -> tuple[gs.Node, int, int | None] | None:
    """Where a node's constant weight enters: (reading node, input index, output-channel axis of the constant).

    The weight is the node's second input, or for MatMul a ``Transpose`` of a constant (exporters write tied
    LM heads that way): the DQ then goes before the Transpose, and MatMul's output channels are the
    constant's axis ``perm[-1]``. ``None`` when the second input is an activation; the axis is ``None`` when
    per-channel quantization does not fit the weight's layout.
    """
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        return node, 1, weight_axis(node, weight.values.ndim)
    producer = weight.inputs[0] if len(weight.inputs) == 1 else None
    if node.op == "MatMul" and producer is not None and producer.op == "Transpose" \
            and isinstance(producer.inputs[0], gs.Constant):
        rank = producer.inputs[0].values.ndim
        perm = producer.attrs.get("perm", list(reversed(range(rank))))
        return producer, 0, (perm[-1] if rank >= 2 else None)
    return None


def weight_input_axis(node: gs.Node, reader: gs.Node, index: int) -> int:
    """The input-channel (reduction) axis of the constant a ``weight_site`` names: Conv 1, Gemm 1 with
    ``transB=1`` else 0, MatMul the second-to-last axis (for a ``Transpose`` reader, the constant's axis that
    becomes it)."""
    if reader is not node:
        rank = reader.inputs[index].values.ndim
        return reader.attrs.get("perm", list(reversed(range(rank))))[-2]
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    return reader.inputs[index].values.ndim - 2


def weight_axis(node: gs.Node, rank: int) -> int | None:
    """The output-channel axis of a constant weight of ``rank`` read directly by ``node``."""
    if node.op == "Conv":
        return 0 if rank >= 3 else None
    if node.op == "Gemm":
        return (0 if node.attrs.get("transB", 0) else 1) if rank == 2 else None
    return rank - 1 if rank >= 2 else None
