"""Lossy: INT8 QDQ for mixture-of-experts models, calibrated expert by expert (Hunyuan-Large's implications).

Placement and numerics are ``int8-qdq``'s (per-channel int8 weights, per-tensor activations), with three changes
for every MoE layer :func:`onnxsmith.analysis.moe_patterns.find_moe_layers` recognises:

* the **router** GEMM stays float and reads the float MoE input (``quantize_router=True`` quantizes it);
* a **routed expert's** activation inputs are calibrated only on the tokens routed to it
  (:class:`onnxsmith.calibration.routing.RoutedObserver`): in the dispatch form its tensors already hold only
  those rows; in the dense one-hot form the rows are selected by the router's choice, and a tensor the expert
  shares with other readers (the MoE input) gets a QDQ pair of its own for that expert;
* an expert that receives fewer than ``min_expert_tokens`` calibration tokens falls back, by
  ``expert_fallback``: ``"weight-only"`` (its activations stay float, weights int8) or ``"shared-scale"`` (its
  entry GEMMs read the MoE input's scale computed over every token; inner activations stay float).

Every expert's token count, form and fallback are in the pass details (``kind: "expert"``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxsmith.analysis.moe_patterns import MoeLayer, find_moe_layers
from onnxsmith.analysis.qdq_placement import Placement
from onnxsmith.calibration.observers import Observer
from onnxsmith.calibration.routing import RoutedObserver
from onnxsmith.core.graph import export_graph, import_graph
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.rewrite.int8_qdq import CalibratedOptions, activation_observer, activation_qparams, quantize_weights
from onnxsmith.rewrite.qdq_nodes import insert_qdq

FALLBACKS = ("weight-only", "shared-scale")

log = logging.getLogger(__name__)


@dataclass
class ActivationGroup:
    """Readers of one tensor that share one QDQ pair; ``expert`` is (MoE layer index, expert index) or None."""

    tensor: str
    consumers: list[tuple[gs.Node, int]] = field(default_factory=list)
    expert: tuple[int, int] | None = None


@dataclass
class MoePlan:
    """The MoE layers, the int8-qdq placement (routers excluded) and the activation groups by observer key."""

    layers: list[MoeLayer]
    placement: Placement
    groups: dict[str, ActivationGroup]


@dataclass(frozen=True)
class MoeQuantizeOptions(CalibratedOptions):
    """``int8-qdq``'s placement and ranges, and the expert handling."""

    min_expert_tokens: int = option(32, "experts routed fewer calibration tokens fall back", minimum=1)
    expert_fallback: str = option("weight-only", "what a few-token expert gets: float activations, or the MoE "
                                  "input's scale", choices=FALLBACKS)
    quantize_router: bool = option(False, "quantize the router too (default: router and its input stay float)")


