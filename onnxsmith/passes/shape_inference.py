"""Lossless: annotate tensor types and shapes with ONNX shape inference (with data propagation)."""

from __future__ import annotations

import onnx

from onnxsmith.optimizer.model_io import needs_external_data, saved_to_temporary_file
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult


class ShapeInference(Pass):
    """Run ``onnx.shape_inference`` (non-strict, data propagation on); adds ``value_info`` only."""

    name = "shape-inference"
    description = "annotate tensor shapes and types (onnx.shape_inference, data propagation)"
    lossless = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        known_before = _known_shapes(model)
        if needs_external_data(model):
            with saved_to_temporary_file(model) as path:
                onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
                inferred = onnx.load(str(path))
        else:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        added = _known_shapes(inferred) - known_before
        return PassResult(inferred, added > 0, {"shapes_added": added})


def _known_shapes(model: onnx.ModelProto) -> int:
    return sum(1 for info in model.graph.value_info if info.type.tensor_type.HasField("shape"))
