"""Mixture-of-experts detection: routers, routed experts (dispatched or dense one-hot masked) and shared experts.

A **router** is a GEMM with a constant weight whose output (through Identity / Cast / Add) feeds a ``Softmax``,
with an ``ArgMax`` or ``TopK`` on the Softmax output or on the router logits: that node's output is the
**choice** tensor (the chosen expert of every token). The router's data input is the MoE **input**: one row per
token.

A **routed expert** is found from its gating product: a ``Mul`` one of whose operands descends from the router's
scores or choice without passing a GEMM and carries an expert index (``Equal(choice, e)``, a ``Gather`` of index ``e`` or a ``Slice``
``e:e+1`` on the expert axis), the other operand being the expert's output. The expert's GEMMs are the
constant-weight GEMMs behind that output, back to the MoE input. Two forms:

* **dispatch**: the expert reads ``Gather(input, rows)`` with rows from ``NonZero(Equal(choice, e))`` (or
  similar), so its tensors hold only its tokens;
* **dense**: the expert reads the MoE input itself, computes every token and is masked by a one-hot gate, so
  its tensors hold every token and the routed ones must be selected by the choice.

A **shared expert** is what else reads the MoE input with a constant-weight GEMM (the router and routed experts
excluded), with the GEMMs its outputs reach through non-GEMM nodes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxsmith.core.graph import constant_value

GEMM_OPS = ("MatMul", "Gemm")
PASS_THROUGH = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
WEIGHT_PASS_THROUGH = ("Identity", "Transpose", "Cast", "DequantizeLinear")
ROUTER_LOGIT_OPS = ("Identity", "Cast", "Add")
CHOICE_OPS = ("ArgMax", "TopK")
GATE_SEARCH_DEPTH = 12
"""How many nodes back from a gating Mul the search for the expert index and router scores may go."""
SHARED_EXPERT_DEPTH = 6
"""How many non-GEMM nodes the shared expert's inner GEMMs may lie behind its entry GEMMs."""


@dataclass
class RoutedExpert:
    """One routed expert: its index, its constant-weight GEMM nodes, and those that read its token input.

    ``dispatched``: the expert's tensors hold only its tokens; otherwise every token (dense form).
    """

    index: int
    gemms: list[str]
    entries: list[str]
    dispatched: bool


@dataclass
class MoeLayer:
    """A router with its experts; tensor and node names as in the graph."""

    router: str
    """The router GEMM node."""
    input: str
    """The MoE input tensor the router reads (one row per token)."""
    scores: str
    """The router's Softmax output."""
    choice: str
    """The chosen-expert indices (ArgMax output, or TopK indices)."""
    top_k: int
    experts: dict[int, RoutedExpert] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    """GEMM nodes of the shared expert(s)."""

    @property
    def form(self) -> str:
        """'dispatch' when every routed expert reads only its tokens, 'dense' when none does, else 'mixed'."""
        dispatched = {expert.dispatched for expert in self.experts.values()}
        return "dispatch" if dispatched == {True} else "dense" if dispatched == {False} else "mixed"

    def expert_of(self, node: str) -> int | None:
        """The routed expert owning GEMM ``node`` (None when it is not a routed expert's)."""
        for expert in self.experts.values():
            if node in expert.gemms:
                return expert.index
        return None


def find_moe_layers(graph: gs.Graph) -> list[MoeLayer]:
    """Every MoE layer of ``graph`` in graph order (empty when the graph has no router)."""
    layers = []
    for node in graph.nodes:
        if node.op == "Softmax":
            layer = _router_layer(node)
            if layer is not None:
                layers.append(layer)
    if not layers:
        return []
    for layer in layers:
        _find_routed_experts(graph, layer)
        _find_shared_experts(graph, layer)
    return [layer for layer in layers if layer.experts]


def has_constant_weight(node: gs.Node) -> bool:
    """Whether ``node`` is a MatMul/Gemm whose second input is a constant, possibly behind Identity, Transpose,
    Cast or a weight's ``DequantizeLinear``."""
    if node.op not in GEMM_OPS or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    while not isinstance(weight, gs.Constant) and weight.inputs and weight.inputs[0].op in WEIGHT_PASS_THROUGH:
        weight = weight.inputs[0].inputs[0]
    return isinstance(weight, gs.Constant)


