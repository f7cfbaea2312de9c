"""``vit-digits``: a tiny Vision Transformer trained on scikit-learn's 8x8 handwritten digits.

The model is small enough to export, optimize and evaluate in seconds on a CPU, yet it holds every pattern a
transformer optimizer cares about: LayerNorm, explicit ``Softmax(Q @ K^T * scale) @ V`` attention, exact GELU
(exported as ``Erf``) and Gemm/MatMul projections. Its weights ship with the package
(``weights/vit_digits.npz``, written by :mod:`onnxsmith.models.train_vit_digits`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from onnxsmith.models.base import ZooModel
from onnxsmith.core.feeds import Feed, Outputs

WEIGHTS_PATH = Path(__file__).parent / "weights" / "vit_digits.npz"
"""Trained ``TinyViT`` weights: one float32 array per ``state_dict`` key."""

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
CALIBRATION_BATCH = 8
CALIBRATION_BATCHES = 8
EVALUATION_BATCH = 50


class TinyViT(nn.Module):
    """A Vision Transformer for ``[N, 1, 8, 8]`` images: 2x2 patches (16 tokens) plus a CLS token.

    Two pre-LayerNorm blocks of width ``dim`` with ``heads`` attention heads and an exact-GELU MLP, a final
    LayerNorm, and a linear head on the CLS token returning ``[N, classes]`` logits.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 1, 8, 8]`` pixels (scaled to [0, 1]) to ``[N, classes]`` logits."""
        tokens = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class DigitsSplit(NamedTuple):
    """The fixed train/test split of ``load_digits``: images ``[N, 1, 8, 8]`` float32 in [0, 1], int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """The deterministic stratified 75/25 split (``random_state=0``) of the 1797 digits: 1347 train, 450 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    for array in (x_train, x_test, y_train, y_test):
        array.setflags(write=False)
    return DigitsSplit(x_train, y_train, x_test, y_test)


def load_trained_model() -> TinyViT:
    """A ``TinyViT`` in eval mode holding the shipped weights from :data:`WEIGHTS_PATH`."""
    model = TinyViT()
    with np.load(WEIGHTS_PATH) as arrays:
        state = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    model.load_state_dict(state)
    return model.eval()


class VitDigits(ZooModel):
    """Tiny ViT on the scikit-learn digits (input ``pixels`` ``[batch, 1, 8, 8]``, output ``logits`` ``[batch, 10]``).

    ``score`` returns:

    - ``top1_agreement``: fraction of test images where the candidate's argmax equals the reference's;
    - ``accuracy``: the candidate's top-1 accuracy against the true labels;
    - ``accuracy_fp``: the reference's top-1 accuracy against the true labels.
    """

    name = "vit-digits"
    description = "2-block Vision Transformer (dim 64, 4 heads) on scikit-learn's 8x8 digits"
    metric = "top-1 agreement with FP32 and accuracy on the digits test split"
    version = "1"
    extra = "zoo"  # scikit-learn provides the digits data

    def export(self, path: Path) -> None:
        """Export the trained model with opset 17 (TorchScript exporter) and a dynamic batch axis, then check it."""
        model = load_trained_model()
        example = torch.from_numpy(digits_split().test_images[:2].copy())
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))

    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """Batches of 8 training images, in split order: 8 batches by default, else ``count`` batches.

        ``count`` is capped at the number of full training batches (168). Training images never appear in the
        evaluation feeds.
        """
        images = digits_split().train_images
        wanted = CALIBRATION_BATCHES if count is None else min(count, len(images) // CALIBRATION_BATCH)
        return [
            {INPUT_NAME: images[i * CALIBRATION_BATCH : (i + 1) * CALIBRATION_BATCH].copy()} for i in range(wanted)
        ]

    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """The 450 test images in split order, in batches of 50; ``count`` caps the number of batches."""
        images = digits_split().test_images
        feeds = [
            {INPUT_NAME: images[start : start + EVALUATION_BATCH].copy()}
            for start in range(0, len(images), EVALUATION_BATCH)
        ]
        return feeds if count is None else feeds[:count]

    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Top-1 agreement and accuracies over the evaluation feeds the two lists cover (a prefix of them).

        Raises ``ValueError`` when the lists differ in length, are empty, or a batch does not match the size
        of its evaluation feed.
        """
        if len(reference) != len(candidate):
            raise ValueError(f"reference has {len(reference)} results, candidate {len(candidate)}")
        if not reference:
            raise ValueError("no results to score")
        labels = digits_split().test_labels
        batches = [labels[start : start + EVALUATION_BATCH] for start in range(0, len(labels), EVALUATION_BATCH)]
        if len(reference) > len(batches):
            raise ValueError(f"{len(reference)} results but only {len(batches)} evaluation feeds")
        truth = np.concatenate(batches[: len(reference)])
        ref_top1 = _top1(reference, batches)
        cand_top1 = _top1(candidate, batches)
        return {
            "top1_agreement": float(np.mean(ref_top1 == cand_top1)),
            "accuracy": float(np.mean(cand_top1 == truth)),
            "accuracy_fp": float(np.mean(ref_top1 == truth)),
        }


def _top1(results: list[Outputs], label_batches: list[np.ndarray]) -> np.ndarray:
    """Argmax class of every image, concatenated over ``results``, checking each batch size against its labels."""
    predictions = []
    for index, (outputs, labels) in enumerate(zip(results, label_batches)):
        logits = np.asarray(outputs[OUTPUT_NAME])
        if logits.shape != (len(labels), 10):
            raise ValueError(f"result {index}: logits shape {logits.shape}, expected {(len(labels), 10)}")
        predictions.append(logits.argmax(axis=-1))
    return np.concatenate(predictions)
