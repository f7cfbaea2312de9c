"""Differentiable torch evaluation of ONNX graphs, for gradient-guided (PTQ4ViT-style Hessian) calibration.

:class:`TorchGraph` interprets an ONNX graph node by node in torch (float32, CPU) so that a scalar loss can be
back-propagated to any named intermediate tensor, and so that a caller can substitute a tensor (for example the
quantized version of a layer's output) for a named intermediate.

Why not ``onnx2torch``: measured on 2026-11-23 with onnx2torch 1.5.15, torch 2.13.0+cpu, onnx 1.23.2,
onnxruntime 1.32.0 on the cleaned zoo graphs (``cleanup`` recipe, opset 17):

* onnx2torch imports ``torchvision`` unconditionally (NMS / RoIAlign converters); installing torchvision from PyPI
  would replace torch 2.13 by torch 2.15 + CUDA wheels, so the measurement stubbed the module.
* ``vit-digits`` converts and matches onnxruntime (max abs error 9.5e-7 on 2 calibration batches).
* ``minilm`` fails to convert: no converter for ``GreaterOrEqual`` version 16 (only version 12 is registered).
* ``moe-tiny`` fails to convert: no converter for ``ScatterElements`` (any version).
* Intermediates of the converted ``torch.fx.GraphModule`` are only reachable through FX graph surgery on
  sanitized node names, so capturing / replacing named ONNX tensors would need a name-mapping layer anyway.

Hence this focused interpreter: a table ``op_type -> function(inputs, attrs) -> outputs`` covering every op of the
cleaned ``vit-digits``, ``minilm`` and ``moe-tiny`` graphs: Add, And, ArgMax, Cast, Clip, Concat, Conv, Cos, Div,
Equal, Erf, Expand, Flatten, Gather, Gemm, Greater, GreaterOrEqual, IsNaN, LayerNormalization, MatMul, Mul, Neg,
NonZero, Pow, Range, ReduceL2, ReduceMax, ReduceMean, ReduceSum, Reshape, ScatterElements, Shape, Sigmoid, Sin,
Slice, Softmax, Split, Sqrt, Squeeze, Transpose, Unsqueeze, Where; plus Constant, ConstantOfShape, Sub and Relu.
Attribute-or-input forms (``axes``, ``split``) of both opset 13 and opset 18 are accepted.

The CNN models of the real-model corpus (``onnxsmith.models.corpus``: PaddleOCR, YOLO-style detectors, MTCNN,
MobileNet-style classifiers, Silero VAD's front end, basic-pitch, magika) add: AveragePool, MaxPool (``Y`` only),
GlobalAveragePool, GlobalMaxPool, BatchNormalization (inference), ConvTranspose (explicit pads), Resize and
Upsample (nearest / linear), Pad, Tile, HardSigmoid, HardSwish, LeakyRelu, PRelu, Elu, Selu, Softplus, Mish, Tanh,
Exp, Log, Abs, Reciprocal, Floor, Ceil, Sign, Mod, Min, Max, Sum, Mean, Not, Less, LessOrEqual, Or, Xor, Identity,
Dropout (inference), LogSoftmax, ReduceMin, Size and Einsum; Conv and the pools accept every ``auto_pad``. Shapes
and roundings follow onnxruntime where ONNX leaves room (pool ``ceil_mode`` windows, Resize's float32 coordinate
arithmetic), checked against onnxruntime 1.32 op by op. Attribute values a converter does not implement (Resize
``cubic`` / ``tf_crop_and_resize`` / ``antialias``, ConvTranspose ``output_shape`` / ``SAME`` padding, training
modes) raise ``NotImplementedError`` naming the node and attribute, as does a consumed output an op does not produce
(MaxPool ``Indices``, Dropout ``mask``). Not covered: control flow (``If``, ``Loop``), ``LSTM`` / ``GRU``, and
quantized graphs (``QuantizeLinear`` / ``DequantizeLinear``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

Tensor = torch.Tensor
Inputs = list[Tensor | None]
Attrs = dict[str, Any]
OpFn = Callable[[Inputs, Attrs], Sequence[Tensor]]
LossFn = Callable[[Mapping[str, Tensor]], Tensor]

__all__ = ["TorchGraph", "contrastive_distillation", "distillation_mse", "pseudo_label_cross_entropy"]


# ---------------------------------------------------------------------------------------------- helpers


def _ints(t: Tensor | None) -> list[int] | None:
    """A 1-D integer tensor (e.g. a shape or axes input) as a Python list; ``None`` stays ``None``."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(inputs: Inputs, attrs: Attrs, index: int = 1) -> list[int] | None:
    """``axes`` from input ``index`` (opset >= 13/18 form) or from the attribute (older form)."""
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return attrs.get("axes")


