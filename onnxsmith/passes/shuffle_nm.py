"""Lossless: permute the input channels of N:M pruning targets so that more of their score survives the pruning.

For the layers ``prune-nm`` would prune (same ``n``, ``m``, ``min_channels``, ``exclude_regex``, ``skip_head``) this pass picks
a permutation of each layer's input channels with :func:`onnxsmith.calibration.nm_shuffle.choose_nm_permutation`
(``shuffle``: E-Sparse's global naive shuffle, its local block shuffle, or apex's regrouping search) on the
layer's pruning scores (``score``, ``alpha``, ``bins`` as in ``prune-nm``), and absorbs it so the model computes
the same function:

- **folded**: when the layer's input channels form a region of ``reorder-channels`` (a producer GEMM/Conv whose
  output rows can be permuted: gate/up -> down, V -> O within heads, Conv -> Conv), the producers' output rows,
  every per-channel constant on the way and all of the region's consumers are permuted; one permutation serves
  all the region's targets. No runtime cost.
- **gathered** (``absorb="fold-or-gather"``, the default): otherwise, a ``Gather`` of the activation's channels in
  front of the targets that read it (one per activation, shared by e.g. q/k/v) and their weights' input rows
  permuted the same way. It costs one copy of the activation at run time.
  ``absorb="fold-or-gather-each"`` gives every such layer its own permutation and ``Gather`` instead (more kept
  score, one activation copy per layer).
- **unshuffled**: ``absorb="fold"`` leaves the layers that cannot be folded as they are; a layer whose best
  permutation is the identity is also reported so.

The local and apex searches work in blocks of ``block`` consecutive channels (after the global shuffle) for at
most ``rounds`` passes. The local search matters: SmolLM2 with all 210 decoder GEMMs at 2:4 by Wanda's score
(32 calibration windows, perplexity on the first 20 evaluation windows) scored 102.3 unshuffled, 86.4 with the
global shuffle and 73.1 with the local search after it.
A permutation is only taken when it raises the kept score fraction, so the pass never lowers it. Each target's
detail names the option used and its kept fraction before and after. Folding needs static shapes: run
``shape-inference`` with ``symbolic=True`` first, as the ``esparse24`` recipe does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.nm_shuffle import SHUFFLES, ShuffleChoice, choose_nm_permutation, kept_fraction
from onnxsmith.calibration.observers import Observer
from onnxsmith.core.graph import export_graph, import_graph, unique_name
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.rewrite.channel_regions import PERMUTATION_TOLERANCE, apply_permutation, permute, regions
from onnxsmith.core.sparsity import SCORES
from onnxsmith.rewrite.nm_layers import SCORE_HELP, NMOptions, SparseLayer

ABSORB = ("fold", "fold-or-gather", "fold-or-gather-each")


@dataclass(frozen=True)
class ShuffleNMOptions(NMOptions):
    """``prune-nm``'s pattern, scoring and selection (E-Sparse's score by default) and the shuffle search."""

    score: str = option("esparse", SCORE_HELP, choices=SCORES)
    shuffle: str = option("local", "channel shuffle: none, E-Sparse's global or local search, apex's regrouping",
                          choices=SHUFFLES)
    absorb: str = option("fold-or-gather", "fold shuffles into producers only, or Gather where folding is "
                         "impossible (one per activation, or one per layer)", choices=ABSORB)
    block: int = option(64, "channels per block of the local and apex searches", minimum=2)
    rounds: int = option(50, "most passes of the local and apex searches", minimum=1)

    def check(self) -> None:
        super().check()
        if self.shuffle == "apex" and (self.n, self.m) != (2, 4):
            raise ValueError("shuffle 'apex' regroups 2:4 stripes only; use 'local' for other patterns")
        if self.block < 2 * self.m or self.block % self.m:
            raise ValueError(f"block must be a multiple of m = {self.m} holding at least two groups, got {self.block}")


class ShuffleNM(Pass):
    """Channel shuffles before N:M pruning, folded into producers or applied by a Gather; see the module docstring."""

    name = "shuffle-nm"
    description = "permute input channels so N:M pruning keeps more of the score (E-Sparse shuffles)"
    lossless = True
    tolerance = PERMUTATION_TOLERANCE
    min_opset = 13

    Options = ShuffleNMOptions

    def configure(self) -> None:
        self.selection = self.options.selection()
        self.scoring = self.options.scoring()
        self.needs_calibration = self.scoring.needs_calibration and self.options.shuffle != "none"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        return self.scoring.observers(self.selection.layers(import_graph(model))[0])

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        targets, _ = self.selection.layers(graph)
        if self.options.shuffle == "none" or not targets:
            return PassResult(model, False, {"folded": 0, "gathered": 0, "unshuffled": len(targets)}, [])
        by_node = {id(layer.node): layer for layer in targets}
        names = set(graph.tensors())
        details: list[dict[str, Any]] = []
        done: set[int] = set()
        self._fold(graph, by_node, context, names, details, done)
        remaining = [layer for layer in targets if id(layer.node) not in done]
        groups = [[layer] for layer in remaining] if self.options.absorb == "fold-or-gather-each" \
            else list(_by_activation(remaining).values())
        for layers in groups:
            scores = [self._matrix(layer, context) for layer in layers]
            choice = choose_nm_permutation(scores, self.options.n, self.options.m, self.options.shuffle, None, self.options.block, self.options.rounds)
            gather = self.options.absorb != "fold" and choice.method != "identity"
            details += self._describe(layers, scores, choice, "gathered" if gather else "unshuffled")
            if gather:
                _gather(layers, choice.permutation, graph, names)
        counts = {kind: sum(d["kind"] == kind for d in details) for kind in ("folded", "gathered", "unshuffled")}
        changes = {**counts, "shuffle": self.options.shuffle}
        if counts["folded"] + counts["gathered"] == 0:
            return PassResult(model, False, changes, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_graph(graph, model), True, changes, details)

    def _fold(self, graph: gs.Graph, by_node: dict[int, SparseLayer], context: PassContext, names: set[str],
              details: list[dict[str, Any]], done: set[int]) -> None:
        """Shuffle the targets that are consumers of a foldable region, permuting the whole region."""
        for region in regions(graph):
            layers = [by_node[id(c.node)] for c in region.consumers if id(c.node) in by_node]
            if region.refusal is not None or not layers or region.group % self.options.m:
                continue
            scores = [self._matrix(layer, context) for layer in layers]
            choice = choose_nm_permutation(scores, self.options.n, self.options.m, self.options.shuffle, region.group, self.options.block,
                                           self.options.rounds)
            if choice.method == "identity":
                continue
            details += self._describe(layers, scores, choice, "folded", [p.node.name for p in region.producers])
            apply_permutation(region, choice.permutation, graph, names)
            done.update(id(layer.node) for layer in layers)

    def _matrix(self, layer: SparseLayer, context: PassContext) -> np.ndarray:
        """The layer's scores as ``[input channels, everything else]``."""
        scores = np.moveaxis(self.scoring.scores(layer, context.calibration), layer.in_axis, 0)
        return scores.reshape(scores.shape[0], -1)

    def _describe(self, layers: Sequence[SparseLayer], scores: Sequence[np.ndarray], choice: ShuffleChoice,
                  kind: str, producers: Sequence[str] = ()) -> list[dict[str, Any]]:
        """One detail per layer: how its shuffle was absorbed and its own kept fraction before and after."""
        applied = choice.method != "identity" and kind != "unshuffled"
        out = []
        for layer, matrix in zip(layers, scores):
            before = kept_fraction([matrix], self.options.n, self.options.m)
            after = kept_fraction([matrix], self.options.n, self.options.m, choice.permutation) if applied else before
            detail = {"node": layer.node.name, "kind": kind if applied else "unshuffled",
                      "method": choice.method if applied else "identity", "kept_before": before, "kept_after": after}
            if producers:
                detail["producers"] = list(producers)
            out.append(detail)
        return out


