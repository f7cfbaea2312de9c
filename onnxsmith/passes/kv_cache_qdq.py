"""Lossy: int8 QDQ on the keys and values an attention stores in its KV cache, placed at the producer.

Every stored tensor :func:`onnxsmith.passes.kv_patterns.find_stored_kv` finds (the new tokens' keys after the
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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.observers import MinMaxObserver, Observer, PerChannelMinMaxObserver
from onnxsmith.calibration.qparams import symmetric_scale
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult
from onnxsmith.passes.graph_utils import export_graph, import_graph
from onnxsmith.passes.kv_patterns import StoredKV, find_stored_kv, trace_path
from onnxsmith.passes.qdq_nodes import insert_qdq

KV_DTYPES = ("int8", "none")
GRANULARITIES = ("per-tensor", "per-head")


class KvCacheQuantize(Pass):
    """Int8 QDQ on stored K/V tensors at their producer; see the module docstring."""

    name = "kv-cache-qdq"
    description = "int8 KV cache: QDQ on the stored keys/values at the producing layer, checked at every consumer"
    lossless = False
    needs_calibration = True
    min_opset = 13

    def __init__(self, kv_cache: str = "int8", granularity: str = "per-tensor", head_axis: int = 1) -> None:
        if kv_cache not in KV_DTYPES:
            raise ValueError(f"kv_cache must be one of {list(KV_DTYPES)}, got {kv_cache!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        self.kv_cache, self.granularity, self.head_axis = kv_cache, granularity, head_axis

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        if self.kv_cache == "none":
            return {}
        return {entry.tensor.name: self._observer(entry.tensor.name) for entry in find_stored_kv(import_graph(model))}

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        if self.kv_cache == "none":
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
            "granularity": self.granularity,
        }
        modified = bool(stored)
        return PassResult(export_graph(graph, model) if modified else model, modified, changes, details)

    def _observer(self, name: str) -> Observer:
        if self.granularity == "per-head":
            return PerChannelMinMaxObserver(self.head_axis, name=name)
        return MinMaxObserver(name=name)

    def _quantize(self, graph: gs.Graph, entry: StoredKV, observer: Observer) -> dict:
        """Insert the entry's QDQ pair for all readers of its tensor; returns the detail."""
        if observer.count == 0:
            raise ValueError(f"stored {entry.kind} tensor {entry.tensor.name!r} saw no calibration values")
        amax = np.maximum(np.abs(np.asarray(observer.min)), np.abs(np.asarray(observer.max)))
        scale = symmetric_scale(amax, bits=8)
        axis = self.head_axis if self.granularity == "per-head" else None
        zero_point = np.zeros(scale.shape, dtype=np.int8)
        readers = [(node, i) for node in list(entry.tensor.outputs)
                   for i, tensor in enumerate(node.inputs) if tensor is entry.tensor]
        dequantized = insert_qdq(graph, entry.tensor, scale, zero_point, prefix=f"{entry.tensor.name}_kv", axis=axis)
        for node, index in readers:
            node.inputs[index] = dequantized
        return {"tensor": entry.tensor.name, "kind": f"kv-{entry.kind}", "dtype": "int8",
                "granularity": self.granularity, "scale": np.asarray(scale).tolist(), "qdq": dequantized.name,
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
