"""Divide the channels (last axis) of an activation by constant factors by editing the op that produces it.

Used by AWQ-style scaling: the layers reading ``X`` take ``diag(s) W``, and ``X`` itself must become
``X diag(s)^-1`` with no new node. :func:`plan_input_scaling` walks back from ``X`` through ops that are linear
per channel and finds constants that absorb the division:

- ``Mul(x, c)`` with ``c`` a per-channel (or broadcast ``[1, ..., K]``) constant: ``c / s`` (RMSNorm / LayerNorm
  gammas in decomposed form);
- ``LayerNormalization`` over the last axis: its scale and bias ``/ s``;
- ``Add(y, c)`` with a per-channel constant ``c``: ``c / s``, then ``y`` recursively;
- ``MatMul(a, W)`` / ``Gemm(a, W, C)`` (``transA = 0``) with a constant 2-D ``W``: output columns (and ``C``)
  ``/ s``;
- ``Mul(a, b)`` of two activations (a gated unit, ``silu(gate) * up``): one factor recursively, ``b`` first.

Every constant edited must be read by that node only, and every tensor on the way by the next node only (the
start tensor by the given readers only), so no other reader sees a changed value. A plan is all or nothing: the
graph is edited only by :meth:`ScalingPlan.apply`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class ScalingPlan:
    """Constants to divide: ``(constant, axis of its channel dimension)``; ``where`` names the absorbing nodes."""

    edits: list[tuple[gs.Constant, int]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def apply(self, factors: np.ndarray) -> None:
        """Divide each planned constant's channels by ``factors`` (in place, keeping each constant's dtype)."""
        for constant, axis in self.edits:
            values = constant.values
            shape = [1] * values.ndim
            shape[axis] = factors.size
            constant.values = (values / factors.reshape(shape)).astype(values.dtype)


def plan_input_scaling(tensor: gs.Variable, readers: Collection[str], channels: int) -> ScalingPlan | None:
    """How to divide ``tensor``'s last-axis channels (``channels`` of them) by factors, or None when its producer
    cannot absorb it. ``readers`` are the node names allowed to read ``tensor`` (the scaled layers)."""
    if not tensor.outputs or any(node.name not in readers for node in tensor.outputs):
        return None
    plan = ScalingPlan()
    return plan if _absorb(tensor, channels, plan) else None


def _absorb(tensor: gs.Tensor, channels: int, plan: ScalingPlan) -> bool:
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return False
    node = tensor.inputs[0]
    if node.op == "Mul":
        constants = [i for i in node.inputs if isinstance(i, gs.Constant)]
        variables = [i for i in node.inputs if isinstance(i, gs.Variable)]
        if len(constants) == 1 and len(variables) == 1:
            return _edit_channel_constant(node, constants[0], channels, plan)
        if len(variables) == 2:
            for variable in reversed(variables):
                marks = len(plan.edits), len(plan.where)
                if _single_reader(variable, node) and _absorb(variable, channels, plan):
                    return True
                del plan.edits[marks[0]:], plan.where[marks[1]:]
        return False
    if node.op == "Add":
        constants = [i for i in node.inputs if isinstance(i, gs.Constant)]
        variables = [i for i in node.inputs if isinstance(i, gs.Variable)]
        if len(constants) == 1 and len(variables) == 1 and _single_reader(variables[0], node):
            return _edit_channel_constant(node, constants[0], channels, plan) and \
                _absorb(variables[0], channels, plan)
        return False
    if node.op == "LayerNormalization" and node.attrs.get("axis", -1) in (-1, _rank(tensor) - 1):
        params = node.inputs[1:3]
        if params and all(isinstance(p, gs.Constant) and p.values.shape == (channels,) and _own(p, node)
                          for p in params):
            plan.edits += [(p, 0) for p in params]
            plan.where.append(node.name)
            return True
        return False
    if node.op in ("MatMul", "Gemm"):
        return _edit_gemm_columns(node, channels, plan)
    return False


def _edit_gemm_columns(node: gs.Node, channels: int, plan: ScalingPlan) -> bool:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) or not _own(node.inputs[1], node):
        return False
    weight = node.inputs[1]
    if weight.values.ndim != 2 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        return False
    axis = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1
    if weight.values.shape[axis] != channels:
        return False
    edits = [(weight, axis)]
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant) or not _own(bias, node) or bias.values.shape[-1:] != (channels,):
            return False
        edits.append((bias, bias.values.ndim - 1))
    plan.edits += edits
    plan.where.append(node.name)
    return True


def _edit_channel_constant(node: gs.Node, constant: gs.Constant, channels: int, plan: ScalingPlan) -> bool:
    shape = constant.values.shape
    if not shape or shape[-1] != channels or any(d != 1 for d in shape[:-1]) or not _own(constant, node):
        return False
    plan.edits.append((constant, len(shape) - 1))
    plan.where.append(node.name)
    return True


def _own(constant: gs.Constant, node: gs.Node) -> bool:
    """Whether ``node`` is the constant's only reader."""
    return all(reader is node for reader in constant.outputs)


def _single_reader(tensor: gs.Tensor, node: gs.Node) -> bool:
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node


def _rank(tensor: gs.Tensor) -> int:
    return len(tensor.shape) if tensor.shape is not None else -1
