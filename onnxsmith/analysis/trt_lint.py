"""TRT-readiness lint: whether TensorRT 10 can parse an ONNX model and run its quantization as intended.

Every rule is in :data:`RULES`, with the source it encodes: the operator matrix and restrictions of TensorRT's ONNX
parser (onnx-tensorrt ``docs/operators.md``, TensorRT 10.15: opsets 9-24), the TensorRT developer guide's
quantized-types chapter (Q/DQ: INT8 / FP8 / INT4 / FP4 only, zero point 0, per-tensor activations, per-channel
weights along the output channels, blocked DQ for INT4 weight-only, placement TensorRT fuses) and its sparsity
section (2:4 along the input channels; sparse INT8 kernels need INT8 in and out), as summarised in
``../shared/METHODS.md``. A finding names the node, the rule and the fix; its severity says what TensorRT does:

* ``error``: the parser or builder refuses the model, or builds something else than the graph says;
* ``warning``: the engine builds, but a layer runs in a higher precision or without the intended kernel;
* ``info``: a hint that changes speed only (shown on request).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.sparsity import satisfies_nm
from onnxsmith.analysis.sparsity import inspect_sparsity
from onnxsmith.core.graph import constant_value, import_graph

OPSET_RANGE = (9, 24)
"""Default-domain opsets TensorRT 10.15's ONNX parser supports (10.0: 9-20)."""

UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})
"""Operators TensorRT 10.15's ONNX parser marks unsupported (``N`` in its operator matrix)."""

TP = onnx.TensorProto
QUANTIZED_TYPES = {TP.INT8: "INT8", TP.FLOAT8E4M3FN: "FP8", TP.INT4: "INT4", TP.FLOAT4E2M1: "FP4"}
"""Q/DQ types TensorRT accepts."""
UNSUPPORTED_TYPES = {TP.STRING: "STRING", TP.INT16: "INT16", TP.UINT16: "UINT16", TP.UINT32: "UINT32",
                     TP.UINT64: "UINT64", TP.COMPLEX64: "COMPLEX64", TP.COMPLEX128: "COMPLEX128",
                     TP.UINT4: "UINT4", TP.FLOAT8E5M2: "FP8 E5M2", TP.FLOAT8E4M3FNUZ: "FP8 E4M3FNUZ",
                     TP.FLOAT8E5M2FNUZ: "FP8 E5M2FNUZ"}
INT4_BLOCKS = (64, 128)
GEMM_OPS = ("Conv", "MatMul", "Gemm")
REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Cast")

RULES: dict[str, str] = {
    "opset-range": "default-domain opset within TensorRT's parser range (9-24)",
    "custom-domain": "no operator from another domain (com.microsoft etc.): TensorRT has no importer without a plugin",
    "unsupported-op": "no operator TensorRT's ONNX parser does not support",
    "op-restriction": "operator attributes and inputs within the parser's restrictions (TopK, Reduce*, OneHot, "
                      "Dropout, LayerNormalization, pooling, ScatterND, Constant, Squeeze/Unsqueeze)",
    "tensor-type": "no tensor of a type TensorRT lacks; UINT8 only as network input/output; DOUBLE is cast down",
    "qdq-type": "Q/DQ quantize to INT8, FP8 (E4M3FN), INT4 or FP4 only",
    "qdq-zero-point": "Q/DQ zero points are 0 (symmetric)",
    "qdq-scale": "Q/DQ scales are build-time constants, finite and > 0",
    "qdq-granularity": "activations per tensor; weight scales per tensor or per output channel",
    "qdq-blocked": "blocked DQ only for INT4 weights: 2-D constant, block 64 or 128 along one of the last two "
                   "dims, even last dim, opset >= 21, scale dtype = activation dtype",
    "int4-activation": "INT4 is weight-only: no QuantizeLinear to INT4",
    "orphan-quantize": "every QuantizeLinear output is read by DequantizeLinear only",
    "dangling-dequantize": "every DequantizeLinear reads a QuantizeLinear output or a constant",
    "qdq-pair-mismatch": "a Q -> DQ pair uses one scale, zero point and axis",
    "gemm-partial-qdq": "a quantized GEMM has both its inputs quantized (INT4 weight-only excepted)",
    "unfused-batchnorm": "no BatchNormalization after a quantized Conv (fold it so the Conv fuses in INT8)",
    "sparse-axis": "2:4 weights are sparse along the input channels, the axis TensorRT's sparse kernels read",
    "sparse-int8-output": "a sparse INT8 GEMM's output is quantized too (sparse INT8 kernels need INT8 in and out)",
    "sparse-matmul-form": "2:4 MatMul/Gemm as a 1x1 Conv, the form TensorRT picks sparse tactics for (info)",
}


@dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` ('error', 'warning', 'info'), ``rule`` (a key of :data:`RULES`), the node (or
    tensor / model-level subject), what is wrong and how to fix it."""

    severity: str
    rule: str
    node: str
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.severity:7} {self.rule:20} {self.node}: {self.message}; fix: {self.fix}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def lint_model(model: onnx.ModelProto) -> list[Finding]:
    """Every finding of every rule on ``model`` (which is not modified), errors first."""
    typed = _with_types(model)
    graph = import_graph(typed)
    opset = next((e.version for e in typed.opset_import if e.domain in ("", "ai.onnx")), 1)
    findings = [*_opset(opset), *_operators(graph, opset), *_types(typed), *_qdq(graph, opset),
                *_gemms(graph), *_sparsity(typed, graph)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def summary(findings: Iterable[Finding]) -> dict[str, int]:
    """Counts per severity."""
    counts = {"error": 0, "warning": 0, "info": 0}
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred value types where onnx can infer them (the model itself when it cannot)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        return model


def _opset(opset: int) -> list[Finding]:
    low, high = OPSET_RANGE
    if opset < low:
        return [Finding("error", "opset-range", "model", f"default-domain opset {opset} is below {low}",
                        "upgrade the opset (the upgrade-opset pass, e.g. to 17)")]
    if opset > high:
        return [Finding("warning", "opset-range", "model", f"opset {opset} is newer than TensorRT 10.15 parses "
                        f"({high})", f"export with opset <= {high}")]
    return []


def _operators(graph: gs.Graph, opset: int) -> list[Finding]:
    findings = []
    for node in graph.nodes:
        if node.domain not in (None, "", "ai.onnx"):
            fix = ("write the TensorRT INT4 form (--target tensorrt: INT4 DequantizeLinear)"
                   if node.op == "MatMulNBits" else "replace it with standard ONNX ops or register a TensorRT plugin")
            findings.append(Finding("error", "custom-domain", node.name,
                                    f"{node.domain}.{node.op} has no TensorRT importer", fix))
        elif node.op in UNSUPPORTED_OPS:
            findings.append(Finding("error", "unsupported-op", node.name, f"{node.op} is not supported by "
                                    "TensorRT's ONNX parser", "rewrite the subgraph with supported ops"))
        else:
            findings += _restrictions(node, opset)
    return findings


def _restrictions(node: gs.Node, opset: int) -> list[Finding]:
    """The parser's per-operator restrictions that can be checked on the graph."""
    problems: list[tuple[str, str]] = []
    op, attrs = node.op, node.attrs
    if op == "TopK":
        k = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if attrs.get("sorted", 1) != 1:
            problems.append(("TopK needs sorted=1", "set sorted=1"))
        if k is None and len(node.inputs) > 1:
            problems.append(("TopK's K is not a build-time constant", "make K an initializer"))
        elif k is not None and int(np.asarray(k).ravel()[0]) >= 3840:
            problems.append(("TopK's K must be below 3840", "split the selection"))
    elif op in REDUCE_OPS and len(node.inputs) > 1 and node.inputs[1].name and constant_value(node.inputs[1]) is None:
        problems.append((f"{op}'s axes are not an initializer", "make the axes an initializer (constant-folding)"))
    elif op == "OneHot" and constant_value(node.inputs[1]) is None:
        problems.append(("OneHot's depth is not a build-time constant", "make depth an initializer"))
    elif op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
        training = constant_value(node.inputs[2])
        if training is None or bool(np.asarray(training).ravel()[0]):
            problems.append(("Dropout's training_mode must be a constant False", "export in eval mode"))
    elif op == "LayerNormalization" and any(out.outputs for out in node.outputs[1:]):
        problems.append(("only LayerNormalization's first output is supported", "compute Mean/InvStdDev apart"))
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = attrs.get("kernel_shape", [])
        if len(kernel) not in (2, 3):
            problems.append((f"{op} must be 2-D or 3-D, got {len(kernel)}-D", "reshape to a 2-D pooling"))
        if any(d != 1 for d in attrs.get("dilations", [])):
            problems.append((f"{op} dilations must be 1", "remove the dilation"))
        if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
            problems.append(("MaxPool's Indices output is unsupported", "do not read the indices"))
    elif op == "ScatterND" and attrs.get("reduction", "none") != "none":
        problems.append(("ScatterND supports reduction='none' only", "use ScatterElements with the reduction"))
    elif op == "Constant" and any(key in attrs for key in ("sparse_value", "value_string", "value_strings")):
        problems.append(("Constant with a sparse or string value", "store a dense numeric initializer"))
    elif op in ("Squeeze", "Unsqueeze") and opset >= 13 and len(node.inputs) > 1 and node.inputs[1].name \
            and constant_value(node.inputs[1]) is None:
        return [Finding("warning", "op-restriction", node.name, f"{op}'s axes are computed at run time (TensorRT "
                        "must resolve them to a constant)", "fold them to an initializer (constant-folding)")]
    return [Finding("error", "op-restriction", node.name, message, fix) for message, fix in problems]


def _types(model: onnx.ModelProto) -> list[Finding]:
    io = {info.name for info in (*model.graph.input, *model.graph.output)}
    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    typed = {info.name: info.type.tensor_type.elem_type for info in infos if info.type.HasField("tensor_type")}
    typed.update({init.name: init.data_type for init in model.graph.initializer})
    findings = []
    for name, elem in typed.items():
        if elem in UNSUPPORTED_TYPES:
            findings.append(Finding("error", "tensor-type", name, f"type {UNSUPPORTED_TYPES[elem]} is not a "
                                    "TensorRT type", "cast it to a supported type or keep it out of the graph"))
        elif elem == TP.UINT8 and name not in io and not _is_qdq_tensor(model, name):
            findings.append(Finding("error", "tensor-type", name, "UINT8 is supported only as a network input or "
                                    "output", "use INT8 / INT32 inside the network"))
        elif elem == TP.DOUBLE:
            findings.append(Finding("warning", "tensor-type", name, "DOUBLE is cast down to FLOAT by TensorRT",
                                    "export in float32"))
    return findings


def _is_qdq_tensor(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``name`` is a Q output, DQ input or Q/DQ zero point (judged by the Q/DQ rules instead)."""
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") and name in (*node.input, *node.output)
               for node in model.graph.node)


def _qdq(graph: gs.Graph, opset: int) -> list[Finding]:
    findings = []
    for node in graph.nodes:
        if node.op == "QuantizeLinear":
            findings += _quantize(node)
        elif node.op == "DequantizeLinear":
            findings += _dequantize(node, opset)
    return findings


def _qdq_common(node: gs.Node, quantized_type: int | None) -> list[Finding]:
    """Type, zero point and scale rules shared by QuantizeLinear and DequantizeLinear."""
    findings = []
    name = QUANTIZED_TYPES.get(quantized_type)
    if quantized_type is not None and name is None:
        label = onnx.helper.tensor_dtype_to_string(quantized_type).removeprefix("TensorProto.")
        direction = "to" if node.op == "QuantizeLinear" else "from"
        findings.append(Finding("error", "qdq-type", node.name, f"{node.op} {direction} {label}: TensorRT quantizes to "
                                "INT8, FP8, INT4 or FP4 only", "use int8 with zero point 0 (--act-dtype int8)"))
    zero_point = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zero_point is not None:
        value = constant_value(zero_point)
        if value is None or np.any(_as_numbers(value) != 0):
            findings.append(Finding("error", "qdq-zero-point", node.name, "zero point is not 0",
                                    "quantize symmetrically (int8, zero point 0: --act-dtype int8)"))
    scale = constant_value(node.inputs[1])
    if scale is None:
        findings.append(Finding("error", "qdq-scale", node.name, "scale is not a build-time constant",
                                "store the scale as an initializer"))
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        findings.append(Finding("error", "qdq-scale", node.name, "scale is not finite and > 0",
                                "recalibrate (a zero-range tensor needs a positive minimum scale)"))
    return findings


def _quantize(node: gs.Node) -> list[Finding]:
    out = node.outputs[0]
    quantized_type = _elem_type(out, node)
    findings = _qdq_common(node, quantized_type)
    if quantized_type == TP.INT4:
        findings.append(Finding("error", "int4-activation", node.name, "QuantizeLinear to INT4: TensorRT uses INT4 "
                                "for weights only", "quantize activations to int8, or keep them float (W4A16)"))
    if not isinstance(node.inputs[0], gs.Constant) and _is_per_axis(node):
        findings.append(Finding("error", "qdq-granularity", node.name, "per-channel quantization of an "
                                "activation: TensorRT quantizes activations per tensor", "use one scale"))
    readers = [reader for reader in out.outputs]
    if not readers or any(reader.op != "DequantizeLinear" for reader in readers):
        what = ", ".join(sorted({r.op for r in readers if r.op != "DequantizeLinear"})) or "nothing (graph output)"
        findings.append(Finding("error", "orphan-quantize", node.name, f"QuantizeLinear output is read by {what}",
                                "follow every QuantizeLinear by a DequantizeLinear"))
    for reader in readers:
        if reader.op == "DequantizeLinear" and not _same_params(node, reader):
            findings.append(Finding("warning", "qdq-pair-mismatch", reader.name, f"scale / zero point / axis "
                                    f"differ from its QuantizeLinear {node.name}", "use the same parameters"))
    return findings


def _dequantize(node: gs.Node, opset: int) -> list[Finding]:
    source = node.inputs[0]
    constant = constant_value(source)
    producer = source.inputs[0] if source.inputs else None
    quantized_type = _elem_type(source, node)
    findings = _qdq_common(node, quantized_type)
    if constant is None and (producer is None or producer.op != "QuantizeLinear"):
        what = producer.op if producer is not None else "a graph input"
        findings.append(Finding("error", "dangling-dequantize", node.name, f"DequantizeLinear reads {what}",
                                "feed it from a QuantizeLinear or a constant"))
    block = int(node.attrs.get("block_size", 0) or 0)
    if block or quantized_type == TP.INT4:
        findings += _blocked(node, source, constant, block, quantized_type, opset)
    elif constant is not None and _is_per_axis(node):
        findings += _weight_axis(node)
    elif constant is None and _is_per_axis(node):
        findings.append(Finding("error", "qdq-granularity", node.name, "per-channel dequantization of an "
                                "activation: TensorRT quantizes activations per tensor", "use one scale"))
    return findings


def _blocked(node: gs.Node, source: gs.Tensor, constant: np.ndarray | None, block: int, quantized_type: int | None,
             opset: int) -> list[Finding]:
    """INT4 weight-only rules (TensorRT takes blocked DQ for INT4 / FP4 weights only)."""
    if quantized_type not in (TP.INT4, TP.FLOAT4E2M1):
        return [Finding("error", "qdq-blocked", node.name, f"blocked DequantizeLinear of "
                        f"{QUANTIZED_TYPES.get(quantized_type, 'a non-4-bit type')}: TensorRT takes block "
                        "quantization for INT4 weights only", "use per-channel INT8, or INT4 blocks of 64/128")]
    problems = []
    shape = _shape(source)
    if constant is None:
        problems.append(("INT4 DequantizeLinear does not read a constant weight", "store the weight as an INT4 "
                         "initializer"))
    if shape is not None and len(shape) != 2:
        problems.append((f"INT4 weight has rank {len(shape)}, TensorRT needs 2-D", "reshape the weight to 2-D"))
    axis = int(node.attrs.get("axis", 1))
    if shape is not None and len(shape) == 2 and axis not in (-2, -1, 0, 1):
        problems.append((f"blocked along axis {axis}", "block along one of the last two dims"))
    if block not in INT4_BLOCKS:
        problems.append((f"block size {block or 'missing'}", f"use block {INT4_BLOCKS[0]} or {INT4_BLOCKS[1]} "
                         "(--block-size)"))
    if shape is not None and shape and isinstance(shape[-1], int) and shape[-1] % 2:
        problems.append((f"odd last dim {shape[-1]} (INT4 packs two per byte)", "pad the weight to an even size"))
    if opset < 21:
        problems.append((f"INT4 needs opset 21, the model has {opset}", "upgrade to opset 21"))
    activation = _gemm_activation_dtype(node)
    if activation is not None and node.outputs[0].dtype is not None and np.dtype(node.outputs[0].dtype) != activation:
        problems.append((f"scale dtype {np.dtype(node.outputs[0].dtype)} differs from the activations' {activation}",
                         "store the scale in the activation dtype (e.g. float16)"))
    return [Finding("error", "qdq-blocked", node.name, message, fix) for message, fix in problems]


def _weight_axis(node: gs.Node) -> list[Finding]:
    """A per-channel weight DQ must scale the output channels of the GEMM reading it (directly or transposed)."""
    rank = len(_shape(node.inputs[0]) or ())
    axis = int(node.attrs.get("axis", 1)) % rank if rank else None
    findings = []
    for reader in node.outputs[0].outputs:
        gemm, perm = reader, None
        if reader.op == "Transpose" and reader.outputs[0].outputs:
            perm = reader.attrs.get("perm", list(reversed(range(rank))))
            gemm = reader.outputs[0].outputs[0]
        if gemm.op not in GEMM_OPS or len(gemm.inputs) < 2 or gemm.inputs[1] is not (
                reader.outputs[0] if perm is not None else node.outputs[0]):
            continue
        expected = _output_axis(gemm, rank)
        if expected is not None and perm is not None:
            expected = perm[expected]
        if expected is not None and axis is not None and axis != expected % rank:
            findings.append(Finding("error", "qdq-granularity", node.name, f"per-channel weight scales along axis "
                                    f"{axis}, but {gemm.name}'s output channels are axis {expected % rank}",
                                    "quantize per output channel"))
    return findings


def _output_axis(gemm: gs.Node, rank: int) -> int | None:
    if gemm.op == "Conv":
        return 0
    if gemm.op == "Gemm":
        return 0 if gemm.attrs.get("transB", 0) else 1
    return rank - 1 if rank >= 2 else None


def _gemms(graph: gs.Graph) -> list[Finding]:
    """GEMM inputs quantized together; BatchNormalization folded before a quantized Conv."""
    findings = []
    for node in graph.nodes:
        if node.op in GEMM_OPS and len(node.inputs) >= 2:
            data, weight = (_dequantized_source(t) for t in node.inputs[:2])
            if (data is None) != (weight is None) and not (data is None and weight == TP.INT4):
                quantized, plain = ("weight", "input") if data is None else ("input", "weight")
                findings.append(Finding("warning", "gemm-partial-qdq", node.name, f"its {quantized} is quantized "
                                        f"but its {plain} is not: TensorRT runs it in float", "quantize both inputs "
                                        "(INT8 weight-only is not a TensorRT mode; INT4 weight-only is)"))
        if node.op == "BatchNormalization":
            producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
            if producer is not None and producer.op == "Conv" and _dequantized_source(producer.inputs[0]) is not None:
                findings.append(Finding("warning", "unfused-batchnorm", node.name, f"BatchNormalization after the "
                                        f"quantized Conv {producer.name}", "fold it first (fold-batchnorm pass)"))
    return findings


def _sparsity(model: onnx.ModelProto, graph: gs.Graph) -> list[Finding]:
    """2:4 weights (found by :func:`~onnxsmith.optimizer.inspect_sparsity.inspect_sparsity`): along the input axis,
    quantized output for sparse INT8, Conv form for sparse tactics."""
    nodes = {node.name or node.outputs[0].name: node for node in graph.nodes}
    tensors = graph.tensors()
    findings = []
    for row in inspect_sparsity(model, [(2, 4)]):
        node = nodes[row.node]
        if row.pattern != "2:4":
            values = np.asarray(tensors[row.weight].values)
            out_axis = 0 if row.op == "Conv" else {values.ndim - 2: values.ndim - 1,
                                                   values.ndim - 1: values.ndim - 2}.get(row.axis)
            if out_axis is not None and np.any(values == 0) and satisfies_nm(values, 2, 4, out_axis):
                findings.append(Finding("warning", "sparse-axis", row.node, "weight is 2:4 along the output "
                                        "channels, not along the input channels TensorRT's sparse kernels read",
                                        "prune along the input axis (prune-nm)"))
            continue
        if _dequantized_source(node.inputs[0]) is not None and not _output_quantized(node):
            findings.append(Finding("warning", "sparse-int8-output", row.node, "sparse INT8 GEMM with a float "
                                    "output: TensorRT's sparse INT8 kernels need INT8 in and out",
                                    "quantize its output too (int8-qdq sparse_outputs=true, recipe esparse24-w8a8)"))
        if row.op != "Conv":
            findings.append(Finding("info", "sparse-matmul-form", row.node, f"2:4 {row.op}: TensorRT seldom "
                                    "picks sparse tactics for MatMul", "rewrite as a 1x1 Conv "
                                    "(sparse-gemm-to-conv pass)"))
    return findings


def _dequantized_source(tensor: gs.Tensor) -> int | None:
    """The quantized type behind ``tensor`` when it is a DQ output (through layout ops), else None."""
    while tensor.inputs and tensor.inputs[0].op in LAYOUT_OPS:
        tensor = tensor.inputs[0].inputs[0]
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        dq = tensor.inputs[0]
        return _elem_type(dq.inputs[0], dq) or TP.INT8
    return None


def _output_quantized(node: gs.Node) -> bool:
    """Whether the GEMM's output reaches a QuantizeLinear (through a bias Add or layout ops)."""
    tensor = node.outputs[0]
    for _ in range(3):
        readers = tensor.outputs
        if any(reader.op == "QuantizeLinear" for reader in readers):
            return True
        passing = [r for r in readers if r.op in ("Add", *LAYOUT_OPS)]
        if len(passing) != 1:
            return False
        tensor = passing[0].outputs[0]
    return False


def _gemm_activation_dtype(dq: gs.Node) -> np.dtype | None:
    """The dtype of the activation a weight DQ's GEMM multiplies it with (None when unknown)."""
    for reader in dq.outputs[0].outputs:
        gemm = reader
        while gemm.op in ("Transpose", "Reshape") and gemm.outputs[0].outputs:
            gemm = gemm.outputs[0].outputs[0]
        if gemm.op in GEMM_OPS and gemm.inputs[0].dtype is not None:
            return np.dtype(gemm.inputs[0].dtype)
    return None


def _elem_type(tensor: gs.Tensor, node: gs.Node) -> int | None:
    """ONNX element type of a Q output / DQ input: the constant's, else from the zero point, else the tensor's."""
    if isinstance(tensor, gs.Constant):
        return _proto_type(tensor)
    if len(node.inputs) > 2 and node.inputs[2].name and isinstance(node.inputs[2], gs.Constant):
        return _proto_type(node.inputs[2])
    if tensor.dtype is not None:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    return TP.UINT8 if node.op == "QuantizeLinear" else None  # QuantizeLinear's default output type


def _proto_type(constant: gs.Constant) -> int:
    export = getattr(constant, "export_dtype", None)
    if export is not None:
        return export if isinstance(export, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(export))
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(constant.values).dtype)


def _as_numbers(values: np.ndarray) -> np.ndarray:
    """Zero points as numbers (FP8 / INT4 custom dtypes compare as float)."""
    try:
        return values.astype(np.float32)
    except (TypeError, ValueError):
        return values.view(np.uint8).astype(np.float32)


def _is_per_axis(node: gs.Node) -> bool:
    scale = constant_value(node.inputs[1])
    return scale is not None and scale.size > 1


def _same_params(quantize: gs.Node, dequantize: gs.Node) -> bool:
    pairs = [(quantize.inputs[1], dequantize.inputs[1])]
    if len(quantize.inputs) > 2 or len(dequantize.inputs) > 2:
        pairs.append((quantize.inputs[2] if len(quantize.inputs) > 2 else None,
                      dequantize.inputs[2] if len(dequantize.inputs) > 2 else None))
    for a, b in pairs:
        if a is b:
            continue
        va, vb = (None if t is None else constant_value(t) for t in (a, b))
        if va is None or vb is None or va.shape != vb.shape or not np.array_equal(_as_numbers(va), _as_numbers(vb)):
            return False
    return quantize.attrs.get("axis", 1) == dequantize.attrs.get("axis", 1) or constant_value(quantize.inputs[1]).size == 1


def _shape(tensor: gs.Tensor) -> list | None:
    if isinstance(tensor, gs.Constant):
        return list(np.asarray(tensor.values).shape)
    return list(tensor.shape) if tensor.shape is not None else None
