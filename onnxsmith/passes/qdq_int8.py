"""Lossy: INT8 QDQ on the inputs of Conv, Gemm and MatMul, placed the way TensorRT fuses them.

Weights (constant inputs) become per-output-channel symmetric int8 initializers read through a
``DequantizeLinear`` (Conv axis 0, Gemm axis 0 with ``transB=1`` else 1, MatMul the last axis). Activations get
one per-tensor ``QuantizeLinear -> DequantizeLinear`` pair each, shared by all quantized consumers: uint8 with a
zero point (onnxruntime's fast CPU path) or int8 with zero point 0 (TensorRT). Activation x activation MatMuls
get QDQ on both inputs. Nothing else is touched: LayerNorm, Softmax, residual Adds, Where, shape arithmetic and
integer or boolean tensors keep their float (or original) inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.observers import HistogramObserver, MinMaxObserver, Observer, ReservoirObserver
from onnxsmith.calibration.qparams import asymmetric_qparams, symmetric_scale
from onnxsmith.calibration.range_search import search_range
from onnxsmith.calibration.sparsity import satisfies_nm
from onnxsmith.calibration.twin_uniform import search_twin
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult
from onnxsmith.passes.graph_utils import SUBGRAPH_SKIP_REASON, export_graph, import_graph, subgraph_node_names
from onnxsmith.passes.patterns import find_activation_sites
from onnxsmith.passes.qdq_nodes import (
    insert_qdq,
    insert_twin,
    insert_twin_parts,
    is_float,
    quantize_weight,
    split_gemm,
    weight_input_axis,
    weight_site,
)

TARGET_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ACT_DTYPES = {"uint8": np.uint8, "int8": np.int8}
TWIN_FORMS = ("fake-quant", "dual-gemm")


@dataclass
class Placement:
    """Where QDQ goes: weight inputs (node, input index, axis), activation tensors, and skipped nodes."""

    weights: list[tuple[gs.Node, int, int]] = field(default_factory=list)
    """(node reading the constant weight, input index, output-channel axis)."""
    activations: dict[str, list[tuple[gs.Node, int]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    twin_layouts: dict[str, str] = field(default_factory=dict)
    """Activations that get a twin-uniform quantizer instead, with their layout ('softmax' or 'gelu')."""
    sparse_gemms: list[gs.Node] = field(default_factory=list)
    """Quantized nodes whose weight is 2:4 sparse on the input axis (their outputs are quantized with
    ``sparse_outputs``)."""


class QuantizeInt8(Pass):
    """W8A8 QDQ insertion; see the module docstring for the placement rules.

    ``calibrator`` picks the activation range search. ``twin=True`` gives post-Softmax and post-GELU GEMM inputs
    PTQ4ViT's 8-bit twin-uniform quantizer instead (steps searched on a bounded sample by MSE), in one of two
    ``twin_form``s: ``"fake-quant"`` (per branch ``Clip -> Q -> DQ`` with int8 zero point 0, joined by
    ``Where``) or ``"dual-gemm"`` (``X = X_R1 + X_R2``, each a plain QDQ tensor, so every consuming GEMM is
    duplicated and summed: two integer GEMMs a runtime can fuse, no ``Where`` before the GEMM). ``exclude_nodes`` (exact names), ``exclude_ops`` (op types)
    and ``exclude_regex`` (patterns matched against node names, e.g. ``"lm_head|router|gate$"``) keep nodes in
    float. ``activation_matmuls=False`` leaves MatMuls with two activation inputs (attention) in float.
    ``sparse_outputs=True`` also quantizes the output of every quantized GEMM/Conv whose weight is 2:4 sparse on
    its input axis (unless it is a graph output): TensorRT runs sparse INT8 kernels only with INT8 in and out.
    """

    name = "int8-qdq"
    description = "INT8 QDQ: per-channel int8 weights, per-tensor activations on Conv/Gemm/MatMul inputs"
    lossless = False
    needs_calibration = True
    min_opset = 13

    def __init__(
        self,
        act_dtype: str = "uint8",
        calibrator: str = "minmax",
        percentile: float = 99.999,
        activation_matmuls: bool = True,
        twin: bool = False,
        twin_form: str = "fake-quant",
        exclude_nodes: Sequence[str] = (),
        exclude_ops: Sequence[str] = (),
        exclude_regex: Sequence[str] = (),
        sparse_outputs: bool = False,
    ) -> None:
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {sorted(ACT_DTYPES)}, got {act_dtype!r}")
        if calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {list(CALIBRATORS)}, got {calibrator!r}")
        self.act_dtype = act_dtype
        self.calibrator = calibrator
        self.percentile = percentile
        self.activation_matmuls = activation_matmuls
        if twin_form not in TWIN_FORMS:
            raise ValueError(f"twin_form must be one of {list(TWIN_FORMS)}, got {twin_form!r}")
        self.twin = twin
        self.twin_form = twin_form
        self.exclude_nodes = set(exclude_nodes)
        self.exclude_ops = set(exclude_ops)
        self.exclude_patterns = [re.compile(p) for p in exclude_regex]
        self.sparse_outputs = sparse_outputs

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        placement = self.place(import_graph(model))
        return {
            name: ReservoirObserver(name=name) if name in placement.twin_layouts else self._observer(name)
            for name in placement.activations
        }

    def place(self, graph: gs.Graph) -> Placement:
        """Decide the QDQ placement for ``graph`` (no edits)."""
        placement = Placement()
        for node in graph.nodes:
            if node.op not in TARGET_OPS:
                continue
            reason = self._exclusion(node)
            if reason is None:
                reason = self._place_node(node, placement)
            if reason is not None:
                placement.skipped[node.name] = reason
        for name in subgraph_node_names(graph, TARGET_OPS):
            placement.skipped[name] = SUBGRAPH_SKIP_REASON
        self._place_sparse_outputs(graph, placement)
        if self.twin:
            for site in find_activation_sites(graph):
                if site.kind in ("softmax", "gelu") and site.tensor.name in placement.activations:
                    placement.twin_layouts[site.tensor.name] = site.kind
        return placement

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        placement = self.place(graph)
        weights_quantized, details = quantize_weights(graph, placement.weights)
        tensors = graph.tensors()
        # Twin tensors last: the dual-GEMM form replaces their consumers, which must already read their other
        # quantized inputs.
        ordered = sorted(placement.activations.items(), key=lambda item: item[0] in placement.twin_layouts)
        for name, consumers in ordered:
            if name in placement.twin_layouts:
                params = search_twin(context.calibration[name].sample, placement.twin_layouts[name], bits=8)
                detail = {"tensor": name, "kind": "activation", "dtype": f"twin-{params.layout}",
                          "form": self.twin_form, "delta_r1": params.delta_r1, "delta_r2": params.delta_r2,
                          "split": params.split, "consumers": [node.name for node, _ in consumers]}
                if self.twin_form == "dual-gemm":
                    parts = insert_twin_parts(graph, tensors[name], params)
                    for node, index in consumers:
                        split_gemm(graph, node, index, parts)
                    details.append(detail)
                    continue
                dequantized = insert_twin(graph, tensors[name], params)
            else:
                scale, zero_point, value_range = self._activation_qparams(context.calibration[name])
                dequantized = insert_qdq(graph, tensors[name], scale, zero_point)
                detail = {"tensor": name, "kind": "activation", "dtype": self.act_dtype, "range": value_range,
                          "scale": float(scale), "zero_point": int(zero_point)}
            for node, index in consumers:
                node.inputs[index] = dequantized
            details.append({**detail, "consumers": [node.name for node, _ in consumers]})
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {
            "weights_quantized": weights_quantized,
            "activations_quantized": len(placement.activations),
            "twin_uniform": len(placement.twin_layouts),
            "nodes_skipped": len(placement.skipped),
        }
        details += [{"node": name, "kind": "skipped", "reason": reason} for name, reason in placement.skipped.items()]
        modified = bool(weights_quantized or placement.activations)
        return PassResult(export_graph(graph, model) if modified else model, modified, changes, details)

    def _exclusion(self, node: gs.Node) -> str | None:
        if node.name in self.exclude_nodes:
            return "excluded by name"
        if node.op in self.exclude_ops:
            return "excluded by op type"
        for pattern in self.exclude_patterns:
            if pattern.search(node.name):
                return f"excluded by pattern {pattern.pattern!r}"
        return None

    def _place_node(self, node: gs.Node, placement: Placement) -> str | None:
        data, weight = node.inputs[0], node.inputs[1]
        if any(tensor.inputs and tensor.inputs[0].op == "DequantizeLinear" for tensor in (data, weight)):
            return "already quantized (reads a DequantizeLinear output)"
        if not is_float(data) or not is_float(weight):
            return "input type is not float (or unknown: run shape-inference first)"
        if isinstance(data, gs.Constant):
            return "constant first input"
        site = weight_site(node)
        if site is not None:
            if site[2] is None:
                return "weight layout not supported for per-channel quantization"
            placement.weights.append(site)
            activation_inputs = [0]
        elif node.op == "MatMul" and self.activation_matmuls:
            activation_inputs = [0, 1]
        elif node.op == "MatMul":
            return "activation x activation MatMul (activation_matmuls is off)"
        else:
            return "non-constant weight"
        for index in activation_inputs:
            placement.activations.setdefault(node.inputs[index].name, []).append((node, index))
        if self.sparse_outputs and site is not None and _is_two_four(node, site):
            placement.sparse_gemms.append(node)
        return None

    @staticmethod
    def _place_sparse_outputs(graph: gs.Graph, placement: Placement) -> None:
        """Quantize each 2:4 GEMM's float output for all its readers (a graph output keeps its float value)."""
        graph_outputs = {tensor.name for tensor in graph.outputs}
        for node in placement.sparse_gemms:
            output = node.outputs[0]
            if output.name in graph_outputs or not is_float(output) or not output.outputs:
                continue
            readers = placement.activations.setdefault(output.name, [])
            for reader in output.outputs:
                for index, tensor in enumerate(reader.inputs):
                    if tensor is output and (reader, index) not in readers:
                        readers.append((reader, index))

    def _observer(self, name: str) -> Observer:
        return MinMaxObserver(name=name) if self.calibrator == "minmax" else HistogramObserver(name=name)

    def _activation_qparams(self, observer: Observer) -> tuple[np.ndarray, np.ndarray, list[float]]:
        symmetric = self.act_dtype == "int8"
        options = {"percentile": self.percentile} if self.calibrator == "percentile" else {}
        lo, hi = search_range(observer, self.calibrator, bits=8, symmetric=symmetric, **options)
        if symmetric:
            scale = np.float32(symmetric_scale(max(abs(lo), abs(hi)), bits=8))
            return scale, np.int8(0), [float(lo), float(hi)]
        scale, zero_point = asymmetric_qparams(lo, hi, np.uint8)
        return np.float32(scale), np.uint8(zero_point), [float(lo), float(hi)]


