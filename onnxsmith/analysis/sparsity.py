"""Sparsity inspection: which GEMM weights are N:M sparse on the axis TensorRT's sparse kernels need.

A weight is reported for every MatMul (constant 2-D weight, input 1), Gemm (constant 2-D ``B``) and Conv of the
main graph. The weight may reach the node through ``DequantizeLinear`` of a constant (a QDQ model: the integer
values are read, a value is zero when it equals its zero point), ``Transpose`` (tied LM heads), ``Identity``,
``Cast`` or a no-op ``Reshape(x, [0, ..., 0])``; anything else makes it an activation, which is not reported.

The input axis is the reduction axis: MatMul weight axis 0, Gemm axis 1 with ``transB=1`` else 0, Conv axis 1
(for a grouped Conv the channels of one group; groups of ``m`` then never straddle two conv groups when the
per-group channel count is a multiple of ``m``), mapped back through any ``Transpose`` to the stored constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.sparsity import check_pattern, satisfies_nm
from onnxsmith.core.graph import import_graph

DEFAULT_PATTERNS = ((2, 4), (4, 8))
_PASSTHROUGH = ("Identity", "Cast")


@dataclass
class WeightSparsity:
    """One GEMM weight: where it is, its input (reduction) axis and how sparse it is along that axis.

    ``shape`` and ``axis`` refer to the stored constant (``weight``); ``pattern`` is the sparsest ``"n:m"``
    it satisfies on ``axis`` (None: none of those checked); ``quantized``: read through ``DequantizeLinear``.
    """

    node: str
    op: str
    weight: str
    shape: list[int]
    axis: int
    zero_fraction: float
    pattern: str | None
    group: int = 1
    quantized: bool = False


def inspect_sparsity(
    model: onnx.ModelProto, patterns: Sequence[tuple[int, int]] = DEFAULT_PATTERNS
) -> list[WeightSparsity]:
    """Every MatMul/Gemm/Conv weight of the main graph in node order, with the sparsest of ``patterns`` (pairs
    ``(n, m)``, ``0 < n < m``; ties in ``n/m`` prefer the smaller ``m``) it satisfies on its input axis."""
    ordered = _ordered_patterns(patterns)
    rows = []
    for node in import_graph(model).nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        source = _weight_source(node)
        if source is None:
            continue
        constant, axis, nonzero, quantized = source
        rows.append(WeightSparsity(
            node=node.name or node.outputs[0].name, op=node.op, weight=constant.name,
            shape=[int(d) for d in nonzero.shape], axis=axis,
            zero_fraction=float(1.0 - np.count_nonzero(nonzero) / max(nonzero.size, 1)),
            pattern=next((f"{n}:{m}" for n, m in ordered if satisfies_nm(nonzero, n, m, axis)), None),
            group=int(node.attrs.get("group", 1)), quantized=quantized,
        ))
    return rows


def format_table(rows: Sequence[WeightSparsity]) -> str:
    """An aligned text table (node, op, shape, axis, zeros %, pattern) followed by a one-line summary."""
    header = ("node", "op", "shape", "axis", "zeros", "pattern")
    lines = [header] + [(
        row.node,
        row.op + (f" g={row.group}" if row.group != 1 else "") + (" (DQ)" if row.quantized else ""),
        "x".join(map(str, row.shape)),
        str(row.axis),
        f"{100 * row.zero_fraction:.1f}%",
        row.pattern or "-",
    ) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4}  # numbers
    text = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            .rstrip() for line in lines]
    return "\n".join([*text, summary(rows)])


def summary(rows: Sequence[WeightSparsity]) -> str:
    """One line, e.g. ``"210 of 211 GEMM weights are 2:4 sparse on the input axis"``."""
    if not rows:
        return "no MatMul/Gemm/Conv with a constant weight found"
    counts: dict[str, int] = {}
    for row in rows:
        if row.pattern is not None:
            counts[row.pattern] = counts.get(row.pattern, 0) + 1
    sparse = sum(counts.values())
    if len(counts) == 1:
        return f"{sparse} of {len(rows)} GEMM weights are {next(iter(counts))} sparse on the input axis"
    detail = f" ({', '.join(f'{pattern}: {count}' for pattern, count in counts.items())})" if counts else ""
    return f"{sparse} of {len(rows)} GEMM weights are N:M sparse on the input axis{detail}"


def _ordered_patterns(patterns: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    for n, m in patterns:
        check_pattern(n, m)
    return sorted(patterns, key=lambda p: (p[0] / p[1], p[1]))


def _weight_source(node: gs.Node) -> tuple[gs.Constant, int, np.ndarray, bool] | None:
    """The constant behind ``node``'s weight, its input axis, an array that is non-zero exactly where the weight
    is, and whether it is read through ``DequantizeLinear``; None when the weight is not a usable constant."""
    tensor, perms, dq = node.inputs[1], [], None
    while not isinstance(tensor, gs.Constant):
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is not None and producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            tensor = producer.attrs["value"]
            continue
        if producer is None or dq is not None:  # a DequantizeLinear must read the constant itself
            return None
        if producer.op == "Transpose":
            perms.append(producer.attrs.get("perm"))
        elif producer.op == "DequantizeLinear":
            dq = producer
        elif producer.op not in _PASSTHROUGH and not _is_noop_reshape(producer):
            return None
        tensor = producer.inputs[0]
    values = tensor.values
    axis = _input_axis(node, values.ndim)
    if axis is None:
        return None
    for perm in perms:  # output axis a of a Transpose is its input's axis perm[a]
        axis = perm[axis] if perm is not None else values.ndim - 1 - axis
    nonzero = values != 0 if dq is None else _dequantized_nonzero(dq, values)
    return (tensor, axis, nonzero, dq is not None) if nonzero is not None else None


def _input_axis(node: gs.Node, rank: int) -> int | None:
    """The weight's input-channel axis as ``node`` reads it, or None when the rank does not fit the op."""
    if node.op == "Conv":
        return 1 if rank >= 3 else None
    if rank != 2:
        return None
    return 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0


def _is_noop_reshape(node: gs.Node) -> bool:
    """``Reshape(x, [0, ..., 0])`` without ``allowzero``: every dim copied (the QDQ passes' fusion guard)."""
    return (node.op == "Reshape" and not node.attrs.get("allowzero", 0) and isinstance(node.inputs[1], gs.Constant)
            and not node.inputs[1].values.any())


def _dequantized_nonzero(dq: gs.Node, levels: np.ndarray) -> np.ndarray | None:
    """Where ``DequantizeLinear(levels)`` is non-zero: levels that differ from their (per-tensor, per-axis or
    blocked) zero point; None when the zero point is not a constant."""
    if len(dq.inputs) < 3 or dq.inputs[2].name == "":
        return levels != 0
    if not isinstance(dq.inputs[2], gs.Constant):
        return None
    zero_point = dq.inputs[2].values.astype(np.int64)
    axis = dq.attrs.get("axis", 1) % levels.ndim
    if zero_point.ndim == 1 and zero_point.size > 1:
        shape = [1] * levels.ndim
        shape[axis] = -1
        zero_point = zero_point.reshape(shape)
    elif zero_point.ndim == levels.ndim and zero_point.size > 1:  # blocked (opset 21)
        zero_point = np.repeat(zero_point, dq.attrs.get("block_size", 1), axis=axis)[
            tuple(slice(0, d) for d in levels.shape)]
    return levels.astype(np.int64) != zero_point
