"""Lossy: k-bit QDQ whose steps PTQ4ViT's layer-wise search picks (base PTQ, Hessian-guided, twin-uniform).

Placement follows ``int8-qdq`` (Conv/Gemm/MatMul with a constant weight, also behind a ``Transpose``, and
activation x activation MatMuls; the same exclusions), but every layer is quantized on its own, as PTQ4ViT's
per-layer quantizers are: its own per-output-channel weight steps and one QDQ group per activation input (a
tensor read by three projections gets three groups, each with its layer's step).

Search (:mod:`onnxsmith.calibration.scale_search`): weight layers ``O = X @ W`` run :func:`search_layer`,
activation x activation MatMuls :func:`search_activation_matmul`, with ``metric`` ``"mse"``, ``"cosine"`` or
``"hessian"`` (``G = dL/dO`` from :mod:`onnxsmith.calibration.gradients` with ``loss``; where the graph has
no gradients, e.g. an op the torch interpreter lacks, the search uses ``"cosine"`` and says so), on the first
``samples`` calibration feeds, over the grid ``Δ0 * (alpha + i (beta - alpha) / n)`` for ``rounds`` alternating
rounds (``rounds=0``: the initial max-based steps, no search). Conv layers are searched as their im2col GEMM
(2-D, ungrouped, explicit symmetric padding); Gemm with ``transA`` reads its transposed input. Any other
layout keeps the initial steps and is reported as not searched. A layer's GEMM rows (tokens, a Conv's output
positions) are at most ``search_rows``, drawn evenly from every sample at fixed-seed random positions (0: all):
a detector's 320 x 320 feature maps give 100k rows a sample, which the search does not need.

Numerics: weights are ``wbits``-bit symmetric (levels ``±2**(wbits-1)``, stored in int8 with zero point 0);
activations ``abits``-bit symmetric per tensor, stored as ``act_dtype`` (uint8 with zero point 128 for
onnxruntime's fast CPU kernels, or int8 with zero point 0 for TensorRT; same values), below 8 bits narrowed by a
float ``Clip`` before the pair. With ``twin=True`` post-Softmax and post-GELU inputs get PTQ4ViT's
``abits``-bit twin-uniform quantizer in ``twin_form`` ``"fake-quant"`` or ``"dual-gemm"`` (see ``int8-qdq``).

Granularity (PTQ-SL, :mod:`onnxsmith.calibration.blocks`): ``weight_grid`` (``"per-channel"``, ``"per-tensor"``
or ``"NVxNH"``: output x input channel blocks) gives every searched layer one weight step per block, searched
per block; one input block is emitted as a per-tensor or per-channel ``DequantizeLinear`` (opset 13), more as
an opset-21 blocked ``DequantizeLinear`` on the weight's input axis (the pass then needs opset 21).
``act_groups`` splits each uniform activation input's features into that many groups with one step each,
emitted as float fake quantization (``Div -> Round -> Clip -> Mul``; no runtime has an integer GEMM for it). Layouts the search cannot express stay per-channel.
``weight_only`` quantizes weights alone: activations stay float, activation x activation MatMuls untouched.
``block_size`` (overrides ``weight_grid``): one step per output channel and ``block_size`` input channels, for a
layer whose input channels it divides (others keep the per-channel grid, said in the details).
``weight_dtype="int4"`` (``wbits <= 4``) stores blocked weights as ONNX ``INT4`` (type 22, packed) instead of int8.

Learned steps (:mod:`onnxsmith.calibration.lsq`): ``learn_steps > 0`` then trains each GEMM layer's weight block
steps and its uniform per-tensor activation step with LSQ (``scale_gradient``, ``learn_lr``) to reproduce the
float layer's output on ``learn_rows`` calibration rows drawn at random (fixed seed; layer-wise distillation),
starting from the searched steps; the best steps seen are kept, so a layer's reconstruction error never rises.
Twin-uniform and grouped activations keep their searched steps. ``rounding="gptq"`` then rounds the weights of
MatMul / Gemm layers with a per-output-channel grid by GPTQ (error compensation through the inverse Gram matrix of
the layer's float input rows; :func:`onnxsmith.calibration.gptq.gptq_quantize`): with learned steps, or
``wbits != 4``, those steps fixed; else 4-bit blocks get GPTQ's own MSE-clipped steps on the updated weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxsmith.calibration.blocks import BlockGrid, GridSpec, initial_weight_steps
from onnxsmith.calibration.int4 import BLOCK_SIZES, dequantize_blocks
from onnxsmith.calibration.learning import LOSSES, SCALE_GRADIENTS
from onnxsmith.calibration.metrics import METRICS, sqnr_db
from onnxsmith.calibration.observers import Observer, SampleObserver
from onnxsmith.calibration.scale_search import (
    ActQuantizer,
    FloatActQuantizer,
    TwinActQuantizer,
    UniformActQuantizer,
    search_activation_matmul,
    search_layer,
)
from onnxsmith.calibration.twin_uniform import TwinParams
from onnxsmith.analysis.qdq_placement import Placement
from onnxsmith.analysis.weights import weight_input_axis, weight_site
from onnxsmith.core.graph import export_graph, import_graph, store_as_int4
from onnxsmith.core.options import option
from onnxsmith.core.pass_base import GradientRequest, Pass, PassContext, PassResult
from onnxsmith.rewrite.int8_qdq import PlacementOptions, act_dtype_option, twin_form_option
from onnxsmith.rewrite.qdq_nodes import (insert_grouped_fake_quant, insert_symmetric_qdq, insert_twin,
                                         insert_twin_parts, quantize_weight, quantize_weight_blocks, split_gemm)

MIN_BITS, MAX_BITS = 4, 8
GRADIENT_FREE_METRIC = "cosine"
"""The metric the Hessian search falls back to when the graph's gradients cannot be computed."""


