"""Learned step sizes (LSQ) and layer-wise distillation of quantization steps, in torch.

Fake quantization ``v_hat = clip(round(v / s), -Q_N, Q_P) * s`` (round half to even, as ``QuantizeLinear``)
with a straight-through estimator for ``v`` (gradient 1 inside the range, 0 outside) and a *pluggable* scale
gradient ``d v_hat / d s`` per element (:data:`SCALE_GRADIENT_FUNCTIONS`, a function of ``r = v / s``, ``Q_N``, ``Q_P``):

- ``"lsq"`` (Esser et al.): ``round(r) - r`` inside the range, ``-Q_N`` below, ``Q_P`` above;
- ``"clip"``: only the clipping term (``0`` inside), a PACT-like gradient that moves a step only through
  saturated values.

MKQ-BERT's own scale gradient is not published beyond its abstract; any function with that signature can be
registered in :data:`SCALE_GRADIENT_FUNCTIONS`. The scale gradient is multiplied by LSQ's ``g = 1 / sqrt(N * Q_P)``
(``N`` elements per step). Training optimises ``log s`` with Adam (scale-free steps; Adam's normalisation makes
``g`` matter only relative to other parameters), keeping the best steps seen, so the reported loss never rises
above the initial one.

The distillation target of :func:`train_layer` is the floating-point layer's output on the calibration rows:
``|| X W - fq(X) fq(W) ||^2`` relative to ``|| X W ||^2`` (with activations float, ``fq(X) = X``, the loss is
the same quantity through the Gram matrix ``X^T X``: :func:`train_weight_steps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
ScaleGradient = Callable[[Tensor, int, int], Tensor]


def lsq_scale_gradient(ratio: Tensor, qn: int, qp: int) -> Tensor:
    """LSQ's ``d v_hat / d s``: ``round(r) - r`` for ``-Q_N <= r <= Q_P``, ``-Q_N`` below, ``Q_P`` above."""
    return torch.where(ratio < -qn, torch.full_like(ratio, -qn),
                       torch.where(ratio > qp, torch.full_like(ratio, qp), torch.round(ratio) - ratio))


def clip_scale_gradient(ratio: Tensor, qn: int, qp: int) -> Tensor:
    """Only the saturation term of LSQ's gradient: ``-Q_N`` below the range, ``Q_P`` above, ``0`` inside."""
    return torch.where(ratio < -qn, torch.full_like(ratio, -qn),
                       torch.where(ratio > qp, torch.full_like(ratio, qp), torch.zeros_like(ratio)))


SCALE_GRADIENT_FUNCTIONS: dict[str, ScaleGradient] = {"lsq": lsq_scale_gradient, "clip": clip_scale_gradient}
"""The functions of :data:`onnxsmith.calibration.learning.SCALE_GRADIENTS` by name."""


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad`` summed over the axes along which a tensor of ``shape`` was broadcast."""
    while grad.dim() > len(shape):
        grad = grad.sum(dim=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(dim=axis, keepdim=True)
    return grad


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, s: Tensor, qn: int, qp: int, grad_scale: float,  # type: ignore[override]
                scale_gradient: ScaleGradient) -> Tensor:
        ratio = v / s
        ctx.save_for_backward(ratio)
        ctx.settings = (qn, qp, grad_scale, scale_gradient, s.shape)
        return torch.clamp(torch.round(ratio), -qn, qp) * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        qn, qp, grad_scale, scale_gradient, s_shape = ctx.settings
        inside = (ratio >= -qn) & (ratio <= qp)
        grad_s = _sum_to_shape(grad * scale_gradient(ratio, qn, qp) * grad_scale, s_shape)
        return grad * inside, grad_s, None, None, None, None


def fake_quantize(v: Tensor, s: Tensor, bits: int, grad_scale: float | None = None,
                  scale_gradient: str | ScaleGradient = "lsq") -> Tensor:
    """Symmetric ``bits``-bit fake quantization of ``v`` with steps ``s`` (broadcast against ``v``).

    ``grad_scale`` defaults to LSQ's ``1 / sqrt(N * Q_P)`` with ``N = v.numel() / s.numel()``.
    """
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(v.numel() // max(s.numel(), 1), 1) * qp)
    fn = SCALE_GRADIENT_FUNCTIONS[scale_gradient] if isinstance(scale_gradient, str) else scale_gradient
    return _FakeQuantize.apply(v, s, qn, qp, grad_scale, fn)


def lsq_initial_step(v: np.ndarray, bits: int) -> float:
    """LSQ's initial step ``2 * mean|v| / sqrt(Q_P)``."""
    return float(2.0 * np.abs(v).mean() / math.sqrt(2 ** (bits - 1) - 1))


