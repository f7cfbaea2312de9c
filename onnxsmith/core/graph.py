"""Graph helpers: moving between ``onnx.ModelProto`` and onnx-graphsurgeon graphs, names, constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxsmith.core.int4 import int4_initializer


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's main graph as an onnx-graphsurgeon graph."""
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` as a model that keeps ``like``'s model-level fields (IR version, metadata, producer).

    The IR version is raised when the graph's opsets need a newer one.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    needed_ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(like.ir_version, needed_ir)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The main graph followed by every nested subgraph (If/Loop/Scan bodies, recursively)."""
    return [graph, *graph.subgraphs(recursive=True)]


SUBGRAPH_SKIP_REASON = "inside an If/Loop/Scan subgraph (only the main graph is rewritten)"
"""The skip reason reported for target nodes that a main-graph pass finds in nested subgraphs."""


def subgraph_node_names(graph: gs.Graph, ops: tuple[str, ...]) -> list[str]:
    """Names of the nodes of type ``ops`` in nested subgraphs (unnamed ones by their first output), which passes that
    rewrite only the main graph leave alone and report as skipped."""
    return [node.name or (node.outputs[0].name if node.outputs else node.op)
            for sub in graph.subgraphs(recursive=True) for node in sub.nodes if node.op in ops]


def unique_name(names: set[str], base: str) -> str:
    """``base``, or ``base`` with the smallest numeric suffix not in ``names``; the result is added to ``names``."""
    name, suffix = base, 1
    while name in names:
        name, suffix = f"{base}{suffix}", suffix + 1
    names.add(name)
    return name


def store_as_int4(model: onnx.ModelProto, names: set[str]) -> None:
    """Re-store the named initializers (int8 arrays holding levels ``-8 .. 7``) as packed ONNX ``INT4`` tensors.

    onnx-graphsurgeon 0.6.1 cannot export INT4 constants, so passes build them as int8 and convert after export.
    """
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in names:
            model.graph.initializer[index].CopyFrom(int4_initializer(tensor.name, numpy_helper.to_array(tensor)))


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a ``Constant`` node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return None if value is None else np.asarray(value.values)
    return None


SCALAR_CONSTANT_ATTRIBUTES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}
"""``Constant`` attributes holding plain numbers, with the element type each stands for."""