def quantize_weights(graph: gs.Graph, sites: Sequence[tuple[gs.Node, int, int]]) -> tuple[int, list[dict]]:
    """Replace each weight site's constant by a per-channel int8 ``DequantizeLinear`` (one per weight and axis,
    shared by its readers); returns how many weights were quantized and one detail per weight."""
    details: list[dict] = []
    dequantized: dict[tuple[str, int], gs.Variable] = {}
    for node, index, axis in sites:
        weight = node.inputs[index]
        key = (weight.name, axis)
        if key not in dequantized:  # a tied weight read along another axis needs its own tensor names
            seen = any(name == weight.name for name, _ in dequantized)
            prefix = f"{weight.name}_axis{axis}" if seen else weight.name
            dequantized[key], detail = quantize_weight(graph, weight, axis, prefix=prefix)
            details.append(detail)
        node.inputs[index] = dequantized[key]
    return len(dequantized), details


def _is_two_four(node: gs.Node, site: tuple[gs.Node, int, int | None]) -> bool:
    """Whether the constant weight of ``node`` (entering at ``site``) is 2:4 sparse on its input axis."""
    reader, index, _ = site
    values = reader.inputs[index].values
    return values.ndim >= 2 and satisfies_nm(values, 2, 4, weight_input_axis(node, reader, index))