class MoeQuantize(Pass):
    """W8A8 QDQ with expert-aware calibration and router protection; see the module docstring."""

    name = "moe-qdq"
    description = "INT8 QDQ for MoE: experts calibrated on their routed tokens, router kept float, few-token fallback"
    lossless = False
    needs_calibration = True
    min_opset = 13

    Options = MoeQuantizeOptions

    def configure(self) -> None:
        self.placer = self.options.placer()

    def plan(self, graph: gs.Graph) -> MoePlan:
        """MoE layers, placement and activation groups of ``graph`` (no edits)."""
        layers = find_moe_layers(graph)
        kept = {} if self.options.quantize_router else {
            layer.router: "MoE router kept in high precision (quantize_router=False)" for layer in layers}
        placement = dataclasses.replace(self.placer, kept_float=kept).place(graph)
        owners = {name: (i, expert.index, expert.dispatched)
                  for i, layer in enumerate(layers) for expert in layer.experts.values() for name in expert.gemms}
        groups: dict[str, ActivationGroup] = {}
        for tensor, consumers in placement.activations.items():
            by_owner: dict[tuple[int, int] | None, list[tuple[gs.Node, int]]] = {}
            for node, index in consumers:
                owner = owners.get(node.name)
                by_owner.setdefault(owner[:2] if owner else None, []).append((node, index))
            for owner, readers in by_owner.items():
                key = tensor if len(by_owner) == 1 or owner is None else f"{tensor}|expert{owner[0]}.{owner[1]}"
                groups[key] = ActivationGroup(tensor, readers, owner)
        return MoePlan(layers, placement, groups)

    def targets_tensorrt(self) -> bool:
        return self.options.act_dtype == "int8"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer | RoutedObserver]:
        plan = self.plan(import_graph(model))
        observers: dict[str, Observer | RoutedObserver] = {}
        for key, group in plan.groups.items():
            if group.expert is None:
                observers[key] = activation_observer(self.options.calibrator, key)
                continue
            layer = plan.layers[group.expert[0]]
            expert = layer.experts[group.expert[1]]
            observers[key] = RoutedObserver(activation_observer(self.options.calibrator, key), group.tensor, layer.choice, expert.index,
                                            top_k=layer.top_k, select_rows=not expert.dispatched)
        for layer in plan.layers:  # the MoE input's own statistics over every token (shared-scale fallback)
            observers.setdefault(layer.input, activation_observer(self.options.calibrator, layer.input))
        return observers

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        plan = self.plan(graph)
        weights_quantized, details = quantize_weights(graph, plan.placement.weights)
        tokens = _expert_tokens(plan, context)
        fallen = {owner for owner, count in tokens.items() if count < self.options.min_expert_tokens}
        if fallen:
            named = ", ".join(f"{plan.layers[i].router} expert {e} ({tokens[i, e]} tokens)" for i, e in sorted(fallen))
            log.warning("moe-qdq: %d experts got fewer than %d calibration tokens and use the %s fallback: %s",
                        len(fallen), self.options.min_expert_tokens, self.options.expert_fallback, named)
        entries = {(i, expert.index): set(expert.entries)
                   for i, layer in enumerate(plan.layers) for expert in layer.experts.values()}
        tensors = graph.tensors()
        quantized = 0
        for key, group in plan.groups.items():
            observer = context.calibration[key]
            readers = group.consumers
            if group.expert in fallen:
                if self.options.expert_fallback == "weight-only":
                    continue
                readers = [(node, i) for node, i in readers if node.name in entries[group.expert]]
                if not readers:
                    continue
                observer = context.calibration[plan.layers[group.expert[0]].input]
            elif isinstance(observer, RoutedObserver):
                observer = observer.inner
            scale, zero_point, value_range = activation_qparams(observer, self.options)
            dequantized = insert_qdq(graph, tensors[group.tensor], scale, zero_point, prefix=_prefix(key, group))
            for node, index in readers:
                node.inputs[index] = dequantized
            quantized += 1
            details.append({"tensor": group.tensor, "kind": "activation", "dtype": self.options.act_dtype,
                            "range": value_range, "scale": float(scale), "zero_point": int(zero_point),
                            "consumers": [node.name for node, _ in readers],
                            **({"expert": list(group.expert)} if group.expert else {})})
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        details += self._moe_details(plan, tokens, fallen)
        details += [{"node": name, "kind": "skipped", "reason": reason}
                    for name, reason in plan.placement.skipped.items()]
        changes = {
            "weights_quantized": weights_quantized,
            "activations_quantized": quantized,
            "nodes_skipped": len(plan.placement.skipped),
            "moe_layers": len(plan.layers),
            "routed_experts": sum(len(layer.experts) for layer in plan.layers),
            "experts_fallback": len(fallen),
            "router_quantized": self.options.quantize_router,
        }
        if tokens:
            changes["expert_tokens_min"] = min(tokens.values())
        modified = bool(weights_quantized or quantized)
        return PassResult(export_graph(graph, model) if modified else model, modified, changes, details)

    def _moe_details(self, plan: MoePlan, tokens: dict[tuple[int, int], int],
                     fallen: set[tuple[int, int]]) -> list[dict]:
        """One detail per router, shared expert and routed expert (token counts and fallbacks)."""
        details: list[dict] = []
        for i, layer in enumerate(plan.layers):
            details.append({"kind": "router", "node": layer.router, "input": layer.input, "choice": layer.choice,
                            "top_k": layer.top_k, "form": layer.form,
                            "precision": "int8" if self.options.quantize_router else "float"})
            if layer.shared:
                details.append({"kind": "shared-expert", "moe_layer": layer.router, "gemms": layer.shared})
            for expert in layer.experts.values():
                count = tokens.get((i, expert.index))
                if count is None:
                    activation = "not quantized (excluded)"
                elif (i, expert.index) in fallen:
                    activation = (f"{self.options.expert_fallback} fallback: {count} calibration tokens < "
                                  f"min_expert_tokens {self.options.min_expert_tokens}")
                else:
                    activation = "calibrated on its routed tokens"
                details.append({"kind": "expert", "moe_layer": layer.router, "expert": expert.index,
                                "form": "dispatch" if expert.dispatched else "dense", "tokens": count,
                                "gemms": expert.gemms, "activation": activation})
        return details


def _expert_tokens(plan: MoePlan, context: PassContext) -> dict[tuple[int, int], int]:
    """Calibration tokens routed to each (MoE layer, expert) that has a routed observer."""
    tokens: dict[tuple[int, int], int] = {}
    for key, group in plan.groups.items():
        observer = context.calibration[key]
        if group.expert is not None and isinstance(observer, RoutedObserver):
            tokens[group.expert] = observer.tokens
    return tokens


def _prefix(key: str, group: ActivationGroup) -> str:
    """Node-name prefix of a group's QDQ pair: the tensor name, plus the expert when the tensor is split."""
    return key if key == group.tensor else f"{group.tensor}_expert{group.expert[0]}_{group.expert[1]}"

