"""Lossless: evaluate subgraphs whose inputs are all constant (onnx-graphsurgeon's ``fold_constants``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.pass_base import Pass, PassContext, PassResult, Tolerance
from dataclasses import dataclass

from onnxsmith.core.graph import SCALAR_CONSTANT_ATTRIBUTES, all_graphs, export_graph, import_graph
from onnxsmith.core.options import PassOptions, option

SUBGRAPH_OPS = ("If", "Loop", "Scan")
DEFAULT_SIZE_THRESHOLD = 16 * 2**20
"""Folded tensors larger than this (bytes) are left unfolded, so folding never bloats the model."""


@dataclass(frozen=True)
class ConstantFoldingOptions(PassOptions):
    size_threshold: int = option(DEFAULT_SIZE_THRESHOLD, "fold results up to this many bytes", minimum=0)


class ConstantFolding(Pass):
    """Fold constant subexpressions, including shape arithmetic that shape inference resolved.

    Results larger than ``size_threshold`` bytes are not folded (e.g. the transpose of a tied embedding matrix,
    which would duplicate it). ``If`` nodes with a constant condition are flattened into the graph; for graphs
    with subgraphs the result without flattening is the declared fallback.
    """

    name = "constant-folding"
    description = "fold constant subexpressions and resolved shape arithmetic (onnx-graphsurgeon)"
    lossless = True
    tolerance = Tolerance(atol=1e-5, rtol=1e-4)
    Options = ConstantFoldingOptions

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        if not any(node.op_type in SUBGRAPH_OPS for node in model.graph.node):
            return self._fold(model, flatten_subgraphs=True)
        # onnx-graphsurgeon can leave a flattened If's outputs unproduced (Silero VAD): keep them as If nodes then.
        # Folding edits the subgraphs it reads, so each attempt folds its own copy.
        result = self._fold(_copy(model), flatten_subgraphs=True)
        result.fallbacks.append(("If nodes kept", self._fold(_copy(model), flatten_subgraphs=False)))
        return result

    def _fold(self, model: onnx.ModelProto, *, flatten_subgraphs: bool) -> PassResult:
        graph = import_graph(model)
        _typed_constant_attributes(graph)
        before = len(graph.nodes)
        graph.fold_constants(fold_shapes=True, size_threshold=self.options.size_threshold, error_ok=True,
                             flatten_subgraphs=flatten_subgraphs)
        graph.cleanup(remove_unused_graph_inputs=False)
        removed = before - len(graph.nodes)
        if removed == 0:
            return PassResult(model, False, {"nodes_folded": 0})
        return PassResult(export_graph(graph, model), True, {"nodes_folded": removed})


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _typed_constant_attributes(graph: gs.Graph) -> None:
    """Rewrite ``Constant`` nodes holding ``value_float(s)``/``value_int(s)`` into the equivalent ``value`` tensor of
    the ONNX type (float32 / int64), in place.

    onnx-graphsurgeon folds those attributes through numpy's default types, so ``value_float`` became a float64
    initializer that no float32 consumer accepts (onnxruntime then refuses the model).
    """
    for g in all_graphs(graph):
        for node in g.nodes:
            if node.op != "Constant":
                continue
            for attribute, dtype in SCALAR_CONSTANT_ATTRIBUTES.items():
                if attribute in node.attrs:
                    values = np.array(node.attrs.pop(attribute), dtype=dtype)
                    node.attrs["value"] = gs.Constant(f"{node.outputs[0].name}_value", values)
