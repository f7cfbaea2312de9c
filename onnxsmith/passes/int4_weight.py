"""Lossy: blocked symmetric INT4 weight-only quantization of MatMul / Gemm layers with a constant 2-D weight.

Each weight ``W [K, N]`` (GEMM form; a ``transB`` Gemm's stored ``[N, K]``) gets one step per ``block_size``
input channels of each output channel (:mod:`onnxsmith.calibration.int4`). Activations stay float.

Forms (``target``):

- ``"tensorrt"``: an ``INT4`` (type 22, packed) initializer of the levels in the weight's stored layout, read by an
  opset-21 ``DequantizeLinear`` blocked along K (``axis`` the K axis, ``block_size``, zero point omitted = 0)
  whose scale has the weight's dtype (the activation dtype): TensorRT's INT4 weight-only form. onnxruntime runs it
  too; its ``DQ -> MatMul`` fusion then computes with int8-quantized activations unless the session sets
  ``session.qdq_matmulnbits_accuracy_level`` to 0 (onnxsmith's sessions do).
- ``"onnxruntime"``: ``com.microsoft.MatMulNBits`` (bits 4, the same levels stored as unsigned ``q + 8``, default
  zero point 8, ``accuracy_level`` as given), onnxruntime's fast 4-bit CPU kernel; a Gemm's ``alpha`` goes into
  the scales and ``beta * C`` into an ``Add``.

Steps (``method``): ``"rtn"`` ``max|block| / 7``; ``"mse"`` the clipped step minimising the block's error
weighted by the input channels' mean squares (calibration). AWQ-style scaling is the lossless ``awq-scale``
pass run before this one (recipes ``int4-awq``, ``int4-gptq``). ``learn_steps > 0`` then trains the steps of
every layer with LSQ to minimise its output error on the calibration tokens
(:func:`onnxsmith.calibration.lsq.train_weight_steps`).

Rounding (``rounding``): ``"nearest"``, or ``"gptq"``: GPTQ's error-compensating rounding through the inverse
Gram matrix of the layer's input (:func:`onnxsmith.calibration.gptq.gptq_quantize`; each block's step chosen by
``method`` on the updated weights: round-to-nearest for ``"rtn"``, MSE-clipped otherwise; with ``act_order`` the
channels go by decreasing activation energy and the steps are chosen beforehand). GPTQ fixes the levels, so it
does not combine with ``learn_steps``.

A block size that does not divide a layer's K: ``indivisible="fallback"`` uses the largest smaller allowed size
that does (TensorRT target: 64 or 128 only) and reports it, else skips the layer with the reason;
``"error"`` refuses the model naming the layer; ``"skip"`` keeps the layer float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxsmith.calibration.int4 import dequantize_blocks, mse_scales, output_error, quantize_blocks, rtn_scales
from onnxsmith.calibration.learning import SCALE_GRADIENTS
from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.calibration.observers import GramObserver, Observer
from onnxsmith.core.graph import export_graph, import_graph, store_as_int4
from onnxsmith.core.int4 import pack_int4
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxsmith.rewrite.int4_layers import INDIVISIBLE, Int4Layer, Int4SelectionOptions

METHODS = ("rtn", "mse")
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class Int4WeightOptions(Int4SelectionOptions):
    """The selection options of :mod:`onnxsmith.rewrite.int4_layers` and how the levels are chosen."""

    method: str = option("mse", "INT4 steps: round-to-nearest, or MSE-clipped on the calibration data", choices=METHODS)
    indivisible: str = option("fallback", "a block size that does not divide K: a smaller allowed block, refuse the "
                              "model, or keep the layer float", choices=INDIVISIBLE)
    rounding: str = option("nearest", "round to nearest, or GPTQ's error-compensating rounding", choices=ROUNDINGS)
    act_order: bool = option(False, "GPTQ: take the channels by decreasing activation energy")
    learn_steps: int = option(0, "LSQ training steps per layer (0: no learning)", minimum=0)
    learn_lr: float = option(5e-3, "learning rate of the LSQ steps", above=0)
    scale_gradient: str = option("lsq", "gradient of the learned steps (clip: saturation term only)",
                                 choices=SCALE_GRADIENTS)
    accuracy_level: int = option(0, "MatMulNBits accuracy_level (onnxruntime target)", minimum=0, maximum=4)

    def check(self) -> None:
        super().check()
        if self.rounding == "gptq" and self.learn_steps:
            raise ValueError("rounding 'gptq' fixes the levels; it does not combine with learn_steps")


class Int4Weight(Pass):
    """Blocked symmetric INT4 weight-only quantization; see the module docstring."""

    name = "int4-weight"
    description = "blocked INT4 weight-only (DequantizeLinear INT4 or MatMulNBits), RTN / MSE steps, GPTQ or LSQ option"
    lossless = False

    Options = Int4WeightOptions

    def configure(self) -> None:
        o = self.options
        self.selection = o.selection(o.indivisible)
        self.needs_calibration = o.method != "rtn" or o.learn_steps > 0 or o.rounding == "gptq"
        self.min_opset = 21 if o.target == "tensorrt" else None

    def layers(self, graph: gs.Graph) -> tuple[list[Int4Layer], dict[str, str]]:
        """The layers to quantize in graph order, and the skipped candidates with the reason."""
        return self.selection.layers(graph)

    def requires(self, model: onnx.ModelProto, context: PassContext) -> None:
        super().requires(model, context)
        if self.options.indivisible == "error":
            _, skipped = self.layers(import_graph(model))
            bad = {name: reason for name, reason in skipped.items() if "does not divide" in reason}
            if bad:
                name, reason = next(iter(bad.items()))
                raise PreconditionError(f"pass {self.name!r}: {reason} at node {name!r} "
                                        f"({len(bad)} layer(s); choose another --block-size or indivisible='fallback')")

    def targets_tensorrt(self) -> bool:
        return self.options.target == "tensorrt"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        layers, _ = self.layers(import_graph(model))
        return {layer.input.name: GramObserver(name=layer.input.name) for layer in layers}

    # ------------------------------------------------------------------ rewrite

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        layers, skipped = self.layers(graph)
        grams = {}
        if self.needs_calibration:
            grams = {layer.input.name: np.asarray(context.calibration[layer.input.name].gram, np.float64)
                     for layer in layers}
        details: dict[str, dict] = {layer.node.name: {"node": layer.node.name, "kind": "weight", "dtype": "int4",
                                                      "block": layer.block, "method": self.options.method,
                                                      "notes": list(layer.notes)} for layer in layers}
        int4_names: set[str] = set()
        bar = tqdm(layers, desc="int4 weights", unit="layer", leave=False,
                   disable=None if context.progress else True)
        for layer in bar:
            gram = grams.get(layer.input.name)
            levels, steps = self._levels(layer, gram, details[layer.node.name])
            details[layer.node.name].update(self._emit(graph, layer, levels, steps, int4_names))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result = export_graph(graph, model) if layers else model
        if layers:
            store_as_int4(result, int4_names)
            if self.options.target == "onnxruntime" and not any(o.domain == "com.microsoft" for o in result.opset_import):
                result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        changes = {"layers_quantized": len(layers), "layers_skipped": len(skipped), "block_size": self.options.block_size,
                   "method": self.options.method, "rounding": self.options.rounding, "target": self.options.target,
                   "learn_steps": self.options.learn_steps}
        records = list(details.values()) + [{"node": n, "kind": "skipped", "reason": r} for n, r in skipped.items()]
        return PassResult(result, bool(layers), changes, records)

    def _levels(self, layer: Int4Layer, gram: np.ndarray | None, detail: dict) -> tuple[np.ndarray, np.ndarray]:
        """The layer's INT4 levels ``[K, N]`` and steps; ``detail`` gets the relative output error."""
        w, o = layer.w, self.options
        if o.rounding == "gptq":
            from onnxsmith.calibration.gptq import gptq_quantize  # torch, only when asked for

            levels, steps = gptq_quantize(w, gram, layer.block, mse=o.method != "rtn", act_order=o.act_order)
        else:
            steps = rtn_scales(w, layer.block) if o.method == "rtn" else \
                mse_scales(w, layer.block, channel_weights=np.diag(gram))
            if o.learn_steps:
                from onnxsmith.calibration.lsq import block_expander, train_weight_steps  # torch

                result = train_weight_steps(w, gram, steps, block_expander(layer.block, 1, *w.shape), 4,
                                            o.learn_steps, o.learn_lr, o.scale_gradient)
                steps = result.weight_steps
                detail.update(learned_from=result.loss_before, learned_to=result.loss_after)
            levels = quantize_blocks(w, steps, layer.block)
        if gram is not None:
            detail["output_error"] = output_error(gram, w - dequantize_blocks(levels, steps, layer.block)) / (
                output_error(gram, w) or 1.0)
        return levels, steps

    def _emit(self, graph: gs.Graph, layer: Int4Layer, levels: np.ndarray, steps: np.ndarray,
              int4_names: set[str]) -> dict:
        w = layer.w
        restored = dequantize_blocks(levels, steps, layer.block)
        detail = {"sqnr_db": sqnr_db(float(np.sum(w.astype(np.float64) ** 2)), float(np.sum((w - restored) ** 2))),
                  "form": "DequantizeLinear INT4" if self.options.target == "tensorrt" else "MatMulNBits"}
        dtype = layer.weight.values.dtype
        prefix = f"{layer.node.name}_weight"
        if self.options.target == "tensorrt":
            stored, scale = (levels.T, steps.T) if layer.transposed else (levels, steps)
            q_const = gs.Constant(f"{prefix}_int4", np.ascontiguousarray(stored))
            int4_names.add(q_const.name)
            output = gs.Variable(f"{prefix}_dequantized", dtype=dtype, shape=list(layer.weight.values.shape))
            graph.nodes.append(gs.Node(
                "DequantizeLinear", f"{prefix}_DequantizeLinear",
                attrs={"axis": 1 if layer.transposed else 0, "block_size": layer.block},
                inputs=[q_const, gs.Constant(f"{prefix}_scale", np.ascontiguousarray(scale, dtype=dtype))],
                outputs=[output]))
            layer.node.inputs[1] = output
        else:
            self._emit_matmul_nbits(graph, layer, levels, steps, prefix)
        return detail

    def _emit_matmul_nbits(self, graph: gs.Graph, layer: Int4Layer, levels: np.ndarray, steps: np.ndarray,
                           prefix: str) -> None:
        node = layer.node
        k, n = levels.shape
        blocks = k // layer.block
        dtype = layer.weight.values.dtype
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        packed = pack_int4((levels.T + 8).astype(np.uint8)).reshape(n, blocks, layer.block // 2)
        scales = (steps.T * alpha).astype(dtype).reshape(-1)
        output = node.outputs[0]
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        product = output if bias is None else gs.Variable(f"{node.name}_nbits", dtype=output.dtype,
                                                          shape=output.shape)
        graph.nodes.append(gs.Node(
            "MatMulNBits", f"{node.name}_MatMulNBits", domain="com.microsoft",
            attrs={"K": k, "N": n, "bits": 4, "block_size": layer.block, "accuracy_level": self.options.accuracy_level},
            inputs=[node.inputs[0], gs.Constant(f"{prefix}_nbits", packed),
                    gs.Constant(f"{prefix}_nbits_scale", scales)],
            outputs=[product]))
        if bias is not None:
            beta = float(node.attrs.get("beta", 1.0))
            if beta != 1.0:
                if not isinstance(bias, gs.Constant):
                    raise PreconditionError(f"Gemm {node.name!r}: beta != 1 with a non-constant C")
                bias = gs.Constant(f"{prefix}_bias", (bias.values * beta).astype(bias.values.dtype))
            graph.nodes.append(gs.Node("Add", f"{node.name}_bias", inputs=[product, bias], outputs=[output]))
        node.outputs.clear()
        node.inputs.clear()

