"""Lossy: int8 QDQ on the keys and values an attention stores in its KV cache, placed at the producer.

Every stored tensor :func:`onnxsmith.analysis.kv_patterns.find_stored_kv` finds (the new tokens' keys after the
rotary embedding, and values, before they are concatenated to the past) gets one symmetric int8
``QuantizeLinear -> DequantizeLinear`` pair read by all its readers, so the cache holds int8-representable values
and every consumer layer (two under cross-layer attention) reads the same quantized tensor. ``granularity``:
``"per-tensor"`` (one scale) or ``"per-head"`` (one scale per index of ``head_axis``; axis 1 of the
``[batch, heads, seq, head_dim]`` cache layout). Scales come from the tensor's min/max over the calibration data.
After insertion every consumer is traced again and must reach its tensor's QDQ pair, or the pass fails.
``kv_cache="none"`` leaves the model unchanged (recipes turn the pass on with ``--kv-cache int8``).

The model's inputs and outputs keep their float type: a runtime that stores the cache as int8 (TensorRT, or a
serving loop around onnxruntime) holds one byte per element plus the scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.observers import MinMaxObserver, Observer, PerChannelMinMaxObserver
from onnxsmith.calibration.qparams import symmetric_scale
from onnxsmith.core.options import PassOptions, option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.core.graph import export_graph, import_graph
from onnxsmith.analysis.kv_patterns import StoredKV, find_stored_kv, trace_path
from onnxsmith.rewrite.qdq_nodes import insert_qdq

KV_DTYPES = ("int8", "none")
GRANULARITIES = ("per-tensor", "per-head")


@dataclass(frozen=True)
class KvCacheOptions(PassOptions):
    kv_cache: str = option("int8", "store the cache as int8, or leave it float (none)", choices=KV_DTYPES)
    granularity: str = option("per-tensor", "one scale per stored tensor, or one per KV head", choices=GRANULARITIES)
    head_axis: int = option(1, "the heads axis of the stored tensors (per-head scales)", minimum=0)


class KvCacheQuantize(Pass):
    """Int8 QDQ on stored K/V tensors at their producer; see the module docstring."""

    name = "kv-cache-qdq"
    description = "int8 KV cache: QDQ on the stored keys/values at the producing layer, checked at every consumer"
    lossless = False
    needs_calibration = True
    min_opset = 13
    Options = KvCacheOptions

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        if self.options.kv_cache == "none":
            return {}
        return {entry.tensor.name: self._observer(entry.tensor.name) for entry in find_stored_kv(import_graph(model))}

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        if self.options.kv_cache == "none":
            return PassResult(model, False, {"kv_cache": "none"})
        graph = import_graph(model)
        stored = find_stored_kv(graph)
        details = []
        for entry in stored:
            details.append(self._quantize(graph, entry, context.calibration[entry.tensor.name]))
        _check_consumers(graph, stored, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {
            "kv_tensors_quantized": len(stored),
            "keys": sum(entry.kind == "key" for entry in stored),
            "values": sum(entry.kind == "value" for entry in stored),
            "shared_across_layers": sum(len(entry.consumers) > 1 for entry in stored),
            "granularity": self.options.granularity,
        }
        modified = bool(stored)
        return PassResult(export_graph(graph, model) if modified else model, modified, changes, details)

    def _observer(self, name: str) -> Observer:
        if self.options.granularity == "per-head":
            return PerChannelMinMaxObserver(self.options.head_axis, name=name)
        return MinMaxObserver(name=name)

    def _quantize(self, graph: gs.Graph, entry: StoredKV, observer: Observer) -> dict:
        """Insert the entry's QDQ pair for all readers of its tensor; returns the detail."""
        if observer.count == 0:
            raise ValueError(f"stored {entry.kind} tensor {entry.tensor.name!r} saw no calibration values")
        amax = np.maximum(np.abs(np.asarray(observer.min)), np.abs(np.asarray(observer.max)))
        scale = symmetric_scale(amax, bits=8)
        axis = self.options.head_axis if self.options.granularity == "per-head" else None
        zero_point = np.zeros(scale.shape, dtype=np.int8)
        readers = [(node, i) for node in list(entry.tensor.outputs)
                   for i, tensor in enumerate(node.inputs) if tensor is entry.tensor]
        dequantized = insert_qdq(graph, entry.tensor, scale, zero_point, prefix=f"{entry.tensor.name}_kv", axis=axis)
        for node, index in readers:
            node.inputs[index] = dequantized
        return {"tensor": entry.tensor.name, "kind": f"kv-{entry.kind}", "dtype": "int8",
                "granularity": self.options.granularity, "scale": np.asarray(scale).tolist(), "qdq": dequantized.name,
                "past": entry.past, "present": entry.present, "consumers": list(entry.consumers)}


def _check_consumers(graph: gs.Graph, stored: list[StoredKV], details: list[dict]) -> None:
    """Every consumer of a stored tensor must now read that tensor's QDQ output (through layout ops / the cache)."""
    graph_inputs = {tensor.name for tensor in graph.inputs}
    nodes = {node.name: node for node in graph.nodes}
    for entry, detail in zip(stored, details, strict=True):
        for name in entry.consumers:
            if detail["qdq"] not in {t.name for t in trace_path(nodes[name].inputs[1], graph_inputs)}:
                raise ValueError(f"{entry.kind} consumer {name!r} does not read the QDQ of {entry.tensor.name!r}")
        detail["validated_consumers"] = len(entry.consumers)