def _torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type."""
    return torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _to_tensor(proto: onnx.TensorProto) -> Tensor:
    """An ONNX tensor as a torch tensor (copied, so it owns its memory)."""
    return torch.from_numpy(numpy_helper.to_array(proto).copy())


def _attr_str(attrs: Attrs, name: str, default: str) -> str:
    """A string attribute (stored as ``bytes`` by ONNX) as ``str``."""
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _optional(inputs: Inputs, index: int) -> Tensor | None:
    """Input ``index``, or ``None`` where it is absent, named ``""`` or an empty tensor (ONNX's "not given")."""
    if len(inputs) <= index or inputs[index] is None or inputs[index].numel() == 0:
        return None
    return inputs[index]


def _explicit_pads(attrs: Attrs, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` ``[b_1, ..., b_n, e_1, ..., e_n]`` of a Conv / pool node with ``auto_pad`` resolved.

    ``SAME_UPPER`` / ``SAME_LOWER`` pad so that ``out = ceil(in / stride)``, putting the odd pixel at the end /
    the beginning (onnxruntime's rule, dilation included); ``VALID`` pads nothing.
    """
    auto_pad = _attr_str(attrs, "auto_pad", "NOTSET")
    rank = len(kernel)
    if auto_pad == "NOTSET":
        return list(attrs.get("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad={auto_pad!r}")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(head)
        end.append(total - head)
    return begin + end


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads of the trailing axes in ``F.pad`` order (last axis first)."""
    return [p for i in reversed(range(len(begin))) for p in (begin[i], end[i])]


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda ins, _attrs: (fn(ins[0]),)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda ins, _attrs: (fn(ins[0], ins[1]),)


# ---------------------------------------------------------------------------------------------- ops


def _pow(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    return (torch.pow(ins[0], ins[1]).to(ins[0].dtype),)


def _gemm(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    a = ins[0].T if attrs.get("transA", 0) else ins[0]
    b = ins[1].T if attrs.get("transB", 0) else ins[1]
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + attrs.get("beta", 1.0) * ins[2]
    return (y,)


def _conv(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, w = ins[0], ins[1]
    rank = w.dim() - 2
    strides, dilations = attrs.get("strides", [1] * rank), attrs.get("dilations", [1] * rank)
    pads = _explicit_pads(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    x = F.pad(x, _torch_pads(pads[:rank], pads[rank:])) if any(pads) else x
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    bias = ins[2] if len(ins) > 2 else None
    y = conv(x, w, bias, stride=strides, dilation=dilations, groups=attrs.get("group", 1))
    return (y,)


def _conv_transpose(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """ConvTranspose from explicit ``pads``: the full transposed convolution, ``output_padding`` zeros appended
    at the end of each spatial axis, then ``pads`` cropped (ONNX's output ``s*(in-1) + op + (k-1)*d + 1 - pads``)."""
    if "output_shape" in attrs:
        raise NotImplementedError("ConvTranspose with the output_shape attribute (only explicit pads are supported)")
    auto_pad = _attr_str(attrs, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"ConvTranspose with auto_pad={auto_pad!r} (only NOTSET / VALID are supported)")
    x, w = ins[0], ins[1]
    rank = w.dim() - 2
    pads = attrs.get("pads", [0] * 2 * rank) if auto_pad == "NOTSET" else [0] * 2 * rank
    output_padding = attrs.get("output_padding", [0] * rank)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    y = conv(x, w, None, stride=attrs.get("strides", [1] * rank), groups=attrs.get("group", 1),
             dilation=attrs.get("dilations", [1] * rank))
    if any(output_padding):
        y = F.pad(y, _torch_pads([0] * rank, output_padding))
    if any(pads):
        y = y[(slice(None), slice(None), *(slice(b, y.shape[2 + i] - e) for i, (b, e) in
                                           enumerate(zip(pads[:rank], pads[rank:], strict=True))))]
    bias = _optional(ins, 2)
    if bias is not None:
        y = y + bias.reshape(-1, *[1] * rank)
    return (y,)


def _batch_norm(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Inference-mode BatchNormalization (running mean / variance); training mode is refused."""
    if attrs.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1 (only inference mode is supported)")
    if not attrs.get("spatial", 1):
        raise NotImplementedError("BatchNormalization with spatial=0")
    x, scale, bias, mean, var = ins[:5]
    shape = (1, -1, *[1] * (x.dim() - 2))
    factor = scale * torch.rsqrt(var + attrs.get("epsilon", 1e-5))
    return ((x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape),)


class _PoolWindows:
    """Geometry of a pool node on one input: kernel, strides, dilations, explicit begin / end pads, the extra end
    padding (``overhang``) the last ``ceil_mode`` window needs beyond the padded input, and the output sizes.

    Output size is onnxruntime's: ``floor`` (or ``ceil`` with ``ceil_mode``) of ``(in + pads - (k-1)*d - 1) / s``
    plus one, where under ``ceil_mode`` a last window that would start in the end padding is dropped.
    """

    def __init__(self, x: Tensor, attrs: Attrs) -> None:
        self.kernel = list(attrs["kernel_shape"])
        rank = len(self.kernel)
        self.strides = list(attrs.get("strides", [1] * rank))
        self.dilations = list(attrs.get("dilations", [1] * rank))
        spatial = list(x.shape[2:])
        pads = _explicit_pads(attrs, spatial, self.kernel, self.strides, self.dilations)
        self.begin, self.end = pads[:rank], pads[rank:]
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        self.overhang, self.sizes = [], []
        for size, k, s, d, b, e in zip(spatial, self.kernel, self.strides, self.dilations, self.begin, self.end,
                                       strict=True):
            span, extent = (k - 1) * d + 1, size + b + e
            out = (-(-(extent - span) // s) if ceil_mode else (extent - span) // s) + 1
            if ceil_mode and (out - 1) * s >= size + b:
                out -= 1
            self.overhang.append(max(0, (out - 1) * s + span - extent))
            self.sizes.append(out)

    def pad(self, x: Tensor, value: float = 0.0, overhang_value: float | None = None) -> Tensor:
        """``x`` padded with ``value`` (explicit pads) and ``overhang_value`` (default ``value``; overhang)."""
        if overhang_value is None or not any(self.overhang):
            pads = _torch_pads(self.begin, [e + o for e, o in zip(self.end, self.overhang, strict=True)])
            return F.pad(x, pads, value=value) if any(pads) else x
        explicit = _torch_pads(self.begin, self.end)
        x = F.pad(x, explicit, value=value) if any(explicit) else x
        return F.pad(x, _torch_pads([0] * len(self.kernel), self.overhang), value=overhang_value)

    def crop(self, y: Tensor) -> Tensor:
        """``y`` cut to the output sizes along its spatial axes."""
        return y[(slice(None), slice(None), *(slice(0, n) for n in self.sizes))]


def _window_sum(x: Tensor, win: _PoolWindows) -> Tensor:
    """Per-channel sum over every pooling window (a depthwise convolution with a ones kernel)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(win.kernel)]
    flat = x.reshape(-1, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *win.kernel), dtype=x.dtype)
    y = conv(flat, ones, stride=win.strides, dilation=win.dilations)
    return y.reshape(*x.shape[:2], *y.shape[2:])


def _average_pool(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """AveragePool: the window mean of the zero-padded input rescaled by ``kernel size / count``, ``count`` being
    the window cells inside the input (``count_include_pad=0``) or inside the explicitly padded input (``=1``); the
    ``ceil_mode`` overhang never counts (onnxruntime's rule)."""
    x = ins[0]
    win = _PoolWindows(x, attrs)
    size = float(np.prod(win.kernel))
    padded = win.pad(x)
    if all(d == 1 for d in win.dilations):
        mean = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(win.kernel)](padded, win.kernel, win.strides)
    else:
        mean = _window_sum(padded, win) / size
    if not any(win.begin) and not any(win.end) and not any(win.overhang):
        return (win.crop(mean),)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    mask = win.pad(ones, 1.0, 0.0) if attrs.get("count_include_pad", 0) else win.pad(ones)
    return (win.crop(mean * (size / _window_sum(mask, win))),)


def _max_pool(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """MaxPool (the ``Y`` output only) over the input padded with ``-inf``."""
    x = ins[0]
    win = _PoolWindows(x, attrs)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(win.kernel)]
    return (win.crop(pool(win.pad(x, -math.inf), win.kernel, win.strides, dilation=win.dilations)),)


def _global_pool(fn: Callable[[Tensor, tuple[int, ...]], Tensor]) -> OpFn:
    return lambda ins, _attrs: (fn(ins[0], tuple(range(2, ins[0].dim()))),)


def _softmax(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (torch.softmax(ins[0], dim=attrs.get("axis", -1)),)


def _layer_norm(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    axis = attrs.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dim=dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    y = (x - mean) * inv_std * ins[1]
    if len(ins) > 2 and ins[2] is not None:
        y = y + ins[2]
    return (y, mean, inv_std)


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFn:
    """A Reduce* op: ``fn(x, dims, keepdim)``; empty axes reduce all dims unless ``noop_with_empty_axes``."""

    def op(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
        x, axes, keep = ins[0], _axes(ins, attrs), bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return (x,)
            axes = list(range(x.dim()))
        return (fn(x, tuple(a % x.dim() for a in axes), keep),)

    return op


def _reduce_max(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    return torch.amax(x, dim=dims, keepdim=keep)


def _reduce_l2(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))


def _argmax(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, axis = ins[0], attrs.get("axis", 0)
    if attrs.get("select_last_index", 0):
        size = x.shape[axis]
        idx = size - 1 - torch.argmax(torch.flip(x, dims=(axis,)), dim=axis, keepdim=bool(attrs.get("keepdims", 1)))
    else:
        idx = torch.argmax(x, dim=axis, keepdim=bool(attrs.get("keepdims", 1)))
    return (idx,)


def _reshape(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, shape = ins[0], _ints(ins[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return (x.reshape(shape),)


def _flatten(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1)
    return (x.reshape(int(np.prod(x.shape[:axis])), -1),)


def _transpose(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    return (x.permute(attrs.get("perm", list(reversed(range(x.dim()))))),)


def _unsqueeze(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, axes = ins[0], _axes(ins, attrs)
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for a in sorted(a % rank for a in axes):
        shape.insert(a, 1)
    return (x.reshape(shape),)


def _squeeze(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, axes = ins[0], _axes(ins, attrs)
    dims = range(x.dim()) if axes is None else [a % x.dim() for a in axes]
    keep = [s for i, s in enumerate(x.shape) if not (i in dims and s == 1)]
    return (x.reshape(keep),)


def _gather(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, idx = ins[0], ins[1].long()
    axis = attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return (out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])),)


def _concat(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (torch.cat([t for t in ins if t is not None], dim=attrs["axis"]),)


def _split(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, axis = ins[0], attrs.get("axis", 0)
    sizes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else attrs.get("split")
    if sizes is None:
        parts = attrs["num_outputs"]
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return torch.split(x, sizes, dim=axis)


def _shape(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    dims = list(ins[0].shape)[attrs.get("start", 0):attrs.get("end", None)]
    return (torch.tensor(dims, dtype=torch.int64),)


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """``x`` sliced along one axis with ONNX/Python clamping; negative steps go through ``index_select``."""
    if step > 0:
        return x[(slice(None),) * axis + (slice(start, end, step),)]
    index = torch.arange(*slice(start, end, step).indices(x.shape[axis]), dtype=torch.int64)
    return x.index_select(axis, index)


def _slice(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    x, starts, ends = ins[0], _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return (x,)


def _cast(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (ins[0].to(_torch_dtype(attrs["to"])),)


def _where(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    return (torch.where(ins[0].bool(), ins[1], ins[2]),)


def _expand(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(ins[1])))),)


def _constant(_ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    if "value" not in attrs:
        raise NotImplementedError(f"Constant with attributes {sorted(attrs)}")
    return (_to_tensor(attrs["value"]),)


def _constant_of_shape(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    value = _to_tensor(attrs["value"]) if "value" in attrs else torch.zeros(1, dtype=torch.float32)
    return (value.reshape(()).expand(_ints(ins[0])).clone(),)


def _clip(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    low = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("min")
    high = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("max")
    return (torch.clamp(ins[0], min=low, max=high),)


def _range(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    start, limit, delta = (t.item() for t in ins[:3])
    return (torch.arange(start, limit, delta, dtype=ins[0].dtype),)


def _nonzero(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    return (torch.nonzero(ins[0]).T.contiguous(),)


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x, idx, updates = ins[0], ins[1].long(), ins[2]
    axis = attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    reduction = attrs.get("reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction == "none":
        return (torch.scatter(x, axis, idx, updates),)
    return (torch.scatter_reduce(x, axis, idx, updates, reduce=_SCATTER_REDUCE[reduction], include_self=True),)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    """An elementwise op over any number of (multidirectionally broadcast) inputs: Min, Max, Sum."""
    return lambda ins, _attrs: (functools.reduce(fn, [t for t in ins if t is not None]),)


def _mean(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    present = [t for t in ins if t is not None]
    return (functools.reduce(torch.add, present) / len(present),)


def _hard_sigmoid(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (torch.clamp(attrs.get("alpha", 0.2) * ins[0] + attrs.get("beta", 0.5), 0.0, 1.0),)


def _hard_swish(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    return (x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),)


def _leaky_relu(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (F.leaky_relu(ins[0], attrs.get("alpha", 0.01)),)


def _prelu(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    """PRelu: ``slope`` broadcasts to ``X`` unidirectionally (numpy rules), so the result has ``X``'s shape."""
    x, slope = ins[0], ins[1]
    if slope.dim() > x.dim() or torch.broadcast_shapes(x.shape, slope.shape) != x.shape:
        raise ValueError(f"PRelu slope of shape {tuple(slope.shape)} does not broadcast to X {tuple(x.shape)}")
    return (torch.where(x < 0, x * slope, x),)


def _elu(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (F.elu(ins[0], attrs.get("alpha", 1.0)),)


def _selu(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    x = ins[0]
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return (gamma * torch.where(x > 0, x, alpha * torch.expm1(x)),)


def _log_softmax(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    return (torch.log_softmax(ins[0], dim=attrs.get("axis", -1)),)


def _mod(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Mod: C ``fmod`` (sign of the dividend) with ``fmod=1``, else the sign of the divisor (Python ``%``)."""
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder
    return (fn(ins[0], ins[1]),)


def _einsum(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    equation = "".join(_attr_str(attrs, "equation", "").split())
    return (torch.einsum(equation, *ins),)


def _dropout(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Inference Dropout is the identity (the optional ``mask`` output is not produced)."""
    training = _optional(ins, 2)
    if training is not None and bool(training.item()):
        raise NotImplementedError("Dropout with training_mode=true")
    return (ins[0],)


def _size(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    return (torch.tensor(ins[0].numel(), dtype=torch.int64),)


def _tile(ins: Inputs, _attrs: Attrs) -> Sequence[Tensor]:
    return (ins[0].repeat(_ints(ins[1])),)


def _pad_indices(size: int, begin: int, end: int, mode: str) -> Tensor:
    """Source indices along one axis of ``edge`` / ``reflect`` / ``wrap`` padding (``begin, end >= 0``)."""
    index = torch.arange(-begin, size + end, dtype=torch.int64)
    if mode == "edge":
        return index.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(index, size)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def _pad(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Pad: ``pads`` (and ``constant_value``, ``axes``) from inputs (opset >= 11) or attributes (older)."""
    x, mode = ins[0], _attr_str(attrs, "mode", "constant")
    if len(ins) > 1 and ins[1] is not None:
        pads, value = _ints(ins[1]), _optional(ins, 2)
        value = 0 if value is None else value.item()
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    else:
        pads, value, axes = list(attrs.get("pads", attrs.get("paddings", []))), attrs.get("value", 0.0), None
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    begin, end = pads[:len(axes)], pads[len(axes):]
    if mode == "constant":
        full_begin, full_end = [0] * x.dim(), [0] * x.dim()
        for axis, b, e in zip(axes, begin, end, strict=True):
            full_begin[axis], full_end[axis] = b, e
        return (F.pad(x, _torch_pads(full_begin, full_end), value=value),)
    if mode not in ("reflect", "edge", "wrap"):
        raise NotImplementedError(f"mode={mode!r}")
    for axis, b, e in zip(axes, begin, end, strict=True):
        # negative pads crop first (onnxruntime's order, which matters for ``wrap``)
        x = _slice_axis(x, axis, max(0, -b), x.shape[axis] - max(0, -e), 1)
        if b > 0 or e > 0:
            x = x.index_select(axis, _pad_indices(x.shape[axis], max(0, b), max(0, e), mode))
    return (x,)


_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_half_pixel_for_nn")


def _original_coordinate(mode: str, n_in: int, n_out: int, scale: np.float32) -> Tensor:
    """ONNX ``coordinate_transformation_mode``: the input coordinate of each output index, in float32 and in
    onnxruntime's order of operations (so that ties of the nearest modes fall as they do there)."""
    x = torch.arange(n_out, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return x / s
    if mode == "half_pixel" or (mode == "pytorch_half_pixel" and n_out > 1):
        return (x + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if mode == "align_corners":
        if n_out == 1:
            return torch.zeros_like(x)
        return x * torch.tensor(n_in - 1, dtype=torch.float32) / torch.tensor(n_out - 1, dtype=torch.float32)
    # half_pixel_symmetric: float32 offset, then (as onnxruntime does) the rest in float64
    length = np.float32(n_in)
    offset = length / np.float32(2) * (np.float32(1) - np.float32(n_out) / (scale * length))
    return (float(offset) + (x.double() + 0.5) / float(scale) - 0.5).float()


def _nearest_index(coordinate: Tensor, mode: str, n_in: int, downsampling: bool) -> Tensor:
    """ONNX ``nearest_mode`` rounding of input coordinates (``simple``: opset-10 Resize / Upsample, which
    onnxruntime rounds up when downsampling and down otherwise), clamped to the input."""
    floor = torch.floor(coordinate)
    fraction = coordinate - floor
    if mode == "simple":
        mode = "ceil" if downsampling else "floor"
    if mode == "floor":
        index = floor
    elif mode == "ceil":
        index = torch.ceil(coordinate)
    elif mode == "round_prefer_floor":
        index = torch.where(fraction > 0.5, floor + 1, floor)
    else:
        index = torch.where(fraction >= 0.5, floor + 1, floor)
    return index.long().clamp(0, n_in - 1)


def _linear_axis(x: Tensor, axis: int, coordinate: Tensor) -> Tensor:
    """1-D linear interpolation of ``x`` along ``axis`` at ``coordinate`` (clamped to the input, as
    onnxruntime does outside ``tf_crop_and_resize``)."""
    n_in = x.shape[axis]
    coordinate = coordinate.clamp(0, n_in - 1)
    low = torch.floor(coordinate).long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    weight = (coordinate - low.to(coordinate.dtype)).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1 - axis))
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


def _resize_targets(x: Tensor, axes: Sequence[int], scales: Tensor | None, sizes: Sequence[int] | None,
                    attrs: Attrs) -> list[tuple[int, int, int, np.float32]]:
    """``(axis, input size, output size, float32 scale)`` per resized axis, as onnxruntime derives them: from
    ``scales``, ``out = floor(in * scale)``; from ``sizes``, ``scale = out / in``, adjusted by
    ``keep_aspect_ratio_policy`` (one common scale, the smallest or largest, and ``out = round(scale * in)``)."""
    ins = [x.shape[a] for a in axes]
    if sizes is None:
        factors = [np.float32(v) for v in scales.reshape(-1).tolist()]
        return [(a, n, int(np.float32(n) * f), f) for a, n, f in zip(axes, ins, factors, strict=True)]
    outs = [int(v) for v in sizes]
    factors = [np.float32(o) / np.float32(n) for o, n in zip(outs, ins, strict=True)]
    policy = _attr_str(attrs, "keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise NotImplementedError(f"keep_aspect_ratio_policy={policy!r}")
    if policy != "stretch":
        common = min(factors) if policy == "not_larger" else max(factors)
        factors = [common] * len(axes)
        outs = [int(math.floor(float(np.float32(common) * np.float32(n)) + 0.5)) for n in ins]
    return list(zip(axes, ins, outs, factors, strict=True))


def _resample(x: Tensor, attrs: Attrs, scales: Tensor | None, sizes: Tensor | None, *, legacy: bool) -> Tensor:
    """Resize / Upsample of ``x`` (``legacy``: opset-10 Resize and Upsample, i.e. ``asymmetric`` coordinates and
    the ``simple`` nearest rounding); modes nearest and linear, separably along every resized axis."""
    mode = _attr_str(attrs, "mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise NotImplementedError(f"mode={mode!r} (only nearest and linear are supported)")
    coordinate_mode = "asymmetric" if legacy else _attr_str(attrs, "coordinate_transformation_mode", "half_pixel")
    if coordinate_mode not in _COORDINATE_MODES:
        raise NotImplementedError(f"coordinate_transformation_mode={coordinate_mode!r}")
    nearest_mode = "simple" if legacy else _attr_str(attrs, "nearest_mode", "round_prefer_floor")
    if nearest_mode not in _NEAREST_MODES:
        raise NotImplementedError(f"nearest_mode={nearest_mode!r}")
    if attrs.get("antialias", 0):
        raise NotImplementedError("antialias=1")
    axes = [a % x.dim() for a in attrs.get("axes", range(x.dim()))]
    for axis, n_in, n_out, scale in _resize_targets(x, axes, scales, sizes, attrs):
        if n_out == n_in and scale == 1:
            continue
        coordinate = _original_coordinate(coordinate_mode, n_in, n_out, scale)
        if mode == "nearest":
            x = x.index_select(axis, _nearest_index(coordinate, nearest_mode, n_in, bool(scale < 1)))
        else:
            x = _linear_axis(x, axis, coordinate)
    return x


def _resize(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Resize: inputs ``X, scales`` (opset 10) or ``X, roi, scales, sizes`` (opset >= 11; ``roi`` only matters
    for the refused ``tf_crop_and_resize``)."""
    if len(ins) == 2:
        return (_resample(ins[0], attrs, ins[1], None, legacy=True),)
    scales, sizes = _optional(ins, 2), _optional(ins, 3)
    if (scales is None) == (sizes is None):
        raise NotImplementedError("Resize needs exactly one of scales and sizes")
    return (_resample(ins[0], attrs, scales, _ints(sizes), legacy=False),)


def _upsample(ins: Inputs, attrs: Attrs) -> Sequence[Tensor]:
    """Upsample (deprecated): ``scales`` from input (opset 9) or attribute (opset 7/8)."""
    scales = ins[1] if len(ins) > 1 and ins[1] is not None else torch.tensor(attrs["scales"], dtype=torch.float32)
    return (_resample(ins[0], attrs, scales, None, legacy=True),)


OPS: dict[str, OpFn] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(lambda a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b),
    "Pow": _pow,
    "MatMul": _binary(torch.matmul),
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Neg": _unary(torch.neg),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "IsNaN": _unary(torch.isnan),
    "Gemm": _gemm,
    "Conv": _conv,
    "Softmax": _softmax,
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceL2": _reduce(_reduce_l2),
    "ArgMax": _argmax,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "Concat": _concat,
    "Split": _split,
    "Shape": _shape,
    "Slice": _slice,
    "Cast": _cast,
    "Where": _where,
    "Expand": _expand,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Clip": _clip,
    "Range": _range,
    "NonZero": _nonzero,
    "ScatterElements": _scatter_elements,
    # CNN ops (PaddleOCR, YOLO, MTCNN, MobileNet-style classifiers, Silero VAD)
    "Identity": _unary(lambda x: x),
    "Dropout": _dropout,
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Sign": _unary(torch.sign),
    "Softplus": _unary(F.softplus),
    "Mish": _unary(F.mish),
    "Not": _unary(torch.logical_not),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Mod": _mod,
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "Elu": _elu,
    "Selu": _selu,
    "LogSoftmax": _log_softmax,
    "ReduceMin": _reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k)),
    "Size": _size,
    "Einsum": _einsum,
    "Tile": _tile,
    "Pad": _pad,
    "BatchNormalization": _batch_norm,
    "ConvTranspose": _conv_transpose,
    "GlobalAveragePool": _global_pool(lambda x, d: torch.mean(x, dim=d, keepdim=True)),
    "GlobalMaxPool": _global_pool(lambda x, d: torch.amax(x, dim=d, keepdim=True)),
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Resize": _resize,
    "Upsample": _upsample,
}
"""Supported ops: ``op_type -> fn(inputs, attrs) -> outputs`` (absent optional inputs are ``None``)."""


# ---------------------------------------------------------------------------------------------- evaluator


class TorchGraph:
    """A differentiable torch interpreter of one ONNX graph (default domain, no subgraphs).

    Contract: the graph's nodes are evaluated in their stored order, which must be topological (as ONNX
    requires). Initializers become constant tensors (no gradient). Construction raises ``NotImplementedError``
    naming the op type and node when any node's op is not supported.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                raise NotImplementedError(
                    f"TorchGraph does not support op {node.domain or 'ai.onnx'}::{node.op_type} "
                    f"(node {node.name!r})"
                )
        self.initializers: dict[str, Tensor] = {t.name: _to_tensor(t) for t in self.graph.initializer}
        self.input_names = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in self.graph.output]
        self.tensor_names = set(self.initializers) | set(self.input_names)
        self.tensor_names |= {name for node in self.graph.node for name in node.output if name}
        self._attrs = [{a.name: helper.get_attribute_value(a) for a in node.attribute} for node in self.graph.node]
        self._consumed = {name for node in self.graph.node for name in node.input} | set(self.output_names)

    def run(
        self,
        feed: Mapping[str, np.ndarray],
        *,
        capture: Sequence[str] = (),
        replace: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Evaluate the graph; return the graph outputs plus every ``capture``d tensor, by name.

        Captured floating-point tensors are made differentiable points of the autograd graph: a tensor that
        does not already require grad is turned into a leaf that does (nothing upstream of it requires grad,
        so no gradient path is cut), and ``retain_grad()`` is set, so after ``loss.backward()`` its ``.grad``
        holds d loss / d tensor. ``replace`` substitutes the given tensor for the named tensor (graph input,
        initializer or node output) wherever it is consumed, and in the result. Unknown names in ``capture``
        or ``replace``, or a missing graph input, raise ``KeyError``.
        """
        replace = dict(replace or {})
        self._check_names([*capture, *replace])
        missing = [n for n in self.input_names if n not in feed and n not in replace]
        if missing:
            raise KeyError(f"feed lacks graph inputs {missing}")
        captured = set(capture)
        env: dict[str, Tensor] = {}

        def bind(name: str, value: Tensor) -> None:
            value = replace.get(name, value)
            if name in captured and value.is_floating_point():
                value = _track(value)
            env[name] = value

        for name, value in self.initializers.items():
            bind(name, value)
        for name in self.input_names:
            bind(name, torch.as_tensor(np.asarray(feed[name])) if name in feed else replace[name])
        for node, attrs in zip(self.graph.node, self._attrs, strict=True):
            inputs = [env[name] if name else None for name in node.input]
            outputs = self._apply(node, inputs, attrs)
            for name, value in zip(node.output, outputs):
                if name:
                    bind(name, value)
            for index, name in enumerate(node.output[len(outputs):], start=len(outputs)):
                if name and (name in self._consumed or name in captured):
                    raise NotImplementedError(
                        f"{node.op_type} node {node.name!r}: output {index} ({name!r}) is not supported"
                    )
        return {name: env[name] for name in [*self.output_names, *capture]}

    def output_gradients(
        self,
        feed: Mapping[str, np.ndarray],
        tensor_names: Sequence[str],
        loss_fn: LossFn,
    ) -> dict[str, np.ndarray]:
        """d ``loss_fn(outputs)`` / d tensor for each named floating-point tensor, as float32 arrays.

        ``loss_fn`` receives the dict returned by :meth:`run` (graph outputs plus the named tensors) and must
        return a scalar tensor. A tensor the loss does not depend on gets an all-zero gradient.
        """
        outputs = self.run(feed, capture=tensor_names)
        non_float = [n for n in tensor_names if not outputs[n].is_floating_point()]
        if non_float:
            raise ValueError(f"cannot differentiate with respect to non-float tensors {non_float}")
        loss = loss_fn(outputs)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        return {name: _grad_array(outputs[name]) for name in tensor_names}

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.tensor_names]
        if unknown:
            raise KeyError(f"graph has no tensors named {unknown}")

    @staticmethod
    def _apply(node: onnx.NodeProto, inputs: Inputs, attrs: Attrs) -> Sequence[Tensor]:
        try:
            return OPS[node.op_type](inputs, attrs)
        except NotImplementedError as err:
            raise NotImplementedError(f"{node.op_type} node {node.name!r}: {err}") from err


def _track(value: Tensor) -> Tensor:
    """``value`` as a grad-retaining autograd node (a fresh leaf when nothing upstream requires grad)."""
    if not value.requires_grad:
        value = value.detach().clone().requires_grad_(True)
    value.retain_grad()
    return value


def _grad_array(value: Tensor) -> np.ndarray:
    grad = value.grad if value.grad is not None else torch.zeros_like(value)
    return grad.detach().to(torch.float32).numpy().copy()


# ---------------------------------------------------------------------------------------------- losses


def pseudo_label_cross_entropy(logits_name: str, axis: int = -1) -> LossFn:
    """Mean cross-entropy of output ``logits_name`` against its own (detached) argmax along ``axis``.

    Unlike KL(FP || FP), whose gradient at the FP model is ~0, this has a non-zero gradient at the FP model,
    which is what a Hessian / Fisher-guided calibration needs.
    """

    def loss(outputs: Mapping[str, Tensor]) -> Tensor:
        logits = outputs[logits_name].movedim(axis, -1)
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, flat.detach().argmax(dim=-1))

    return loss


def distillation_mse(output_name: str, target: np.ndarray) -> LossFn:
    """Mean squared error of output ``output_name`` against a fixed ``target`` (e.g. FP embeddings)."""
    target_tensor = torch.as_tensor(np.asarray(target, dtype=np.float32))

    def loss(outputs: Mapping[str, Tensor]) -> Tensor:
        return F.mse_loss(outputs[output_name], target_tensor)

    return loss


def contrastive_distillation(output_name: str, bank: np.ndarray, offset: int, temperature: float = 0.05) -> LossFn:
    """InfoNCE of output rows ``[batch, D]`` against a ``bank [M, D]`` of FP embeddings (all calibration rows).

    Row ``i`` of the output must match bank row ``offset + i``: the loss is the mean cross-entropy of the cosine
    similarities to every bank row over ``temperature``. The bank spans other samples, so the softmax is not
    one-hot and the gradient at the FP model is non-zero, weighting what keeps embeddings apart.
    """
    normalized_bank = F.normalize(torch.as_tensor(np.asarray(bank, dtype=np.float32)), dim=-1)

    def loss(outputs: Mapping[str, Tensor]) -> Tensor:
        rows = outputs[output_name].reshape(-1, normalized_bank.shape[-1])
        logits = F.normalize(rows, dim=-1) @ normalized_bank.T / temperature
        targets = torch.arange(offset, offset + rows.shape[0])
        return F.cross_entropy(logits, targets)

    return loss
