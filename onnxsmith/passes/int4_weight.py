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
Gram matrix of the layer's input (:func:`onnxsmith.calibration.int4.gptq_quantize`; each block's step chosen by
``method`` on the updated weights: round-to-nearest for ``"rtn"``, MSE-clipped otherwise; with ``act_order`` the
channels go by decreasing activation energy and the steps are chosen beforehand). GPTQ fixes the levels, so it
does not combine with ``learn_steps``.

A block size that does not divide a layer's K: ``indivisible="fallback"`` uses the largest smaller allowed size
that does (TensorRT target: 64 or 128 only) and reports it, else skips the layer with the reason;
``"error"`` refuses the model naming the layer; ``"skip"`` keeps the layer float.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxsmith.calibration.int4 import (
    BLOCK_SIZES,
    TENSORRT_BLOCK_SIZES,
    dequantize_blocks,
    gptq_quantize,
    output_error,
    pack_int4,
    mse_scales,
    quantize_blocks,
    rtn_scales,
)
from onnxsmith.calibration.lsq import block_expander, train_weight_steps
from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.calibration.observers import GramObserver, Observer
from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxsmith.passes.graph_utils import (SUBGRAPH_SKIP_REASON, export_graph, import_graph, store_as_int4,
                                           subgraph_node_names)
from onnxsmith.passes.qdq_nodes import FLOAT_TYPES, weight_site

METHODS = ("rtn", "mse")
TARGETS = ("tensorrt", "onnxruntime")
INDIVISIBLE = ("fallback", "error", "skip")
ROUNDINGS = ("nearest", "gptq")


@dataclass
class Int4Layer:
    """A MatMul/Gemm with a constant 2-D weight, its weight in GEMM form ``[K, N]`` and the block size used."""

    node: gs.Node
    weight: gs.Constant
    block: int
    transposed: bool
    """Whether the stored weight is ``[N, K]`` (Gemm ``transB=1``)."""
    notes: list[str] = field(default_factory=list)

    @property
    def w(self) -> np.ndarray:
        values = np.asarray(self.weight.values, dtype=np.float32)
        return values.T if self.transposed else values

    @property
    def input(self) -> gs.Variable:
        return self.node.inputs[0]