ExpandFn = Callable[[Tensor], Tensor]
"""Maps a weight-step parameter array to the ``[K, N]`` steps of every weight element."""


def block_expander(row_block: int, col_block: int, k: int, n: int) -> ExpandFn:
    """Steps ``[ceil(K / row_block), ceil(N / col_block)]`` repeated over their blocks of ``W [K, N]``."""
    def expand(steps: Tensor) -> Tensor:
        rows = torch.repeat_interleave(steps, row_block, dim=0)[:k]
        return torch.repeat_interleave(rows, col_block, dim=1)[:, :n]

    return expand


@dataclass
class TrainResult:
    """Learned steps (float32, shapes as given) and the relative reconstruction loss before / after."""

    weight_steps: np.ndarray
    act_step: float | None
    loss_before: float
    loss_after: float


def train_weight_steps(w: np.ndarray, gram: np.ndarray, steps: np.ndarray, expand: ExpandFn, bits: int,
                       iterations: int, lr: float = 5e-3, scale_gradient: str = "lsq") -> TrainResult:
    """Weight-only: learn ``steps`` minimising ``tr(D^T G D) / tr(W^T G W)``, ``D = W - fq(W)``, ``G = X^T X / T``
    (the layer's relative output error on the calibration tokens)."""
    weight = torch.from_numpy(np.asarray(w, np.float32))
    g = torch.from_numpy(np.asarray(gram, np.float32))
    reference = float(torch.einsum("kn,kn->", g @ weight, weight)) or 1.0

    def loss_fn(log_steps: Tensor, _act: Tensor | None) -> Tensor:
        delta = weight - fake_quantize(weight, expand(log_steps.exp()), bits, scale_gradient=scale_gradient)
        return torch.einsum("kn,kn->", g @ delta, delta) / reference

    return _optimise(loss_fn, steps, None, iterations, lr)


def train_layer(x: np.ndarray, w: np.ndarray, steps: np.ndarray, expand: ExpandFn, wbits: int,
                act_step: float | None, abits: int, iterations: int, lr: float = 5e-3,
                scale_gradient: str = "lsq") -> TrainResult:
    """Learn the weight ``steps`` and the per-tensor activation step (None: activations stay float) minimising
    ``|| X W - fq(X) fq(W) ||^2 / || X W ||^2`` over the rows ``X [R, K]``."""
    inputs = torch.from_numpy(np.asarray(x, np.float32))
    weight = torch.from_numpy(np.asarray(w, np.float32))
    target = inputs @ weight
    reference = float((target ** 2).sum()) or 1.0

    def loss_fn(log_steps: Tensor, log_act: Tensor | None) -> Tensor:
        w_hat = fake_quantize(weight, expand(log_steps.exp()), wbits, scale_gradient=scale_gradient)
        x_hat = inputs if log_act is None else fake_quantize(inputs, log_act.exp(), abits,
                                                             scale_gradient=scale_gradient)
        return ((target - x_hat @ w_hat) ** 2).sum() / reference

    return _optimise(loss_fn, steps, act_step, iterations, lr)


def _optimise(loss_fn: Callable[[Tensor, Tensor | None], Tensor], steps: np.ndarray, act_step: float | None,
              iterations: int, lr: float) -> TrainResult:
    log_steps = torch.log(torch.as_tensor(np.asarray(steps, np.float32))).requires_grad_(True)
    log_act = None if act_step is None else torch.log(torch.tensor(float(act_step))).requires_grad_(True)
    params = [log_steps] + ([log_act] if log_act is not None else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    best = (math.inf, log_steps.detach().clone(), None if log_act is None else log_act.detach().clone())
    first = None
    for _ in range(iterations + 1):
        optimizer.zero_grad()
        loss = loss_fn(log_steps, log_act)
        value = float(loss.detach())
        first = value if first is None else first
        if value < best[0]:
            best = (value, log_steps.detach().clone(), None if log_act is None else log_act.detach().clone())
        loss.backward()
        optimizer.step()
    return TrainResult(best[1].exp().numpy().astype(np.float32),
                       None if best[2] is None else float(best[2].exp()), first, best[0])
