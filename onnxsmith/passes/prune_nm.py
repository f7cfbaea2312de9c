"""Lossy: N:M structured sparsity of constant GEMM weights, groups along the axis TensorRT's sparse kernels need.

Every group of ``m`` consecutive *input* channels of a weight keeps its ``n`` highest-scoring entries per output
channel (the rest become 0; kept weights are not updated). The input axis is the reduction axis: MatMul weight
axis 0 (the second-to-last), Gemm axis 1 with ``transB=1`` else 0, Conv axis 1 (a Conv's kh x kw taps are
grouped position by position, ``m`` consecutive channels at each tap).

Scores (``metric``): ``"magnitude"`` ``|W|``; ``"wanda"`` ``|W_ij| * ‖X_j‖₂``, the input channel's L2 norm over
every calibration token (:class:`~onnxsmith.calibration.observers.ChannelNormObserver`, one streaming pass).

Layers pruned: MatMul (activation input 0, constant 2-D weight input 1), Gemm with ``transA=0`` and Conv with
``group=1``; a layer is skipped, with the reason reported, when its input channels are not a multiple of ``m``
or when it has fewer than ``min_channels`` input or output channels (small layers lose too much and gain
nothing). ``exclude_regex`` keeps matching node names dense.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.observers import ChannelNormObserver, Observer
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult
from onnxsmith.passes.graph_utils import export_graph, import_graph
from onnxsmith.passes.qdq_nodes import weight_input_axis, weight_site

METRICS = ("magnitude", "wanda")


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


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest ``scores`` of every ``m`` consecutive entries along ``axis``.

    ``scores.shape[axis]`` must be a multiple of ``m``; ties keep the earlier entry.
    """
    moved = np.moveaxis(scores, axis, 0)
    if moved.shape[0] % m:
        raise ValueError(f"{moved.shape[0]} channels along axis {axis} are not a multiple of m = {m}")
    groups = moved.reshape(moved.shape[0] // m, m, -1)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), 0, axis)


def satisfies_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Whether every ``m`` consecutive entries of ``weight`` along ``axis`` hold at most ``n`` non-zeros."""
    moved = np.moveaxis(np.asarray(weight), axis, 0)
    if moved.shape[0] % m:
        return False
    return bool(((moved.reshape(moved.shape[0] // m, m, -1) != 0).sum(axis=1) <= n).all())


class PruneNM(Pass):
    """N:M sparsity of GEMM weights by magnitude or Wanda score; see the module docstring."""

    name = "prune-nm"
    description = "N:M structured sparsity (2:4, 4:8) of MatMul/Gemm/Conv weights along the input axis"
    lossless = False
    min_opset = None

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        metric: str = "magnitude",
        min_channels: int = 64,
        exclude_regex: Sequence[str] = (),
    ) -> None:
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"need integers 0 < n < m, got n={n!r}, m={m!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels}")
        self.n, self.m, self.metric, self.min_channels = n, m, metric, min_channels
        self.exclude = [re.compile(pattern) for pattern in exclude_regex]
        self.needs_calibration = metric != "magnitude"

    def layers(self, graph: gs.Graph) -> tuple[list[SparseLayer], dict[str, str]]:
        """The layers to prune in graph order and the skipped ones with their reasons."""
        layers, skipped = [], {}
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
                continue
            site = weight_site(node)
            if site is None or site[0] is not node or site[2] is None:
                continue
            if any(pattern.search(node.name) for pattern in self.exclude):
                skipped[node.name] = "excluded"
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
        return layers, skipped

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        if self.metric == "magnitude":
            return {}
        layers, _ = self.layers(import_graph(model))
        return {layer.activation.name: ChannelNormObserver(layer.channel_axis, name=layer.activation.name)
                for layer in layers}

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        layers, skipped = self.layers(graph)
        details = []
        for layer in layers:
            values = layer.weight.values
            scores = np.abs(values.astype(np.float64))
            if self.metric == "wanda":
                norms = context.calibration[layer.activation.name].norms
                shape = [1] * values.ndim
                shape[layer.in_axis] = -1
                scores = scores * norms.reshape(shape)
            mask = nm_mask(scores, self.n, self.m, layer.in_axis)
            pruned = np.where(mask, values, np.zeros_like(values))
            layer.node.inputs[1] = gs.Constant(f"{layer.weight.name}_{self.n}of{self.m}", pruned)
            energy = values.astype(np.float64) ** 2
            kept = float(energy[mask].sum() / energy.sum()) if energy.any() else 1.0
            details.append({"node": layer.node.name, "kind": "pruned", "pattern": f"{self.n}:{self.m}",
                            "axis": layer.in_axis, "kept_energy": kept})
        details += [{"node": name, "kind": "skipped", "reason": reason} for name, reason in skipped.items()]
        if not layers:
            return PassResult(model, False, {"pruned": 0, "skipped": len(skipped)}, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {"pruned": len(layers), "skipped": len(skipped), "pattern": f"{self.n}:{self.m}",
                   "metric": self.metric}
        return PassResult(export_graph(graph, model), True, changes, details)