def _by_activation(layers: Sequence[SparseLayer]) -> dict[str, list[SparseLayer]]:
    groups: dict[str, list[SparseLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.activation.name, []).append(layer)
    return groups


def _gather(layers: Sequence[SparseLayer], permutation: np.ndarray, graph: gs.Graph, names: set[str]) -> None:
    """Feed ``layers`` the channels of their shared activation in ``permutation`` order and permute their weights'
    input rows to match (a weight also used elsewhere gets a permuted copy)."""
    activation, axis = layers[0].activation, layers[0].channel_axis
    indices = gs.Constant(unique_name(names, f"{activation.name}_nm_order"), permutation.astype(np.int64))
    shuffled = gs.Variable(unique_name(names, f"{activation.name}_nm_shuffled"), activation.dtype,
                           activation.shape)
    graph.nodes.append(gs.Node("Gather", unique_name(names, f"{activation.name}_nm_gather"), {"axis": axis},
                               [activation, indices], [shuffled]))
    for layer in layers:
        weight = layer.weight
        values = permute(weight.values, (layer.in_axis,), permutation)
        if len(weight.outputs) == 1:
            weight.values = values
        else:
            layer.node.inputs[1] = gs.Constant(unique_name(names, f"{weight.name}_nm_shuffled"), values)
        layer.node.inputs[0] = shuffled
