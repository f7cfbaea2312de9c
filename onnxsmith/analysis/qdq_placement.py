"""Where INT8 QDQ goes in a graph, the way TensorRT fuses it (read-only: the quantizing passes edit).

Conv, Gemm and MatMul with a float constant weight (also behind a ``Transpose``) get their weight quantized per
output channel and their activation input quantized per tensor; activation x activation MatMuls get both inputs
quantized. Excluded nodes (exact names, op types, name patterns), nodes reading a ``DequantizeLinear`` output
(already quantized), non-float inputs and subgraph nodes are skipped, each with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxsmith.analysis.activation_patterns import find_activation_sites
from onnxsmith.analysis.weights import is_float, weight_input_axis, weight_site
from onnxsmith.core.graph import SUBGRAPH_SKIP_REASON, subgraph_node_names
from onnxsmith.core.sparsity import satisfies_nm

TARGET_OPS = ("Conv", "Gemm", "MatMul")


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


@dataclass(frozen=True)
class Int8Placer:
    """The placement rules of the module docstring.

    ``activation_matmuls=False`` leaves MatMuls with two activation inputs in float; ``twin`` marks post-Softmax
    and post-GELU GEMM inputs for a twin-uniform quantizer; ``sparse_outputs`` also quantizes the output of
    every quantized GEMM whose weight is 2:4 sparse on its input axis (unless it is a graph output): TensorRT
    runs sparse INT8 kernels only with INT8 in and out. ``kept_float`` maps node names to the reason a caller
    keeps them float (e.g. MoE routers).
    """

    activation_matmuls: bool = True
    twin: bool = False
    sparse_outputs: bool = False
    exclude_nodes: Sequence[str] = ()
    exclude_ops: Sequence[str] = ()
    exclude_regex: Sequence[str] = ()
    kept_float: dict[str, str] = field(default_factory=dict)

    def place(self, graph: gs.Graph) -> Placement:
        """Decide the QDQ placement for ``graph`` (no edits)."""
        placement = Placement()
        patterns = [re.compile(p) for p in self.exclude_regex]
        for node in graph.nodes:
            if node.op not in TARGET_OPS:
                continue
            reason = self._exclusion(node, patterns)
            if reason is None:
                reason = self._place_node(node, placement)
            if reason is not None:
                placement.skipped[node.name] = reason
        for name in subgraph_node_names(graph, TARGET_OPS):
            placement.skipped[name] = SUBGRAPH_SKIP_REASON
        _place_sparse_outputs(graph, placement)
        if self.twin:
            for site in find_activation_sites(graph):
                if site.kind in ("softmax", "gelu") and site.tensor.name in placement.activations:
                    placement.twin_layouts[site.tensor.name] = site.kind
        return placement

    def _exclusion(self, node: gs.Node, patterns: Iterable[re.Pattern]) -> str | None:
        if node.name in self.kept_float:
            return self.kept_float[node.name]
        if node.name in self.exclude_nodes:
            return "excluded by name"
        if node.op in self.exclude_ops:
            return "excluded by op type"
        for pattern in patterns:
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


def _is_two_four(node: gs.Node, site: tuple[gs.Node, int, int | None]) -> bool:
    """Whether the constant weight of ``node`` (entering at ``site``) is 2:4 sparse on its input axis."""
    reader, index, _ = site
    values = reader.inputs[index].values
    return values.ndim >= 2 and satisfies_nm(values, 2, 4, weight_input_axis(node, reader, index))