@dataclass(frozen=True)
class PtqOptions(PlacementOptions):
    """The search, the numerics, the granularity and the learned steps of the module docstring."""

    wbits: int = option(8, "weight bits", minimum=MIN_BITS, maximum=MAX_BITS)
    abits: int = option(8, "activation bits", minimum=MIN_BITS, maximum=MAX_BITS)
    metric: str = option("cosine", "layer-wise scale search metric", choices=METRICS)
    twin: bool = option(False, "twin-uniform quantizers on post-Softmax/GELU GEMM inputs")
    twin_form: str = twin_form_option()
    act_dtype: str = act_dtype_option()
    loss: str = option("auto", "loss whose gradients weight the hessian metric (auto: from the model's task)",
                       choices=LOSSES)
    rounds: int = option(3, "alternating search rounds (0: the initial max-based steps)", minimum=0)
    n: int = option(100, "candidate steps per search round", minimum=1)
    alpha: float = option(0.01, "smallest candidate step, as a multiple of the initial step", above=0)
    beta: float = option(1.2, "largest candidate step, as a multiple of the initial step", above=0)
    samples: int = option(32, "calibration feeds the search reads", minimum=1)
    weight_grid: str = option("per-channel", "weight blocks: output x input channel blocks, e.g. 16x4, allx2, "
                              "per-channel, per-tensor", check=GridSpec.parse)
    act_groups: int = option(1, "activation feature groups with one step each (fake-quant only)", minimum=1)
    weight_only: bool = option(False, "quantize weights only; activations stay float")
    block_size: int | None = option(None, "input channels per weight step (overrides weight_grid)", minimum=1)
    weight_dtype: str = option("int8", "storage of blocked weights: int8, or packed INT4 (wbits <= 4)",
                               choices=("int8", "int4"))
    learn_steps: int = option(0, "LSQ training steps per layer (0: no learning)", minimum=0)
    learn_lr: float = option(5e-3, "learning rate of the LSQ steps", above=0)
    learn_rows: int = option(512, "calibration rows the LSQ steps are trained on", minimum=1)
    search_rows: int = option(8192, "most GEMM rows a layer's search reads, drawn evenly from the samples (0: all)",
                              minimum=0)
    scale_gradient: str = option("lsq", "gradient of the learned steps (clip: saturation term only)",
                                 choices=SCALE_GRADIENTS)
    rounding: str = option("nearest", "round to nearest, or GPTQ's error-compensating rounding",
                           choices=("nearest", "gptq"))

    def check(self) -> None:
        if self.alpha > self.beta:
            raise ValueError(f"need alpha <= beta, got alpha={self.alpha}, beta={self.beta}")
        if self.weight_dtype == "int4" and self.wbits > 4:
            raise ValueError(f"weight_dtype 'int4' needs wbits <= 4, got {self.wbits}")


