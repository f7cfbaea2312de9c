"""Lossless: replace ``Constant`` nodes by initializers (exporters often store weights as Constant nodes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.core.graph import SCALAR_CONSTANT_ATTRIBUTES, all_graphs, export_graph, import_graph


class ConstantsToInitializers(Pass):
    """Turn every dense ``Constant`` node (main graph and subgraphs) into an initializer of the same value.

    Constants that are graph outputs and ``sparse_value``/string constants stay as nodes.
    """

    name = "constants-to-initializers"
    description = "replace Constant nodes by initializers"
    lossless = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        converted = 0
        for g in all_graphs(graph):
            outputs = {id(t) for t in g.outputs}
            for node in list(g.nodes):
                if node.op != "Constant" or id(node.outputs[0]) in outputs:
                    continue
                values = _constant_values(node)
                if values is None:
                    continue
                tensor = node.outputs[0]
                node.outputs.clear()
                tensor.to_constant(values)
                g.nodes.remove(node)
                converted += 1
        if not converted:
            return PassResult(model, False, {"converted": 0})
        return PassResult(export_graph(graph, model), True, {"converted": converted})


def _constant_values(node: gs.Node) -> np.ndarray | None:
    if "value" in node.attrs:
        value = node.attrs["value"]
        return value.values if isinstance(value, gs.Constant) else None
    for attribute, dtype in SCALAR_CONSTANT_ATTRIBUTES.items():
        if attribute in node.attrs:
            return np.array(node.attrs[attribute], dtype=dtype)
    return None
