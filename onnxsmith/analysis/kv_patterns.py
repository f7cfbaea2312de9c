"""KV-cache detection: which tensors an attention layer stores as keys and values, and who reads them.

An **attention** is a ``MatMul`` of two activations (``Q @ Kᵀ``) whose output reaches a ``Softmax`` through
scaling / masking ops, followed by a ``MatMul`` reading the probabilities as its first input (``P @ V``). Its key
and value operands are traced back through layout ops (Transpose, Reshape, (Un)Squeeze, Expand, Tile, Identity,
Cast, Quantize/DequantizeLinear) to the **stored** tensor: the input of a ``Concat`` with a graph input (the past
cache; the Concat output is the present) that is not the past itself, or, without a cache, the first tensor made
by anything else. Layers sharing K/V (cross-layer attention) trace to the same stored tensor, which then lists
every consumer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

LAYOUT_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Tile", "Identity", "Cast", "Flatten",
              "QuantizeLinear", "DequantizeLinear")
SCORE_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity")
SCORE_DEPTH = 4
"""How many scaling / masking nodes may lie between ``Q @ Kᵀ`` and its Softmax."""


@dataclass
class Attention:
    """One attention: its ``Q @ Kᵀ`` and ``P @ V`` MatMul nodes."""

    scores: gs.Node
    mix: gs.Node


@dataclass
class StoredKV:
    """A tensor an attention stores as keys or values, with the attention MatMuls that read it."""

    tensor: gs.Tensor
    kind: str
    """'key' or 'value'."""
    consumers: list[str] = field(default_factory=list)
    """The ``Q @ Kᵀ`` (keys) or ``P @ V`` (values) MatMul nodes reading the tensor."""
    past: str | None = None
    """The graph input holding the cached part (None when the graph has no cache)."""
    present: str | None = None
    """The Concat output (past + new), i.e. the cache after this step."""


def find_attentions(graph: gs.Graph) -> list[Attention]:
    """Every ``softmax(Q @ Kᵀ) @ V`` of ``graph``, in graph order."""
    found = []
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        scores = _scores_matmul(node.inputs[0])
        mix = next((reader for reader in _through(node.outputs[0], ("Identity", "Cast", "Where"))
                    if reader.op == "MatMul" and _is_activation(reader.inputs[1])), None)
        if scores is not None and mix is not None:
            found.append(Attention(scores, mix))
    return found


def find_stored_kv(graph: gs.Graph) -> list[StoredKV]:
    """The stored key and value tensors of every attention, one entry per tensor, in graph order."""
    graph_inputs = {tensor.name for tensor in graph.inputs}
    stored: dict[str, StoredKV] = {}
    for attention in find_attentions(graph):
        for node, kind in ((attention.scores, "key"), (attention.mix, "value")):
            tensor, past, present = trace_stored(node.inputs[1], graph_inputs)
            entry = stored.setdefault(tensor.name, StoredKV(tensor, kind, past=past, present=present))
            if entry.kind != kind:
                raise ValueError(f"tensor {tensor.name!r} is read both as keys and as values")
            entry.consumers.append(node.name)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    return sorted(stored.values(), key=lambda entry: order.get(_producer_name(entry.tensor), -1))


def trace_stored(operand: gs.Tensor, graph_inputs: set[str]) -> tuple[gs.Tensor, str | None, str | None]:
    """The stored tensor behind an attention operand, with the past input and present tensor of its cache."""
    path = trace_path(operand, graph_inputs)
    tensor = path[-1]
    if len(path) > 1 and path[-2].inputs and path[-2].inputs[0].op == "Concat":
        concat = path[-2].inputs[0]
        past = next(t.name for t in concat.inputs if t.name in graph_inputs)
        return tensor, past, concat.outputs[0].name
    return tensor, None, None


def trace_path(operand: gs.Tensor, graph_inputs: set[str]) -> list[gs.Tensor]:
    """The tensors from an attention operand back to its stored tensor (last), through layout ops and the cache
    ``Concat`` (one graph input, the past, and one new tensor)."""
    path = [operand]
    while path[-1].inputs:
        producer = path[-1].inputs[0]
        if producer.op in LAYOUT_OPS:
            path.append(producer.inputs[0])
            continue
        if producer.op == "Concat":
            new = [t for t in producer.inputs if t.name not in graph_inputs]
            if len(producer.inputs) == 2 and len(new) == 1:
                path.append(new[0])
                break
        break
    return path


def _scores_matmul(tensor: gs.Tensor) -> gs.Node | None:
    """The activation x activation MatMul behind a Softmax input, through up to ``SCORE_DEPTH`` score ops."""
    pending = deque([(tensor, 0)])
    while pending:
        current, depth = pending.popleft()
        if not current.inputs:
            continue
        producer = current.inputs[0]
        if producer.op == "MatMul":
            if all(_is_activation(t) for t in producer.inputs[:2]):
                return producer
            continue
        if producer.op in SCORE_OPS and depth < SCORE_DEPTH:
            pending.extend((t, depth + 1) for t in producer.inputs if _is_activation(t))
    return None


def _through(tensor: gs.Tensor, ops: tuple[str, ...]) -> list[gs.Node]:
    """Readers of ``tensor``, looking through nodes of ``ops``."""
    readers, pending = [], deque([tensor])
    while pending:
        for reader in pending.popleft().outputs:
            if reader.op in ops:
                pending.extend(reader.outputs)
            else:
                readers.append(reader)
    return readers


def _is_activation(tensor: gs.Tensor) -> bool:
    """A computed or input float tensor (not a constant)."""
    return not isinstance(tensor, gs.Constant)


def _producer_name(tensor: gs.Tensor) -> str:
    return tensor.inputs[0].name if tensor.inputs else ""
