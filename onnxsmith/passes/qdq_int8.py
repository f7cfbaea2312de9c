"""Lossy: INT8 QDQ on the inputs of Conv, Gemm and MatMul, placed the way TensorRT fuses them.

Weights (constant inputs) become per-output-channel symmetric int8 initializers read through a
``DequantizeLinear`` (Conv axis 0, Gemm axis 0 with ``transB=1`` else 1, MatMul the last axis). Activations get
one per-tensor ``QuantizeLinear -> DequantizeLinear`` pair each, shared by all quantized consumers: uint8 with a
zero point (onnxruntime's fast CPU path) or int8 with zero point 0 (TensorRT). Activation x activation MatMuls
get QDQ on both inputs. Nothing else is touched: LayerNorm, Softmax, residual Adds, Where, shape arithmetic and
integer or boolean tensors keep their float (or original) inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxsmith.calibration.observers import Observer, ReservoirObserver
from onnxsmith.calibration.twin_uniform import search_twin
from onnxsmith.core.graph import export_graph, import_graph
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult
from onnxsmith.rewrite.int8_qdq import (CalibratedOptions, activation_observer, activation_qparams, quantize_weights,
                                        twin_form_option)
from onnxsmith.rewrite.qdq_nodes import insert_qdq, insert_twin, insert_twin_parts, split_gemm


@dataclass(frozen=True)
class QuantizeInt8Options(CalibratedOptions):
    twin: bool = option(False, "twin-uniform quantizers on post-Softmax/GELU GEMM inputs")
    twin_form: str = twin_form_option()
    sparse_outputs: bool = option(False, "also quantize the outputs of 2:4-sparse GEMMs (TensorRT's sparse INT8)")


class QuantizeInt8(Pass):
    """W8A8 QDQ insertion; see the module docstring for the placement rules.

    ``calibrator`` picks the activation range search. ``twin=True`` gives post-Softmax and post-GELU GEMM inputs
    PTQ4ViT's 8-bit twin-uniform quantizer instead (steps searched on a bounded sample by MSE), in one of two
    ``twin_form``s: ``"fake-quant"`` (per branch ``Clip -> Q -> DQ`` with int8 zero point 0, joined by
    ``Where``) or ``"dual-gemm"`` (``X = X_R1 + X_R2``, each a plain QDQ tensor, so every consuming GEMM is
    duplicated and summed: two integer GEMMs a runtime can fuse, no ``Where`` before the GEMM). ``exclude_nodes`` (exact names), ``exclude_ops`` (op types)
    and ``exclude_regex`` (patterns matched against node names, e.g. ``"lm_head|router|gate$"``) keep nodes in
    float. ``activation_matmuls=False`` leaves MatMuls with two activation inputs (attention) in float.
    ``sparse_outputs=True`` also quantizes the output of every quantized GEMM/Conv whose weight is 2:4 sparse on
    its input axis (unless it is a graph output): TensorRT runs sparse INT8 kernels only with INT8 in and out.
    """

    name = "int8-qdq"
    description = "INT8 QDQ: per-channel int8 weights, per-tensor activations on Conv/Gemm/MatMul inputs"
    lossless = False
    needs_calibration = True
    min_opset = 13
    Options = QuantizeInt8Options

    def configure(self) -> None:
        self.placer = self.options.placer(twin=self.options.twin, sparse_outputs=self.options.sparse_outputs)

    def targets_tensorrt(self) -> bool:
        return self.options.act_dtype == "int8"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        placement = self.placer.place(import_graph(model))
        return {
            name: ReservoirObserver(name=name) if name in placement.twin_layouts
            else activation_observer(self.options.calibrator, name)
            for name in placement.activations
        }

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        placement = self.placer.place(graph)
        weights_quantized, details = quantize_weights(graph, placement.weights)
        tensors = graph.tensors()
        # Twin tensors last: the dual-GEMM form replaces their consumers, which must already read their other
        # quantized inputs.
        ordered = sorted(placement.activations.items(), key=lambda item: item[0] in placement.twin_layouts)
        for name, consumers in ordered:
            if name in placement.twin_layouts:
                params = search_twin(context.calibration[name].sample, placement.twin_layouts[name], bits=8)
                detail = {"tensor": name, "kind": "activation", "dtype": f"twin-{params.layout}",
                          "form": self.options.twin_form, "delta_r1": params.delta_r1, "delta_r2": params.delta_r2,
                          "split": params.split, "consumers": [node.name for node, _ in consumers]}
                if self.options.twin_form == "dual-gemm":
                    parts = insert_twin_parts(graph, tensors[name], params)
                    for node, index in consumers:
                        split_gemm(graph, node, index, parts)
                    details.append(detail)
                    continue
                dequantized = insert_twin(graph, tensors[name], params)
            else:
                scale, zero_point, value_range = activation_qparams(context.calibration[name], self.options)
                dequantized = insert_qdq(graph, tensors[name], scale, zero_point)
                detail = {"tensor": name, "kind": "activation", "dtype": self.options.act_dtype, "range": value_range,
                          "scale": float(scale), "zero_point": int(zero_point)}
            for node, index in consumers:
                node.inputs[index] = dequantized
            details.append({**detail, "consumers": [node.name for node, _ in consumers]})
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {
            "weights_quantized": weights_quantized,
            "activations_quantized": len(placement.activations),
            "twin_uniform": len(placement.twin_layouts),
            "nodes_skipped": len(placement.skipped),
        }
        details += [{"node": name, "kind": "skipped", "reason": reason} for name, reason in placement.skipped.items()]
        modified = bool(weights_quantized or placement.activations)
        return PassResult(export_graph(graph, model) if modified else model, modified, changes, details)
