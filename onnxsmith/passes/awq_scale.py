"""Lossless in float: AWQ-style per-input-channel scaling of the layers ``int4-weight`` will quantize.

Layers reading the same input (q/k/v after one norm, gate/up, down_proj alone) form a group that shares one
factor ``s [K]`` searched by :func:`onnxsmith.calibration.awq.search_awq` (round-to-nearest INT4 at the layer's
block size, output error through the input's Gram matrix from calibration). The group's weights become
``diag(s) W`` and ``1/s`` is folded into the op producing the input (:mod:`onnxsmith.rewrite.channel_scaling`), so
the float model computes the same outputs (verified by the pass manager) while the salient input channels' weights
get more of the INT4 grid. Groups are handled last first: a group's factors may land in an earlier layer's weight
columns (down_proj into up_proj), which that layer's own search then sees. A group whose producer cannot absorb the
factors, or whose best factor is ``alpha = 0``, is left unchanged and reported. Layer selection and block sizes
(with their fallbacks) are ``int4-weight``'s for the same ``block_size`` / ``target`` / ``exclude_*`` options.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxsmith.calibration.awq import search_awq
from onnxsmith.calibration.observers import GramObserver, Observer
from onnxsmith.core.graph import export_graph, import_graph
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult, Tolerance
from onnxsmith.rewrite.channel_scaling import plan_input_scaling
from onnxsmith.rewrite.int4_layers import Int4Layer, Int4SelectionOptions


@dataclass(frozen=True)
class AwqScaleOptions(Int4SelectionOptions):
    """``int4-weight``'s layer selection (same ``block_size``, ``target``, ``exclude_*``) and the AWQ search."""

    awq_grid: int = option(20, "candidate exponents of the AWQ search", minimum=1)


class AwqScale(Pass):
    """AWQ-style channel scaling folded into producers; see the module docstring."""

    name = "awq-scale"
    description = "AWQ-style per-input-channel scaling for INT4 weights, folded into the producing op (lossless)"
    lossless = True
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)  # rescaled float weights round differently
    needs_calibration = True

    Options = AwqScaleOptions

    def configure(self) -> None:
        self.selector = self.options.selection()

    def targets_tensorrt(self) -> bool:
        return self.options.target == "tensorrt"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        layers, _ = self.selector.layers(import_graph(model))
        return {layer.input.name: GramObserver(name=layer.input.name) for layer in layers}

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        layers, _ = self.selector.layers(graph)
        groups: dict[str, list[Int4Layer]] = {}
        for layer in layers:
            groups.setdefault(layer.input.name, []).append(layer)
        details, folded = [], 0
        for name, members in reversed(list(groups.items())):
            nodes = [layer.node.name for layer in members]
            plan = plan_input_scaling(members[0].input, set(nodes), members[0].w.shape[0])
            blocks = {layer.block for layer in members}
            if plan is None or len(blocks) != 1:
                details.append({"input": name, "layers": nodes, "kind": "not folded",
                                "reason": "no producer absorbs a per-channel scaling" if plan is None
                                else "the group's layers use different block sizes"})
                continue
            gram = np.asarray(context.calibration[name].gram, dtype=np.float64)
            choice = search_awq(gram, [layer.w for layer in members], blocks.pop(), self.options.awq_grid)
            detail = {"input": name, "layers": nodes, "alpha": choice.alpha, "rtn_error": choice.rtn_error,
                      "error": choice.error}
            if choice.alpha == 0:
                details.append({**detail, "kind": "unscaled", "reason": "alpha 0 (round-to-nearest was best)"})
                continue
            plan.apply(choice.factors)
            for layer in members:
                shape = (1, -1) if layer.transposed else (-1, 1)
                values = layer.weight.values
                layer.weight.values = (values * choice.factors.reshape(shape)).astype(values.dtype)
            details.append({**detail, "kind": "folded", "into": list(plan.where)})
            folded += 1
        changes = {"groups": len(groups), "folded": folded}
        return PassResult(export_graph(graph, model) if folded else model, folded > 0, changes, details)