@dataclass
class Layer:
    """One quantized node: its activation input indices and, for weight layers, where the weight enters."""

    node: gs.Node
    act_inputs: list[int]
    weight: tuple[gs.Node, int, int] | None
    """(node reading the constant, input index, output-channel axis of the constant), as in ``weight_site``."""


@dataclass
class LayerPlan:
    """A layer's chosen steps: weight steps (weight layers) and each activation input's step.

    ``weight_scale`` holds block steps of ``grid`` (``[input blocks, output blocks]``), or per-channel steps when
    ``grid`` is None (layouts without a GEMM form). An activation's step is an array of per-group steps when
    ``act_grid`` splits its features.
    """

    weight_scale: np.ndarray | None
    act_params: dict[int, float | TwinParams | np.ndarray]
    searched: bool
    metric_value: float | None
    grid: BlockGrid | None = None
    act_grid: BlockGrid | None = None
    learned: tuple[float, float] | None = None
    """Relative reconstruction loss before / after learning the steps (None: not learned)."""
    rounded: np.ndarray | None = None
    """GPTQ-rounded weight ``[K, N]`` (levels times steps) to emit instead of rounding to nearest."""


class PtqQuantize(Pass):
    """k-bit QDQ with PTQ4ViT's layer-wise scale search; see the module docstring."""

    name = "ptq-qdq"
    description = "k-bit QDQ with PTQ4ViT layer-wise scale search (mse/cosine/hessian metric, optional twin-uniform)"
    lossless = False
    needs_calibration = True
    min_opset = 13

    Options = PtqOptions

    def configure(self) -> None:
        o = self.options
        self.grid_spec = GridSpec.parse(o.weight_grid)
        blocked = o.block_size is not None or self.grid_spec.in_blocks != 1
        self.min_opset = 21 if blocked else 13  # blocked DequantizeLinear is opset 21
        self.placer = o.placer(twin=o.twin and not o.weight_only,
                               activation_matmuls=o.activation_matmuls and not o.weight_only)

    # ------------------------------------------------------------------ calibration

    def targets_tensorrt(self) -> bool:
        return self.options.act_dtype == "int8"

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        layers, _ = self.layers(import_graph(model))
        names = {layer.node.inputs[i].name for layer in layers for i in layer.act_inputs}
        return {name: SampleObserver(self.options.samples, name=name) for name in names}

    def gradient_request(self, model: onnx.ModelProto) -> GradientRequest | None:
        if self.options.metric != "hessian":
            return None
        layers, _ = self.layers(import_graph(model))
        names = {layer.node.outputs[0].name for layer in layers}
        return GradientRequest({name: SampleObserver(self.options.samples, name=name) for name in names}, self.options.loss,
                               fallback=f"{GRADIENT_FREE_METRIC} metric")

    def layers(self, graph: gs.Graph) -> tuple[list[Layer], Placement]:
        """The layers to quantize in graph order, and the placement they come from (twin layouts, skipped nodes)."""
        placement = self.placer.place(graph)
        reads: dict[str, list[int]] = {}
        for consumers in placement.activations.values():
            for node, index in consumers:
                reads.setdefault(node.name, []).append(index)
        layers = []
        for node in graph.nodes:
            if node.name in reads:
                site = weight_site(node)
                layers.append(Layer(node, sorted(reads[node.name]), site if site and site[2] is not None else None))
        return layers, placement

    # ------------------------------------------------------------------ rewrite

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = import_graph(model)
        layers, placement = self.layers(graph)
        metric = self.options.metric
        if metric == "hessian" and context.gradients is None:
            metric = GRADIENT_FREE_METRIC
        details: list[dict] = []
        searched = 0
        bar = tqdm(layers, desc="ptq-qdq layers", unit="layer", leave=False,
                   disable=None if context.progress else True)
        for layer in bar:
            quantizers = {i: self._act_quantizer(layer.node.inputs[i].name, placement.twin_layouts)
                          for i in layer.act_inputs}
            plan = self._plan(layer, quantizers, context, metric)
            searched += plan.searched
            details += self._emit(graph, layer, plan, metric)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        changes = {
            "layers_quantized": len(layers),
            "layers_searched": searched,
            "twin_uniform_inputs": sum(1 for d in details if str(d.get("dtype", "")).startswith("twin")),
            "wbits": self.options.wbits,
            "abits": self.options.abits,
            "metric": metric if self.options.rounds else "none",
            "weight_grid": (f"per-channel x {self.options.block_size} input channels" if self.options.block_size
                            else str(self.grid_spec)),
            "layers_learned": sum(1 for d in details if d.get("learned_from") is not None),
            "weight_scales": sum(d.get("scales", 0) for d in details if d.get("kind") == "weight"),
        }
        details += [{"node": name, "kind": "skipped", "reason": reason} for name, reason in placement.skipped.items()]
        if metric != self.options.metric:
            changes["metric_fallback"] = f"hessian -> {metric}"
            details.append({"kind": "fallback", "reason": f"hessian metric needs gradients, which are unavailable: "
                                                          f"{context.gradients_unavailable}"})
        modified = bool(layers)
        result = export_graph(graph, model) if modified else model
        store_as_int4(result, {d["int4_initializer"] for d in details if "int4_initializer" in d})
        return PassResult(result, modified, changes, details)

    def _act_quantizer(self, tensor: str, twin_layouts: dict[str, str]) -> ActQuantizer:
        if self.options.weight_only:
            return FloatActQuantizer(self.options.abits)
        if tensor in twin_layouts:
            return TwinActQuantizer(twin_layouts[tensor], self.options.abits)  # type: ignore[arg-type]
        return UniformActQuantizer(self.options.abits)

    def _plan(self, layer: Layer, quantizers: dict[int, ActQuantizer], context: PassContext,
              metric: str) -> LayerPlan:
        samples = {i: context.calibration[layer.node.inputs[i].name].samples for i in layer.act_inputs}
        grads = None
        if metric == "hessian":
            grads = context.gradients[layer.node.outputs[0].name].samples
        options = dict(metric=metric, n=self.options.n, alpha=self.options.alpha, beta=self.options.beta, rounds=self.options.rounds)
        if layer.weight is None:
            a, b = layer.act_inputs
            result = search_activation_matmul(samples[a], samples[b], bits=self.options.abits, G=grads,
                                              quantizers=(quantizers[a], quantizers[b]), **options)
            return LayerPlan(None, {a: result.a_scale, b: result.b_scale}, self.options.rounds > 0, result.metric_value)
        (index,) = layer.act_inputs
        matrices = _as_gemm(layer, samples[index], grads, self.options.search_rows)
        if matrices is None:
            return self._initial_plan(layer, index, quantizers[index], samples[index])
        x, w, g = matrices
        reader, weight_index, _ = layer.weight
        unit = int(np.prod(reader.inputs[weight_index].values.shape[2:])) if layer.node.op == "Conv" else 1
        grid = self._grid(w.shape, unit)
        gram = x.T.astype(np.float64) @ x / len(x) if self.options.rounding == "gptq" else None
        act_grid = None
        if self.options.act_groups > 1 and isinstance(quantizers[index], UniformActQuantizer):
            act_grid = GridSpec(1, self.options.act_groups).grid(w.shape[0], 1, unit=unit)
        result = search_layer(x, w, w_bits=self.options.wbits, a_bits=self.options.abits, G=g, act_quantizer=quantizers[index],
                              weight_grid=grid, act_groups=act_grid, **options)
        plan = LayerPlan(result.weight_scale, {index: result.act_scale}, self.options.rounds > 0, result.metric_value,
                         grid, act_grid)
        if self.options.learn_steps and act_grid is None and not isinstance(quantizers[index], TwinActQuantizer):
            rows = x if len(x) <= self.options.learn_rows else \
                x[np.random.default_rng(0).choice(len(x), self.options.learn_rows, replace=False)]
            from onnxsmith.calibration.lsq import block_expander, train_layer  # torch

            learned = train_layer(rows, w, plan.weight_scale, block_expander(grid.row_block, grid.col_block, *w.shape),
                                  self.options.wbits, plan.act_params[index], self.options.abits, self.options.learn_steps, self.options.learn_lr,
                                  self.options.scale_gradient)
            plan.weight_scale, plan.learned = learned.weight_steps, (learned.loss_before, learned.loss_after)
            if learned.act_step is not None:
                plan.act_params[index] = float(np.float32(learned.act_step))
        if self.options.rounding == "gptq" and grid.col_block == 1 and layer.weight[0] is layer.node \
                and layer.node.op in ("MatMul", "Gemm"):
            half = 2 ** (self.options.wbits - 1)
            own_steps = self.options.wbits == 4 and plan.learned is None and grid.row_block in BLOCK_SIZES
            from onnxsmith.calibration.gptq import gptq_quantize  # torch

            levels, steps = gptq_quantize(w, gram, grid.row_block, steps=None if own_steps else plan.weight_scale,
                                          levels=(-half, half - 1))
            plan.weight_scale, plan.rounded = steps, dequantize_blocks(levels, steps, grid.row_block)
        return plan

    def _grid(self, shape: tuple[int, int], unit: int) -> BlockGrid:
        """The weight grid of a ``[K, N]`` GEMM: ``block_size`` input channels per block where it divides the
        layer's input channels, else ``weight_grid``."""
        channels = shape[0] // unit
        if self.options.block_size is not None and channels % self.options.block_size == 0:
            return GridSpec(None, channels // self.options.block_size).grid(*shape, unit=unit)
        spec = GridSpec(None, 1) if self.options.block_size is not None else self.grid_spec
        return spec.grid(*shape, unit=unit)

    def _initial_plan(self, layer: Layer, index: int, quantizer: ActQuantizer, samples: list[np.ndarray]) -> LayerPlan:
        """Max-based steps for a layer the search cannot express."""
        reader, weight_index, axis = layer.weight
        values = np.asarray(reader.inputs[weight_index].values, dtype=np.float32)
        amax = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
        scale = initial_weight_steps(amax, self.options.wbits)
        step, _ = quantizer.steps(np.concatenate([s.ravel() for s in samples]), self.options.alpha, self.options.beta, self.options.n)
        return LayerPlan(scale, {index: quantizer.params(step)}, False, None)

    def _emit(self, graph: gs.Graph, layer: Layer, plan: LayerPlan, metric: str) -> list[dict]:
        """Insert the layer's weight DQ and activation QDQ groups (twin inputs last: dual-GEMM copies the node)."""
        node = layer.node
        feature_axis = _feature_axis(layer) if layer.weight is not None else -1  # read before the weight is replaced
        details: list[dict] = [{"node": node.name, "kind": "layer", "searched": plan.searched,
                                "metric": metric, "metric_value": plan.metric_value}]
        if plan.learned is not None:
            details[0].update(learned_from=plan.learned[0], learned_to=plan.learned[1])
        if layer.weight is not None:
            reader, index, axis = layer.weight
            if plan.grid is None:
                dequantized, detail = quantize_weight(graph, reader.inputs[index], axis, plan.weight_scale,
                                                      self.options.wbits, prefix=f"{node.name}_weight")
                detail["scales"] = int(np.size(plan.weight_scale))
            else:
                float_input = self.options.weight_only or plan.act_grid is not None
                in_axis = weight_input_axis(node, reader, index)
                weight = reader.inputs[index]
                if plan.rounded is not None:  # the GPTQ levels re-quantize to themselves
                    original = weight.values
                    weight = gs.Constant(weight.name, np.ascontiguousarray(
                        plan.rounded.T if in_axis == 1 else plan.rounded).astype(original.dtype))
                dequantized, detail = quantize_weight_blocks(graph, weight, axis, in_axis,
                                                             plan.weight_scale, plan.grid, self.options.wbits,
                                                             prefix=f"{node.name}_weight", guard=float_input,
                                                             storage=self.options.weight_dtype)
                if plan.rounded is not None:
                    error = float(np.sum((original.astype(np.float32) - weight.values) ** 2.0))
                    detail.update(rounding="gptq", sqnr_db=sqnr_db(float(np.sum(original.astype(np.float64) ** 2)),
                                                                   error))
            reader.inputs[index] = dequantized
            details.append({**detail, "node": node.name})
        ordered = sorted(((i, p) for i, p in plan.act_params.items() if p is not None),
                         key=lambda item: isinstance(item[1], TwinParams))
        for index, params in ordered:
            tensor = node.inputs[index]
            prefix = f"{node.name}_input{index}"
            detail = {"tensor": tensor.name, "kind": "activation", "node": node.name}
            if isinstance(params, TwinParams):
                details.append({**detail, "dtype": f"twin-{params.layout}", "form": self.options.twin_form, "bits": params.bits,
                                "delta_r1": params.delta_r1, "delta_r2": params.delta_r2, "split": params.split})
                if self.options.twin_form == "dual-gemm":
                    split_gemm(graph, node, index, insert_twin_parts(graph, tensor, params, prefix))
                else:
                    node.inputs[index] = insert_twin(graph, tensor, params, prefix)
                continue
            if isinstance(params, np.ndarray):
                steps = np.repeat(params, plan.act_grid.channel_block)[: plan.act_grid.k // plan.act_grid.unit]
                node.inputs[index] = insert_grouped_fake_quant(graph, tensor, steps, feature_axis, self.options.abits, prefix)
                details.append({**detail, "dtype": "fake-quant", "bits": self.options.abits, "groups": len(params),
                                "scale": [float(p) for p in params]})
                continue
            node.inputs[index] = insert_symmetric_qdq(graph, tensor, params, self.options.abits, self.options.act_dtype, prefix)
            details.append({**detail, "dtype": self.options.act_dtype, "bits": self.options.abits, "scale": params})
        return details


def _feature_axis(layer: Layer) -> int:
    """The feature axis of the layer's activation input, counted from the last axis."""
    node = layer.node
    if node.op == "Conv":
        return -(np.ndim(node.inputs[1].values) - 1)
    return -2 if node.op == "Gemm" and node.attrs.get("transA", 0) else -1


def _as_gemm(
    layer: Layer, samples: list[np.ndarray], grads: list[np.ndarray] | None, max_rows: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The layer as ``O = X @ W``: input rows ``X [R, K]``, ``W [K, N]`` and gradient rows ``G [R, N]``, with at
    most ``max_rows`` rows (0: all) taken evenly from the samples at fixed-seed random positions, the same in ``X``
    and ``G``.

    None when the layout has no such form here (Conv other than 2-D ungrouped with explicit symmetric pads).
    """
    node = layer.node
    reader, index, _ = layer.weight
    constant = np.asarray(reader.inputs[index].values, dtype=np.float32)
    g_parts = None
    if grads is not None:  # Conv gradients are [B, M, H, W]: channels last, then rows
        g_parts = [_rows(np.moveaxis(gr, 1, -1) if node.op == "Conv" else gr) for gr in grads]
    if node.op == "Conv":
        layout = _conv_layout(node, constant)
        if layout is None:
            return None
        x_parts = (_conv_rows(layout, constant, s) for s in samples)
        w = constant.reshape(constant.shape[0], -1).T
    else:
        if reader is not node:  # MatMul reading Transpose(constant)
            perm = reader.attrs.get("perm", list(reversed(range(constant.ndim))))
            w = np.transpose(constant, perm)
        elif node.op == "Gemm":
            w = constant.T if node.attrs.get("transB", 0) else constant
        else:
            w = constant
        if w.ndim != 2:
            return None
        transposed = node.op == "Gemm" and node.attrs.get("transA", 0)
        x_parts = (s.T if transposed else _rows(s) for s in samples)
    per_sample = -(-max_rows // len(samples)) if max_rows else 0
    rng = np.random.default_rng(0)
    xs, gs_ = [], []
    for i, x in enumerate(x_parts):
        keep = np.sort(rng.choice(len(x), per_sample, replace=False)) if 0 < per_sample < len(x) else slice(None)
        xs.append(x[keep])
        if g_parts is not None:
            gs_.append(g_parts[i][keep])
    return np.concatenate(xs), w, None if g_parts is None else np.concatenate(gs_)


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as ``[rows, last axis]``."""
    return array.reshape(-1, array.shape[-1])


def _conv_layout(node: gs.Node, weight: np.ndarray) -> dict | None:
    """``F.unfold`` options of a 2-D ungrouped Conv with explicit symmetric pads (None for other Convs)."""
    if weight.ndim != 4 or node.attrs.get("group", 1) != 1 or node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        return None
    return dict(kernel_size=tuple(weight.shape[2:]), dilation=tuple(node.attrs.get("dilations", [1, 1])),
                padding=tuple(pads[:2]), stride=tuple(node.attrs.get("strides", [1, 1])))


def _conv_rows(layout: dict, weight: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """im2col rows ``[B * L, C * kh * kw]`` of one input sample of a Conv with :func:`_conv_layout` ``layout``."""
    import torch
    import torch.nn.functional as F

    return F.unfold(torch.from_numpy(sample), **layout).transpose(1, 2).reshape(-1, weight[0].size).numpy()
