"""Lossless, optional: annotate tensor types and shapes with ONNX shape inference (with data propagation).

``symbolic=True`` then runs onnxruntime's symbolic shape inference (``auto_merge``) and keeps its shapes: it
merges symbols that broadcasting requires to be equal, so it knows, e.g., that attention probabilities and values
share the sequence length where onnx's inference gives two unrelated unknowns (passes that match shapes across
tensors, such as ``reorder-channels``, need that). onnx's own shapes are the declared fallback: the pass manager
checks every new ``value_info`` against the shapes onnxruntime computes and takes onnx's result when the symbolic
one is contradicted (entries still contradicted lose their shape). The pass is optional: when no result holds,
the run goes on without new shapes. Shapes inside subgraphs are left as they were (they cannot be checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


from onnxsmith.core.model_io import needs_external_data, saved_to_temporary_file
from onnxsmith.core.options import PassOptions, option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class ShapeInferenceOptions(PassOptions):
    symbolic: bool = option(False, "also run onnxruntime's symbolic shape inference (onnx's shapes are the fallback)")


class ShapeInference(Pass):
    """Run ``onnx.shape_inference`` (non-strict, data propagation on), optionally onnxruntime's symbolic shape
    inference after it; adds or refines main-graph ``value_info`` only and leaves its input untouched."""

    name = "shape-inference"
    description = "annotate tensor shapes and types (onnx.shape_inference, data propagation)"
    lossless = True
    optional = True
    Options = ShapeInferenceOptions

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        inferred = _onnx_shapes(model)
        if not self.options.symbolic:
            return _result(model, inferred, "onnx")
        refined = onnx.ModelProto()
        refined.CopyFrom(inferred)
        if not _refine_symbolically(refined):
            return _result(model, inferred, "onnx (symbolic inference failed)")
        result = _result(model, refined, "symbolic")
        result.fallbacks.append(("onnx shapes", _result(model, inferred, "onnx")))
        return result


def _onnx_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with onnx's inferred main-graph ``value_info``; subgraphs keep their own."""
    if needs_external_data(model):
        with saved_to_temporary_file(model) as path:
            onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
            inferred = onnx.load(str(path))
    else:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    _restore_subgraph_value_info(model.graph, inferred.graph)
    return inferred


def _restore_subgraph_value_info(given: onnx.GraphProto, inferred: onnx.GraphProto) -> None:
    """Give every subgraph of ``inferred`` (same nodes as ``given``) the ``value_info`` it has in ``given``."""
    for given_node, inferred_node in zip(given.node, inferred.node, strict=True):
        for given_attr, inferred_attr in zip(given_node.attribute, inferred_node.attribute, strict=True):
            pairs = [(given_attr.g, inferred_attr.g)] if given_attr.HasField("g") else []
            pairs += list(zip(given_attr.graphs, inferred_attr.graphs, strict=True))
            for given_sub, inferred_sub in pairs:
                del inferred_sub.value_info[:]
                inferred_sub.value_info.extend(given_sub.value_info)
                _restore_subgraph_value_info(given_sub, inferred_sub)


def _refine_symbolically(model: onnx.ModelProto) -> bool:
    """Override ``model``'s ``value_info`` with onnxruntime's symbolic shape inference's; False where that fails.

    Runs the inference loop directly rather than ``infer_shapes``, which writes the model into the working
    directory when it cannot infer every tensor (these are that tool's own steps, not a public API).
    """
    try:
        # onnxruntime.tools imports torch on load: only a symbolic run pays for it
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
    except Exception:  # noqa: BLE001 - any failure only means onnx's shapes stay
        return False
    outputs = {info.name for info in model.graph.output}
    merged = {info.name: info for info in model.graph.value_info}
    merged.update((info.name, info) for info in inference.out_mp_.graph.value_info
                  if info.type.tensor_type.HasField("shape") and info.name not in outputs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(merged.values())
    return True


def _result(given: onnx.ModelProto, inferred: onnx.ModelProto, source: str) -> PassResult:
    added = _known_shapes(inferred) - _known_shapes(given)
    changed = added > 0 or list(inferred.graph.value_info) != list(given.graph.value_info)
    return PassResult(inferred, changed, {"shapes_added": added, "shapes_from": source})


def _known_shapes(model: onnx.ModelProto) -> int:
    return sum(1 for info in model.graph.value_info if info.type.tensor_type.HasField("shape"))
