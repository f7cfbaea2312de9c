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
"""

from __future__ import annotations

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
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("Conv with auto_pad other than NOTSET")
    x, w = ins[0], ins[1]
    rank = w.dim() - 2
    pads = attrs.get("pads", [0] * 2 * rank)
    torch_pads = [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]
    x = F.pad(x, torch_pads) if any(pads) else x
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    bias = ins[2] if len(ins) > 2 else None
    y = conv(x, w, bias, stride=attrs.get("strides", 1), dilation=attrs.get("dilations", 1),
             groups=attrs.get("group", 1))
    return (y,)


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
