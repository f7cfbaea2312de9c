"""Lossless: remove nodes and initializers that no graph output depends on."""

from __future__ import annotations

import onnx

from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.core.graph import export_graph, import_graph


class RemoveDeadNodes(Pass):
    """Drop nodes and constants that do not reach a graph output; graph inputs are kept (the interface stays)."""

    name = "remove-dead-nodes"
    description = "remove nodes and initializers no output depends on"
    lossless = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        nodes_before = len(graph.nodes)
        constants_before = _constant_count(model)
        graph.cleanup(remove_unused_graph_inputs=False)
        cleaned = export_graph(graph, model)
        changes = {
            "nodes_removed": nodes_before - len(graph.nodes),
            "initializers_removed": constants_before - _constant_count(cleaned),
        }
        if not any(changes.values()):
            return PassResult(model, False, changes)
        return PassResult(cleaned, True, changes)


def _constant_count(model: onnx.ModelProto) -> int:
    return len(model.graph.initializer)