class Int4Weight(Pass):
    """Blocked symmetric INT4 weight-only quantization; see the module docstring."""

    name = "int4-weight"
    description = "blocked INT4 weight-only (DequantizeLinear INT4 or MatMulNBits), RTN / MSE steps, GPTQ or LSQ option"
    lossless = False

    def __init__(
        self,
        block_size: int = 64,
        method: str = "mse",
        target: str = "tensorrt",
        indivisible: str = "fallback",
        rounding: str = "nearest",
        act_order: bool = False,
        learn_steps: int = 0,
        learn_lr: float = 5e-3,
        scale_gradient: str = "lsq",
        accuracy_level: int = 0,
        exclude_nodes: Sequence[str] = (),
        exclude_regex: Sequence[str] = (),
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {list(BLOCK_SIZES)}, got {block_size!r}")
        if target == "tensorrt" and block_size not in TENSORRT_BLOCK_SIZES:
            raise ValueError(f"TensorRT's INT4 DequantizeLinear takes block sizes {list(TENSORRT_BLOCK_SIZES)}, "
                             f"got {block_size} (use target 'onnxruntime' for other sizes)")
        for label, value, allowed in (("method", method, METHODS), ("target", target, TARGETS),
                                      ("indivisible", indivisible, INDIVISIBLE), ("rounding", rounding, ROUNDINGS)):
            if value not in allowed:
                raise ValueError(f"{label} must be one of {list(allowed)}, got {value!r}")
        if learn_steps < 0 or learn_lr <= 0 or accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"need learn_steps >= 0, learn_lr > 0, accuracy_level in 0..4; got "
                             f"{learn_steps}, {learn_lr}, {accuracy_level}")
        if rounding == "gptq" and learn_steps:
            raise ValueError("rounding 'gptq' fixes the levels; it does not combine with learn_steps")
        self.block_size, self.method, self.target, self.indivisible = block_size, method, target, indivisible
        self.rounding, self.act_order = rounding, act_order
        self.learn_steps, self.learn_lr = learn_steps, learn_lr
        self.scale_gradient, self.accuracy_level = scale_gradient, accuracy_level
        self.exclude_nodes = set(exclude_nodes)
        self.exclude_regex = [re.compile(p) for p in exclude_regex]
        self.needs_calibration = method != "rtn" or learn_steps > 0 or rounding == "gptq"
        self.min_opset = 21 if target == "tensorrt" else None

    # ------------------------------------------------------------------ layers

    def layers(self, graph: gs.Graph) -> tuple[list[Int4Layer], dict[str, str]]:
        """The layers to quantize in graph order, and the skipped candidates with the reason."""
        layers, skipped = [], {}
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            site = weight_site(node)
            if site is None:
                continue
            if site[0] is not node:
                skipped[node.name] = "weight is a Transpose of a constant (a tied embedding?), not a constant"
                continue
            weight = node.inputs[1]
            reason = self._skip_reason(node, weight)
            if reason is None:
                transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
                k = weight.values.shape[1 if transposed else 0]
                block, reason, notes = self._block_for(k)
                if block is not None:
                    layers.append(Int4Layer(node, weight, block, transposed, notes))
                    continue
            skipped[node.name] = reason
        for name in subgraph_node_names(graph, ("MatMul", "Gemm")):
            skipped[name] = SUBGRAPH_SKIP_REASON
        return layers, skipped

    def _skip_reason(self, node: gs.Node, weight: gs.Constant) -> str | None:
        if node.name in self.exclude_nodes or any(p.search(node.name) for p in self.exclude_regex):
            return "excluded"
        if weight.values.ndim != 2:
            return f"weight is {weight.values.ndim}-D (INT4 blocks need a 2-D weight)"
        if np.dtype(weight.values.dtype) not in FLOAT_TYPES:
            return f"weight dtype {weight.values.dtype} is not float32/float16"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA"
        if any(reader is not node for reader in weight.outputs):
            return "weight is shared with other nodes"
        return None

    def _block_for(self, k: int) -> tuple[int | None, str | None, list[str]]:
        if k % self.block_size == 0:
            return self.block_size, None, []
        if self.indivisible == "error":
            return None, f"block size {self.block_size} does not divide K = {k}", []
        allowed = TENSORRT_BLOCK_SIZES if self.target == "tensorrt" else BLOCK_SIZES
        smaller = [b for b in allowed if b < self.block_size and k % b == 0]
        if self.indivisible == "fallback" and smaller:
            return max(smaller), None, [f"block {max(smaller)}: {self.block_size} does not divide K = {k}"]
        return None, f"block size {self.block_size} does not divide K = {k}" + (
            f" and no allowed smaller block ({list(allowed)}) does" if self.indivisible == "fallback" else ""), []

    def requires(self, model: onnx.ModelProto, context: PassContext) -> None:
        super().requires(model, context)
        if self.indivisible == "error":
            _, skipped = self.layers(import_graph(model))
            bad = {name: reason for name, reason in skipped.items() if "does not divide" in reason}
            if bad:
                name, reason = next(iter(bad.items()))
                raise PreconditionError(f"pass {self.name!r}: {reason} at node {name!r} "
                                        f"({len(bad)} layer(s); choose another --block-size or indivisible='fallback')")

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
                                                      "block": layer.block, "method": self.method,
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
            if self.target == "onnxruntime" and not any(o.domain == "com.microsoft" for o in result.opset_import):
                result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        changes = {"layers_quantized": len(layers), "layers_skipped": len(skipped), "block_size": self.block_size,
                   "method": self.method, "rounding": self.rounding, "target": self.target,
                   "learn_steps": self.learn_steps}
        records = list(details.values()) + [{"node": n, "kind": "skipped", "reason": r} for n, r in skipped.items()]
        return PassResult(result, bool(layers), changes, records)

    def _levels(self, layer: Int4Layer, gram: np.ndarray | None, detail: dict) -> tuple[np.ndarray, np.ndarray]:
        """The layer's INT4 levels ``[K, N]`` and steps; ``detail`` gets the relative output error."""
        w = layer.w
        if self.rounding == "gptq":
            levels, steps = gptq_quantize(w, gram, layer.block, mse=self.method != "rtn", act_order=self.act_order)
        else:
            steps = rtn_scales(w, layer.block) if self.method == "rtn" else \
                mse_scales(w, layer.block, channel_weights=np.diag(gram))
            if self.learn_steps:
                result = train_weight_steps(w, gram, steps, block_expander(layer.block, 1, *w.shape), 4,
                                            self.learn_steps, self.learn_lr, self.scale_gradient)
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
                  "form": "DequantizeLinear INT4" if self.target == "tensorrt" else "MatMulNBits"}
        dtype = layer.weight.values.dtype
        prefix = f"{layer.node.name}_weight"
        if self.target == "tensorrt":
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
            attrs={"K": k, "N": n, "bits": 4, "block_size": layer.block, "accuracy_level": self.accuracy_level},
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

