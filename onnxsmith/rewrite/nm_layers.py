"""N:M layers: which GEMMs an N:M pass treats, how their weight entries are scored, and the options both N:M
passes (``prune-nm``, ``shuffle-nm``) declare alike."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxsmith.analysis.weights import weight_input_axis, weight_site
from onnxsmith.calibration.observers import ChannelEntropyObserver, ChannelNormObserver, Observer
from onnxsmith.core.graph import SUBGRAPH_SKIP_REASON, subgraph_node_names
from onnxsmith.core.options import PassOptions, check_patterns, option
from onnxsmith.core.sparsity import SCORES, channel_factors, check_pattern


SCORE_HELP = "what pruning keeps: |W|, Wanda's |W|*||X||, E-Sparse's entropy+norm score"


@dataclass(frozen=True)
class NMOptions(PassOptions):
    """The pattern, scoring and layer selection of an N:M pass."""

    n: int = option(2, "entries kept in every group of m input channels", minimum=1)
    m: int = option(4, "the group size along the input channels", minimum=2)
    score: str = option("magnitude", SCORE_HELP, choices=SCORES)
    alpha: float = option(100.0, "E-Sparse weight of the normalised channel norm against the normalised entropy",
                          minimum=0)
    bins: int = option(256, "histogram bins of the E-Sparse channel entropy", minimum=2)
    min_channels: int = option(64, "layers with fewer input or output channels stay dense", minimum=1)
    exclude_regex: tuple[str, ...] = option((), "node-name patterns kept dense", check=check_patterns)
    skip_head: bool = option(True, "keep a layer writing a graph output (classifier, LM head) dense")

    def check(self) -> None:
        check_pattern(self.n, self.m)

    def selection(self) -> NMSelection:
        return NMSelection(self.m, self.min_channels, self.exclude_regex, self.skip_head)

    def scoring(self) -> NMScoring:
        return NMScoring(self.score, self.alpha, self.bins)


@dataclass
class SparseLayer:
    """A prunable node, its constant weight's input and output axes, and the activation it reads."""

    node: gs.Node
    in_axis: int
    out_axis: int

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[1]

    @property
    def activation(self) -> gs.Variable:
        return self.node.inputs[0]

    @property
    def channel_axis(self) -> int:
        """The activation's input-channel axis (Conv: 1, counted from the end; GEMMs: the last)."""
        return -(self.weight.values.ndim - 1) if self.node.op == "Conv" else -1


@dataclass(frozen=True)
class NMSelection:
    """Which layers an N:M pass treats: the pattern's ``m``, the size floor and the excluded name patterns."""

    m: int
    min_channels: int = 64
    exclude_regex: Sequence[str] = ()
    skip_head: bool = True
    """Keep a layer that writes a graph output (a classifier or LM head) dense."""

    def layers(self, graph: gs.Graph) -> tuple[list[SparseLayer], dict[str, str]]:
        """The layers to prune in graph order and the skipped ones with their reasons."""
        exclude = [re.compile(pattern) for pattern in self.exclude_regex]
        outputs = {tensor.name for tensor in graph.outputs}
        layers, skipped = [], {}
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
                continue
            site = weight_site(node)
            if site is None or site[0] is not node or site[2] is None:
                continue
            if any(pattern.search(node.name) for pattern in exclude):
                skipped[node.name] = "excluded"
                continue
            if self.skip_head and any(tensor.name in outputs for tensor in node.outputs):
                skipped[node.name] = "writes a graph output (a head; skip_head=False prunes it)"
                continue
            if node.attrs.get("transA", 0) or node.attrs.get("group", 1) != 1:
                skipped[node.name] = "transA Gemm or grouped Conv"
                continue
            layer = SparseLayer(node, weight_input_axis(node, node, 1), site[2])
            shape = layer.weight.values.shape
            if min(shape[layer.in_axis], shape[layer.out_axis]) < self.min_channels:
                skipped[node.name] = f"fewer than {self.min_channels} input or output channels ({shape})"
            elif shape[layer.in_axis] % self.m:
                skipped[node.name] = f"{shape[layer.in_axis]} input channels are not a multiple of {self.m}"
            else:
                layers.append(layer)
        for name in subgraph_node_names(graph, ("MatMul", "Gemm", "Conv")):
            skipped[name] = SUBGRAPH_SKIP_REASON
        return layers, skipped


@dataclass(frozen=True)
class NMScoring:
    """How entries are ranked (``score``, ``alpha`` for E-Sparse, ``bins`` of the entropy histograms)."""

    score: str = "magnitude"
    alpha: float = 100.0
    bins: int = 256

    @property
    def needs_calibration(self) -> bool:
        return self.score != "magnitude"

    def observers(self, layers: Sequence[SparseLayer]) -> dict[str, Observer]:
        """One observer per distinct activation the layers read (none for magnitude)."""
        if self.score == "magnitude":
            return {}
        if self.score == "wanda":
            return {layer.activation.name: ChannelNormObserver(layer.channel_axis, name=layer.activation.name)
                    for layer in layers}
        return {layer.activation.name: ChannelEntropyObserver(layer.channel_axis, self.bins,
                                                              name=layer.activation.name) for layer in layers}

    def scores(self, layer: SparseLayer, calibration: Mapping[str, Observer] | None) -> np.ndarray:
        """``|W|`` times the input-channel factor, in the weight's own shape (float64)."""
        values = np.abs(layer.weight.values.astype(np.float64))
        if self.score == "magnitude":
            return values
        observer = calibration[layer.activation.name]
        factors = channel_factors(self.score, observer.norms, getattr(observer, "entropy", None), self.alpha)
        shape = [1] * values.ndim
        shape[layer.in_axis] = -1
        return values * factors.reshape(shape)
