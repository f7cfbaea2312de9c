"""Graph surgery shared by the QDQ passes: the Q/DQ node groups they insert.

Every inserted group follows TensorRT's and onnxruntime's QDQ conventions: weights are int8 initializers read
through ``DequantizeLinear``; activations get an adjacent ``QuantizeLinear -> DequantizeLinear`` pair; a k-bit
level range narrower than the storage type is a float ``Clip`` before the pair (see
``calibration.twin_uniform`` for why that is bit-exact).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxsmith.calibration.blocks import BlockGrid
from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.calibration.qparams import dequantize, quantize, symmetric_scale
from onnxsmith.calibration.twin_uniform import TwinParams, UniformRange

def quantize_weight(
    graph: gs.Graph,
    weight: gs.Constant,
    axis: int,
    scale: np.ndarray | None = None,
    bits: int = 8,
    prefix: str | None = None,
) -> tuple[gs.Variable, dict]:
    """``DequantizeLinear`` of a per-channel (``axis``) symmetric ``bits``-bit int8 copy of ``weight``.

    ``scale`` (float32, one per channel) defaults to ``max|w| / (2**(bits-1) - 1)`` per channel; values are
    rounded half to even and clipped to ``-2**(bits-1) .. 2**(bits-1)-1``. Names start with ``prefix`` (the
    weight's name). Returns the dequantized tensor and a report entry with the weight's SQNR.
    """
    prefix = prefix or weight.name
    values = weight.values.astype(np.float32)
    if scale is None:
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        scale = symmetric_scale(np.abs(values).max(axis=reduce_axes), bits=bits)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.zeros_like(scale, dtype=np.int8)
    half = 2 ** (bits - 1)
    quantized = np.clip(quantize(values, scale, zero_point, np.int8, axis=axis), -half, half - 1).astype(np.int8)
    restored = dequantize(quantized, scale, zero_point, axis=axis)
    q_const = gs.Constant(f"{prefix}_int8", quantized)
    scale_const = gs.Constant(f"{prefix}_scale", scale)
    zp_const = gs.Constant(f"{prefix}_zero_point", zero_point)
    output = gs.Variable(f"{prefix}_dequantized", dtype=weight.values.dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{prefix}_DequantizeLinear",
                               attrs={"axis": axis}, inputs=[q_const, scale_const, zp_const], outputs=[output]))
    sqnr = sqnr_db(float(np.sum(values.astype(np.float64) ** 2)), float(np.sum((values - restored) ** 2.0)))
    dtype = "int8" if bits == 8 else f"int{bits} (in int8)"
    return output, {"tensor": weight.name, "kind": "weight", "dtype": dtype, "axis": axis, "sqnr_db": sqnr}


def quantize_weight_blocks(
    graph: gs.Graph,
    weight: gs.Constant,
    out_axis: int,
    in_axis: int,
    block_scales: np.ndarray,
    grid: BlockGrid,
    bits: int,
    prefix: str,
    guard: bool = False,
    storage: str = "int8",
) -> tuple[gs.Variable, dict]:
    """``DequantizeLinear`` of ``weight`` quantized with one symmetric ``bits``-bit step per block of ``grid``.

    ``block_scales`` ``[input blocks, output blocks]`` index the constant's ``in_axis`` (input channels; a
    Conv's kernel taps follow their channel) and ``out_axis``. One input block is a per-tensor (one scale) or
    per-channel ``DequantizeLinear`` on ``out_axis`` whose scales repeat each output block's step (opset 13);
    more are an opset-21 blocked ``DequantizeLinear`` on ``in_axis`` with ``block_size = grid.channel_block``
    and those steps repeated along every other axis. Values are int8 with zero point 0, rounded half to even
    and clipped to ``-2**(bits-1) .. 2**(bits-1)-1``. ``storage="int4"`` (``bits <= 4``) names the levels
    ``PREFIX_int4`` and omits the zero point: the caller re-stores that initializer as ONNX ``INT4`` after export
    (:func:`onnxsmith.core.graph.store_as_int4`; the report entry's ``int4_initializer``). A blocked
    form, and any form when ``guard`` (the GEMM's activation is not a QDQ pair), goes through
    :func:`_fusion_guard`. Returns the dequantized tensor and a report entry.
    """
    values = weight.values.astype(np.float32)
    channels = values.shape[in_axis]
    block_scales = np.asarray(block_scales, dtype=np.float32)
    per_pair = np.repeat(np.repeat(block_scales, grid.channel_block, axis=0)[:channels], grid.col_block, axis=1)
    per_pair = per_pair[:, : values.shape[out_axis]]  # [input channels, output channels]
    shape = [1] * values.ndim
    shape[in_axis], shape[out_axis] = per_pair.shape
    full = (per_pair if in_axis < out_axis else per_pair.T).reshape(shape)
    half = 2 ** (bits - 1)
    with np.errstate(over="ignore"):
        levels = np.clip(np.rint(values / full), -half, half - 1).astype(np.int8)
    restored = levels.astype(np.float32) * full
    attrs: dict = {}
    if grid.scales == 1:
        scale = block_scales.reshape(())
    elif block_scales.shape[0] == 1:
        scale, attrs = per_pair[0], {"axis": out_axis}
    else:
        blocked_shape = list(values.shape)
        blocked_shape[in_axis] = block_scales.shape[0]
        scale = np.broadcast_to(np.take(full, np.arange(0, channels, grid.channel_block), axis=in_axis),
                                blocked_shape).copy()
        attrs = {"axis": in_axis, "block_size": grid.channel_block}
    q_const = gs.Constant(f"{prefix}_{storage}", levels)
    scale_const = gs.Constant(f"{prefix}_scale", np.ascontiguousarray(scale, dtype=np.float32))
    inputs = [q_const, scale_const]
    if storage == "int8":
        inputs.append(gs.Constant(f"{prefix}_zero_point", np.zeros(np.shape(scale), dtype=np.int8)))
    output = gs.Variable(f"{prefix}_dequantized", dtype=weight.values.dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{prefix}_DequantizeLinear", attrs=attrs,
                               inputs=inputs, outputs=[output]))
    if guard or "block_size" in attrs:
        output = _fusion_guard(graph, output, prefix)
    sqnr = sqnr_db(float(np.sum(values.astype(np.float64) ** 2)), float(np.sum((values - restored) ** 2.0)))
    dtype = "int4" if storage == "int4" else "int8" if bits == 8 else f"int{bits} (in int8)"
    detail = {"tensor": weight.name, "kind": "weight", "dtype": dtype,
              "grid": f"{block_scales.shape[1]}x{block_scales.shape[0]}", "scales": grid.scales,
              "form": "blocked" if "block_size" in attrs else "per-channel" if attrs else "per-tensor", "sqnr_db": sqnr}
    if storage == "int4":
        detail["int4_initializer"] = q_const.name
    return output, detail


def _fusion_guard(graph: gs.Graph, tensor: gs.Variable, prefix: str) -> gs.Variable:
    """``Reshape(tensor, [0, 0, ...])`` (a no-op): keeps a weight ``DequantizeLinear`` from being fused into its
    GEMM where onnxruntime 1.32's fusions would change the graph's values.

    Its QDQ fusion turns ``DQ(activation), blocked DQ(weight) -> MatMul`` into a ``MatMulIntegerToFloat`` that
    rejects the blocked scale at run time, and ``DQ(int8 weight) -> MatMul`` with a float activation into
    ``MatMulNBits`` (bits 8, accuracy_level 4), which quantizes the activation to int8 on the fly. With the
    Reshape between them the weight is dequantized and the GEMM runs in float, as the graph says (tested).
    """
    shape = gs.Constant(f"{prefix}_shape", np.zeros(len(tensor.shape), dtype=np.int64))
    output = gs.Variable(f"{prefix}_blocked", dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Reshape", f"{prefix}_fusion_guard", inputs=[tensor, shape], outputs=[output]))
    return output


def insert_grouped_fake_quant(graph: gs.Graph, tensor: gs.Variable, steps: np.ndarray, axis: int, bits: int,
                              prefix: str) -> gs.Variable:
    """Symmetric ``bits``-bit fake quantization of ``tensor`` with one step per channel of ``axis`` (negative:
    counted from the last axis; ``steps`` 1-D): ``Mul(Clip(Round(Div(x, s)), -2**(bits-1), 2**(bits-1)-1), s)``.

    The same float32 division and round-half-to-even as ``QuantizeLinear``, so the values equal a per-axis
    QDQ pair's. Float ops rather than a per-axis pair because onnxruntime 1.32's QDQ fusion mishandles per-axis
    activation scales in front of a GEMM (a run-time error, or wrong values behind a Reshape); no runtime has a
    per-channel-activation integer GEMM, so nothing is lost.
    """
    if axis >= 0:
        raise ValueError(f"axis must be negative (counted from the last axis), got {axis}")
    half = 2 ** (bits - 1)
    steps = gs.Constant(f"{prefix}_scale", np.asarray(steps, dtype=np.float32).reshape([-1] + [1] * (-axis - 1)))
    low = gs.Constant(f"{prefix}_low", np.asarray(-half, np.float32))
    high = gs.Constant(f"{prefix}_high", np.asarray(half - 1, np.float32))
    current = tensor
    for op, extra in (("Div", [steps]), ("Round", []), ("Clip", [low, high]), ("Mul", [steps])):
        out = gs.Variable(f"{prefix}_{op.lower()}", dtype=tensor.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node(op, f"{prefix}_{op}", inputs=[current, *extra], outputs=[out]))
        current = out
    return current


def insert_symmetric_qdq(graph: gs.Graph, tensor: gs.Variable, scale: float, bits: int, dtype: str,
                         prefix: str) -> gs.Variable:
    """Symmetric ``bits``-bit per-tensor QDQ on ``tensor``: levels ``-2**(bits-1) .. 2**(bits-1)-1`` of ``scale``.

    ``dtype`` ``"int8"`` stores them with zero point 0 (TensorRT); ``"uint8"`` with zero point 128
    (onnxruntime's fast CPU kernels), which gives identical values. Below 8 bits a float ``Clip`` before the
    pair narrows the levels.
    """
    half = 2 ** (bits - 1)
    if bits < 8:
        tensor = clip(graph, tensor, UniformRange(np.float32(scale), -half, half - 1, np.dtype(np.int8)), prefix)
    zero_point = np.uint8(128) if dtype == "uint8" else np.int8(0)
    return insert_qdq(graph, tensor, np.float32(scale), zero_point, prefix)


def insert_qdq(graph: gs.Graph, tensor: gs.Variable, scale: np.ndarray, zero_point: np.ndarray,
                prefix: str | None = None, axis: int | None = None) -> gs.Variable:
    """Append ``QuantizeLinear -> DequantizeLinear`` on ``tensor``; names start with ``prefix`` (the tensor's).

    ``axis`` (with 1-D ``scale`` / ``zero_point``) makes the pair per-axis along that axis of ``tensor``.
    """
    prefix = prefix or tensor.name
    attrs = {} if axis is None else {"axis": axis}
    scale_const = gs.Constant(f"{prefix}_scale", np.asarray(scale, dtype=np.float32))
    zp_const = gs.Constant(f"{prefix}_zero_point", np.asarray(zero_point))
    quantized = gs.Variable(f"{prefix}_quantized", dtype=np.asarray(zero_point).dtype, shape=tensor.shape)
    dequantized = gs.Variable(f"{prefix}_dequantized", dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{prefix}_QuantizeLinear",
                               attrs=dict(attrs), inputs=[tensor, scale_const, zp_const], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{prefix}_DequantizeLinear",
                               attrs=dict(attrs), inputs=[quantized, scale_const, zp_const], outputs=[dequantized]))
    return dequantized


def insert_twin(graph: gs.Graph, tensor: gs.Variable, params: TwinParams, prefix: str | None = None) -> gs.Variable:
    """``Where(x < split, DQ(Q(Clip(x) ; R1)), DQ(Q(Clip(x) ; R2)))``: the twin fake-quant form.

    Both branches use int8 zero point 0 (TensorRT accepts only INT8 Q/DQ; every branch's levels fit int8); the
    Clip bounds give the k-bit level ranges exactly (see ``calibration.twin_uniform``). Names start with
    ``prefix`` (the tensor's name).
    """
    prefix = prefix or tensor.name
    branches = []
    for label, branch in (("r1", params.r1), ("r2", params.r2)):
        branches.append(clipped_qdq(graph, tensor, branch, f"{prefix}_twin_{label}"))
    split = gs.Constant(f"{prefix}_twin_split", np.asarray(params.split, dtype=np.float32))
    below = gs.Variable(f"{prefix}_twin_below", dtype=np.bool_, shape=tensor.shape)
    output = gs.Variable(f"{prefix}_twin", dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Less", f"{prefix}_twin_Less", inputs=[tensor, split], outputs=[below]))
    graph.nodes.append(gs.Node("Where", f"{prefix}_twin_Where", inputs=[below, *branches], outputs=[output]))
    return output


def insert_twin_parts(
    graph: gs.Graph, tensor: gs.Variable, params: TwinParams, prefix: str | None = None
) -> list[gs.Variable]:
    """``[X_R1, X_R2]`` with ``X_R1 = QDQ_R1(Where(x < split, x, 0))`` and ``X_R2 = QDQ_R2(Where(x < split, 0, x))``.

    Quantizing 0 gives 0 in both ranges, so ``X_R1 + X_R2`` equals the fake-quant form exactly. Names start with
    ``prefix`` (the tensor's name).
    """
    prefix = prefix or tensor.name
    split = gs.Constant(f"{prefix}_twin_split", np.asarray(params.split, dtype=np.float32))
    zero = gs.Constant(f"{prefix}_twin_zero", np.zeros((), dtype=np.float32))
    below = gs.Variable(f"{prefix}_twin_below", dtype=np.bool_, shape=tensor.shape)
    graph.nodes.append(gs.Node("Less", f"{prefix}_twin_Less", inputs=[tensor, split], outputs=[below]))
    parts = []
    for label, branch, inputs in (("r1", params.r1, [below, tensor, zero]), ("r2", params.r2, [below, zero, tensor])):
        part = gs.Variable(f"{prefix}_twin_{label}_part", dtype=tensor.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("Where", f"{prefix}_twin_{label}_Where", inputs=inputs, outputs=[part]))
        parts.append(clipped_qdq(graph, part, branch, f"{prefix}_twin_{label}"))
    return parts


def split_gemm(graph: gs.Graph, node: gs.Node, index: int, parts: list[gs.Variable]) -> None:
    """Replace ``node`` (reading a twin tensor at ``index``) by one copy per part, summed with ``Add``.

    Only the first copy of a Gemm keeps the bias ``C``, so it is added once.
    """
    output = node.outputs[0]
    partials = []
    for number, part in enumerate(parts):
        inputs = list(node.inputs)
        inputs[index] = part
        if node.op == "Gemm" and number > 0:
            inputs = inputs[:2]
        partial = gs.Variable(f"{output.name}_part{number}", dtype=output.dtype, shape=output.shape)
        graph.nodes.append(gs.Node(node.op, f"{node.name}_part{number}", dict(node.attrs), inputs, [partial]))
        partials.append(partial)
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("Add", f"{node.name}_parts_sum", inputs=partials, outputs=[output]))


def clipped_qdq(graph: gs.Graph, tensor: gs.Variable, branch: UniformRange, prefix: str) -> gs.Variable:
    """``DQ(Q(Clip(tensor)))`` for one twin branch, int8 with zero point 0."""
    return insert_qdq(graph, clip(graph, tensor, branch, prefix), branch.scale, np.int8(0), prefix)


def clip(graph: gs.Graph, tensor: gs.Variable, levels: UniformRange, prefix: str) -> gs.Variable:
    """``Clip(tensor, qmin * scale, qmax * scale)``: the float form of clipping quantized ``levels``."""
    low, high = levels.clip_bounds()
    clipped = gs.Variable(f"{prefix}_clipped", dtype=tensor.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("Clip", f"{prefix}_Clip", inputs=[
        tensor, gs.Constant(f"{prefix}_low", np.asarray(low, np.float32)),
        gs.Constant(f"{prefix}_high", np.asarray(high, np.float32))], outputs=[clipped]))
    return clipped
