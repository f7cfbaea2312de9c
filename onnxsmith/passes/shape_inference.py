"""Lossless: annotate tensor types and shapes with ONNX shape inference (with data propagation).

``symbolic=True`` then runs onnxruntime's symbolic shape inference (``auto_merge``) and keeps its shapes: it
merges symbols that broadcasting requires to be equal, so it knows, e.g., that attention probabilities and values
share the sequence length where onnx's inference gives two unrelated unknowns (passes that match shapes across
tensors, such as ``reorder-channels``, need that). Where it fails, onnx's shapes stay.
"""

from __future__ import annotations

import onnx

from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from onnxsmith.optimizer.model_io import needs_external_data, saved_to_temporary_file
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult


class ShapeInference(Pass):
    """Run ``onnx.shape_inference`` (non-strict, data propagation on), optionally onnxruntime's symbolic shape
    inference after it; adds or refines ``value_info`` only."""

    name = "shape-inference"
    description = "annotate tensor shapes and types (onnx.shape_inference, data propagation)"
    lossless = True

    def __init__(self, symbolic: bool = False) -> None:
        self.symbolic = symbolic

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        known_before = _known_shapes(model)
        if needs_external_data(model):
            with saved_to_temporary_file(model) as path:
                onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
                inferred = onnx.load(str(path))
        else:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        if self.symbolic:
            _refine_symbolically(inferred)
        added = _known_shapes(inferred) - known_before
        changed = added > 0 or list(inferred.graph.value_info) != list(model.graph.value_info)
        return PassResult(inferred, changed, {"shapes_added": added})


def _refine_symbolically(model: onnx.ModelProto) -> None:
    """Override ``model``'s ``value_info`` with onnxruntime's symbolic shape inference's, where that runs.

    Runs the inference loop directly rather than ``infer_shapes``, which writes the model into the working
    directory when it cannot infer every tensor (these are that tool's own steps, not a public API).
    """
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
    except Exception:  # noqa: BLE001 - any failure only means onnx's shapes stay
        return
    outputs = {info.name for info in model.graph.output}
    merged = {info.name: info for info in model.graph.value_info}
    merged.update((info.name, info) for info in inference.out_mp_.graph.value_info
                  if info.type.tensor_type.HasField("shape") and info.name not in outputs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(merged.values())


def _known_shapes(model: onnx.ModelProto) -> int:
    return sum(1 for info in model.graph.value_info if info.type.tensor_type.HasField("shape"))
