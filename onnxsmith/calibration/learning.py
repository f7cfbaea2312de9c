"""The names torch-side calibration is configured with: the loss whose gradients weight a search, and the
gradient of learned steps. Torch-free, so option declarations and the command line do not import torch."""

from __future__ import annotations

import onnx

LOSSES: tuple[str, ...] = ("auto", "pseudo-label", "contrastive")
TASK_KEY = "onnxsmith.task"
TASK_LOSSES = {"classification": "pseudo-label", "causal-lm": "pseudo-label", "embedding": "contrastive"}


def model_task(model: onnx.ModelProto) -> str | None:
    """The model's ``onnxsmith.task`` metadata value, or None."""
    return next((p.value for p in model.metadata_props if p.key == TASK_KEY), None)


def resolve_loss(model: onnx.ModelProto, loss: str) -> str:
    """``loss`` with ``"auto"`` replaced by the loss for the model's task (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss != "auto":
        return loss
    return TASK_LOSSES.get(model_task(model) or "", "pseudo-label")


SCALE_GRADIENTS: tuple[str, ...] = ("lsq", "clip")
"""Gradients of a learned step (:mod:`onnxsmith.calibration.lsq`): LSQ's, or the saturation term only."""
