"""Routing agreement: how often a quantized MoE model sends a token to the same top-1 expert as the FP model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxsmith.core.graph import import_graph
from onnxsmith.analysis.moe_patterns import find_moe_layers


@dataclass
class RoutingAgreement:
    """Matching top-1 choices and token counts per router choice tensor, accumulated over feeds."""

    choices: list[str]
    top_k: dict[str, int]
    matches: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        """Count one feed's choices (outputs of both models, keyed by choice tensor name)."""
        for name in self.choices:
            ref, cand = (np.asarray(outputs[name]).reshape(-1, self.top_k[name])[:, 0]
                         for outputs in (reference, candidate))
            self.matches[name] = self.matches.get(name, 0) + int(np.sum(ref == cand))
            self.tokens[name] = self.tokens.get(name, 0) + ref.size

    @property
    def overall(self) -> float | None:
        """Fraction of (token, MoE layer) pairs whose top-1 expert is unchanged; None before any token."""
        total = sum(self.tokens.values())
        return sum(self.matches.values()) / total if total else None

    def by_layer(self) -> dict[str, float]:
        """The fraction for each router's choice tensor."""
        return {name: self.matches[name] / self.tokens[name] for name in self.choices if self.tokens.get(name)}


def routing_probe(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> RoutingAgreement | None:
    """A routing-agreement counter for the reference's routers, or None when the reference has no MoE layer or
    the candidate lost one of its choice tensors."""
    layers = find_moe_layers(import_graph(reference))
    if not layers:
        return None
    produced = {out for node in candidate.graph.node for out in node.output}
    choices = [layer.choice for layer in layers]
    if not all(name in produced for name in choices):
        return None
    return RoutingAgreement(choices, {layer.choice: layer.top_k for layer in layers})

