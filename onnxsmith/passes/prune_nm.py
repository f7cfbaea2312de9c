"""Lossy: N:M structured sparsity of constant GEMM weights, groups along the axis TensorRT's sparse kernels need.

Every group of ``m`` consecutive *input* channels of a weight keeps its ``n`` highest-scoring entries per output
channel (the rest become 0; kept weights are not updated). The input axis is the reduction axis: MatMul weight
axis 0 (the second-to-last), Gemm axis 1 with ``transB=1`` else 0, Conv axis 1 (a Conv's kh x kw taps are
grouped position by position, ``m`` consecutive channels at each tap).

Scores (``score``, :func:`onnxsmith.core.sparsity.channel_factors`): ``"magnitude"`` ``|W|``;
``"wanda"`` ``|W_ij| * ‖X_j‖₂``, the input channel's L2 norm over every calibration token; ``"esparse"``
``|W_ij| * (H_j / mean H + alpha * ‖X_j‖₂ / mean ‖X‖₂)`` with ``H_j`` the entropy of input channel ``j``'s
histogram (``bins`` bins). The default ``alpha = 100`` leaves the entropy a tie-breaker between channels of
similar norm: on SmolLM2 (2:4, all 210 decoder GEMMs, 32 calibration windows, perplexity on the first 20
evaluation windows) Wanda scored 102.3 and E-Sparse 123.3 / 107.2 / 101.8 at ``alpha`` 1 / 3 / 10 without
shuffles; with the global shuffle Wanda 86.4, ``alpha`` 30 87.5, 100 84.6; with the local shuffle Wanda 73.1,
``alpha`` 100 67.0. The statistics come from one streaming pass of
:class:`~onnxsmith.calibration.observers.ChannelNormObserver` / ``ChannelEntropyObserver``.

Layers pruned: MatMul (activation input 0, constant 2-D weight input 1), Gemm with ``transA=0`` and Conv with
``group=1``; a layer is skipped, with the reason reported, when its input channels are not a multiple of ``m``
or when it has fewer than ``min_channels`` input or output channels (small layers lose too much and gain
nothing). ``exclude_regex`` keeps matching node names dense, and ``skip_head`` (default) a layer writing a graph
output, the classifier or LM head. ``shuffle-nm`` run before this pass regroups the
input channels (losslessly) so that more of the score survives.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.observers import Observer
from onnxsmith.core.graph import export_graph, import_graph, unique_name
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.core.sparsity import nm_mask
from onnxsmith.rewrite.nm_layers import NMOptions


class PruneNM(Pass):
    """N:M sparsity of GEMM weights by magnitude, Wanda or E-Sparse score; see the module docstring."""

    name = "prune-nm"
    description = "N:M structured sparsity (2:4, 4:8) of MatMul/Gemm/Conv weights along the input axis"
    lossless = False
    min_opset = None

    Options = NMOptions

    def configure(self) -> None:
        self.selection = self.options.selection()
        self.scoring = self.options.scoring()
        self.needs_calibration = self.scoring.needs_calibration

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        return self.scoring.observers(self.selection.layers(import_graph(model))[0])

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        layers, skipped = self.selection.layers(graph)
        details = []
        names = set(graph.tensors())
        done: dict[str, list[gs.Constant]] = {}  # pruned versions of each (tied) weight, shared when equal
        for layer in layers:
            values = layer.weight.values
            mask = nm_mask(self.scoring.scores(layer, context.calibration), self.options.n, self.options.m, layer.in_axis)
            pruned = np.where(mask, values, np.zeros_like(values))
            versions = done.setdefault(layer.weight.name, [])
            same = [c for c in versions if np.array_equal(c.values, pruned)]
            if not same:  # a tied weight pruned with another mask needs its own, uniquely named tensor
                versions.append(gs.Constant(unique_name(names, f"{layer.weight.name}_{self.options.n}of{self.options.m}"), pruned))
            layer.node.inputs[1] = same[0] if same else versions[-1]
            energy = values.astype(np.float64) ** 2
            kept = float(energy[mask].sum() / energy.sum()) if energy.any() else 1.0
            details.append({"node": layer.node.name, "kind": "pruned", "pattern": f"{self.options.n}:{self.options.m}",
                            "axis": layer.in_axis, "kept_energy": kept})
        details += [{"node": name, "kind": "skipped", "reason": reason} for name, reason in skipped.items()]
        if not layers:
            return PassResult(model, False, {"pruned": 0, "skipped": len(skipped)}, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {"pruned": len(layers), "skipped": len(skipped), "pattern": f"{self.options.n}:{self.options.m}",
                   "score": self.scoring.score}
        return PassResult(export_graph(graph, model), True, changes, details)