def _router_layer(softmax: gs.Node) -> MoeLayer | None:
    """The MoE layer whose router feeds ``softmax``, or None when ``softmax`` is not a router's."""
    tensor = softmax.inputs[0]
    while tensor.inputs and tensor.inputs[0].op in ROUTER_LOGIT_OPS:
        producer = tensor.inputs[0]
        if producer.op == "Add" and not any(isinstance(t, gs.Constant) for t in producer.inputs):
            return None
        tensor = next(t for t in producer.inputs if not isinstance(t, gs.Constant))
    if not tensor.inputs or not has_constant_weight(tensor.inputs[0]):
        return None
    router = tensor.inputs[0]
    choice = _choice_reader(softmax.outputs[0]) or _choice_reader(router.outputs[0])
    if choice is None:
        return None
    top_k = 1
    if choice.op == "TopK":
        k = constant_value(choice.inputs[1])
        if k is None:
            return None
        top_k = int(k.ravel()[0])
    return MoeLayer(router.name, router.inputs[0].name, softmax.outputs[0].name, choice.outputs[-1 if choice.op ==
                                                                                                  "TopK" else 0].name,
                    top_k)


def _choice_reader(tensor: gs.Tensor) -> gs.Node | None:
    """The ArgMax / TopK reading ``tensor`` (directly or through Identity/Cast)."""
    pending = deque([tensor])
    while pending:
        for reader in pending.popleft().outputs:
            if reader.op in CHOICE_OPS:
                return reader
            if reader.op in ("Identity", "Cast"):
                pending.append(reader.outputs[0])
    return None


def _token_sources(graph: gs.Graph, layer: MoeLayer) -> set[str]:
    """The MoE input and the tensors equal to it up to a layout op (the rows every expert reads)."""
    tensors = graph.tensors()
    start = tensors[layer.input]
    sources = {start.name}
    tensor = start
    while tensor.inputs and tensor.inputs[0].op in PASS_THROUGH:
        tensor = tensor.inputs[0].inputs[0]
        sources.add(tensor.name)
    pending = deque(tensors[name] for name in list(sources))
    while pending:
        for reader in pending.popleft().outputs:
            if reader.op in PASS_THROUGH and reader.outputs[0].name not in sources:
                sources.add(reader.outputs[0].name)
                pending.append(reader.outputs[0])
    return sources


def _find_routed_experts(graph: gs.Graph, layer: MoeLayer) -> None:
    """Fill ``layer.experts`` from the gating products of the layer's router."""
    sources = _token_sources(graph, layer)
    router_tensors = {layer.scores, layer.choice}
    for node in graph.nodes:
        if node.op != "Mul" or len(node.inputs) != 2:
            continue
        for gate_side, out_side in ((0, 1), (1, 0)):
            gate, output = node.inputs[gate_side], node.inputs[out_side]
            if not _reaches(gate, router_tensors, through_gemms=False) \
                    or _reaches(output, router_tensors, through_gemms=False):
                continue
            index = _expert_index(gate, router_tensors)
            if index is None or index in layer.experts:
                continue
            expert = _expert_behind(output, sources, index, layer.router)
            if expert is not None:
                layer.experts[index] = expert
                break


def _reaches(tensor: gs.Tensor, targets: set[str], *, through_gemms: bool = True) -> bool:
    """Whether ``tensor`` descends from one of ``targets`` within ``GATE_SEARCH_DEPTH`` nodes."""
    return any(t.name in targets for t in _ancestors(tensor, GATE_SEARCH_DEPTH, through_gemms))


def _ancestors(tensor: gs.Tensor, depth: int, through_gemms: bool = True) -> Iterable[gs.Tensor]:
    """``tensor`` and the tensors it is computed from, up to ``depth`` nodes back (breadth first)."""
    pending, seen = deque([(tensor, 0)]), {tensor.name}
    while pending:
        current, level = pending.popleft()
        yield current
        if level >= depth or not current.inputs:
            continue
        producer = current.inputs[0]
        if not through_gemms and producer.op in GEMM_OPS:
            continue
        for parent in producer.inputs:
            if parent.name not in seen:
                seen.add(parent.name)
                pending.append((parent, level + 1))


