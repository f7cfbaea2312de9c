"""Lossless: permute the channels between layers so sub-layer quantization blocks hold channels of similar range.

Every *region* of :mod:`onnxsmith.rewrite.channel_regions` (tensors that carry one channel axis from producer
GEMMs/Convs to consumer GEMMs/Convs, where permuting the producers' output channels, every per-channel constant on
the way and the consumers' input channels the same way leaves the function unchanged) gets one permutation; a
region the rules refuse is left untouched and reported as skipped with the reason. Static shapes come from the
model's ``value_info`` (run ``shape-inference`` with ``symbolic=True`` first).

The permutation per region comes from :func:`onnxsmith.calibration.channel_order.choose_permutation` on the
region's weights with ``weight_grid`` and ``wbits``. Constants also used outside their region get permuted copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.blocks import GridSpec
from onnxsmith.calibration.channel_order import STRATEGIES, choose_permutation
from onnxsmith.core.graph import export_graph, import_graph
from onnxsmith.core.options import PassOptions, option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.rewrite.channel_regions import PERMUTATION_TOLERANCE, Layer, Region, apply_permutation, regions

MIN_BITS, MAX_BITS = 4, 8


@dataclass(frozen=True)
class ReorderChannelsOptions(PassOptions):
    strategy: str = option("auto", "how the permutation is chosen", choices=STRATEGIES)
    weight_grid: str = option("per-channel", "the weight block grid the permutation serves (e.g. 16x4, allx2)",
                              check=GridSpec.parse)
    wbits: int = option(8, "weight bits the permutation serves", minimum=MIN_BITS, maximum=MAX_BITS)


class ReorderChannels(Pass):
    """Reorder the channels of every region where that is function-preserving and lowers the objective."""

    name = "reorder-channels"
    description = "permute channels between layers so quantization blocks group similar ranges (lossless)"
    lossless = True
    tolerance = PERMUTATION_TOLERANCE
    min_opset = 13

    Options = ReorderChannelsOptions

    def configure(self) -> None:
        self.weight_grid = GridSpec.parse(self.options.weight_grid)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        names = set(graph.tensors())
        details, reordered = [], 0
        for region in regions(graph):
            if region.refusal is not None:
                details.append({"kind": "skipped", "producers": _names(region.producers),
                                "reason": region.refusal})
                continue
            detail = self._reorder(region, graph, names)
            reordered += detail["kind"] == "reordered"
            details.append(detail)
        skipped = sum(d["kind"] == "skipped" for d in details)
        changes = {"regions": len(details), "regions_reordered": reordered, "regions_skipped": skipped}
        if not reordered:
            return PassResult(model, False, changes, details)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_graph(graph, model), True, changes, details)

    def _reorder(self, region: Region, graph: gs.Graph, names: set[str]) -> dict[str, Any]:
        """Choose the region's permutation, apply it unless it is the identity, and describe the region."""
        choice = choose_permutation([p.weight for p in region.producers], [c.weight for c in region.consumers],
                                    self.weight_grid, self.options.wbits, self.options.strategy, region.group)
        identity = bool(np.array_equal(choice.permutation, np.arange(region.channels)))
        if not identity:
            apply_permutation(region, choice.permutation, graph, names)
        return {"kind": "identity" if identity else "reordered", "producers": _names(region.producers),
                "consumers": _names(region.consumers), "channels": region.channels, "group": region.group,
                "strategy": choice.strategy, "error_before": choice.error_before, "error_after": choice.error_after}


def _names(layers: list[Layer]) -> list[str]:
    return [layer.node.name for layer in layers]