def _expert_index(gate: gs.Tensor, router_tensors: set[str]) -> int | None:
    """The expert index a gate operand selects: from ``Equal(x, e)``, ``Gather(x, e)`` or ``Slice(x, e, e+1)``."""
    for tensor in _ancestors(gate, GATE_SEARCH_DEPTH, through_gemms=False):
        if tensor.name in router_tensors or not tensor.inputs:
            continue
        producer = tensor.inputs[0]
        if producer.op == "Equal":
            values = [value for value in map(constant_value, producer.inputs) if value is not None]
            if len(values) == 1 and values[0].size == 1:
                return int(values[0].ravel()[0])
        elif producer.op == "Gather":
            indices = constant_value(producer.inputs[1])
            if indices is not None and indices.size == 1 and _reaches(producer.inputs[0], router_tensors):
                return int(indices.ravel()[0])
        elif producer.op == "Slice":
            starts, ends = (constant_value(t) for t in producer.inputs[1:3])
            if starts is not None and ends is not None and starts.size == 1 \
                    and int(ends.ravel()[0]) == int(starts.ravel()[0]) + 1 \
                    and _reaches(producer.inputs[0], router_tensors):
                return int(starts.ravel()[0])
    return None


def _expert_behind(output: gs.Tensor, sources: set[str], index: int, router: str) -> RoutedExpert | None:
    """The routed expert computing ``output``: its constant-weight GEMMs back to the token rows."""
    gemms, entries, dispatched = [], [], None
    pending, seen = deque([output]), {output.name}
    while pending:
        tensor = pending.popleft()
        if tensor.name in sources or not tensor.inputs:
            continue
        producer = tensor.inputs[0]
        if producer.name == router:
            return None
        if producer.op == "Gather" and producer.inputs[0].name in sources:
            dispatched = True if dispatched is None else dispatched
            continue
        if has_constant_weight(producer):
            gemms.append(producer.name)
            row_source = _row_source(producer.inputs[0], sources)
            if row_source is not None:
                entries.append(producer.name)
                dispatched = (row_source == "gather") if dispatched is None else dispatched
        for parent in producer.inputs:
            if not isinstance(parent, gs.Constant) and parent.name not in seen:
                seen.add(parent.name)
                pending.append(parent)
    if not gemms or not entries:
        return None
    gemms.reverse()
    entries.reverse()
    return RoutedExpert(index, gemms, entries, bool(dispatched))


def _row_source(tensor: gs.Tensor, sources: set[str]) -> str | None:
    """'input' when ``tensor`` is the MoE input, 'gather' when it is a row gather of it, else None."""
    while tensor.name not in sources and tensor.inputs and tensor.inputs[0].op in ("Identity", "Cast"):
        tensor = tensor.inputs[0].inputs[0]
    if tensor.name in sources:
        return "input"
    if tensor.inputs and tensor.inputs[0].op == "Gather" and tensor.inputs[0].inputs[0].name in sources:
        return "gather"
    return None


def _find_shared_experts(graph: gs.Graph, layer: MoeLayer) -> None:
    """Fill ``layer.shared``: GEMMs reading the MoE input that are neither router nor routed, and their inner
    GEMMs."""
    sources = _token_sources(graph, layer)
    tensors = graph.tensors()
    routed = {name for expert in layer.experts.values() for name in expert.gemms}
    entries = [
        reader
        for name in sources
        for reader in tensors[name].outputs
        if has_constant_weight(reader) and reader.name != layer.router and reader.name not in routed
    ]
    shared = {node.name: node for node in entries}
    pending = deque((node.outputs[0], 0) for node in entries)
    while pending:
        tensor, level = pending.popleft()
        for reader in tensor.outputs:
            if reader.name in shared or reader.name in routed or reader.name == layer.router:
                continue
            if has_constant_weight(reader):
                shared[reader.name] = reader
            elif level < SHARED_EXPERT_DEPTH and reader.op not in ("ScatterElements", "ScatterND"):
                pending.extend((out, level + 1) for out in reader.outputs)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    layer.shared = sorted(shared, key=order.__getitem__)
