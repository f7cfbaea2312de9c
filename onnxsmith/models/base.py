"""The contract every zoo model fulfils.

A zoo model knows how to export itself to ONNX, which feeds calibrate it, which feeds evaluate it, and how to
score an optimized model's outputs against the FP32 model's outputs on those evaluation feeds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


from onnxsmith.core.feeds import Feed, Outputs


class ZooModel(ABC):
    """A model the zoo can export, calibrate, evaluate and score.

    Subclasses set the class attributes and implement the four methods. ``version`` is part of the cache key:
    bump it whenever the exported graph changes.
    """

    name: str
    description: str
    metric: str
    """One line saying what ``score`` measures, e.g. 'cosine of sentence embeddings'."""
    task: str = "classification"
    """What the model does: ``classification``, ``embedding`` or ``causal-lm``; optimize_file writes it to the
    model's ``onnxsmith.task`` metadata, which picks the gradient loss of Hessian-guided calibration."""
    version: str = "1"
    extra: str | None = None
    """The pip extra that holds this model's packages (``None`` when the core install suffices)."""

    @abstractmethod
    def export(self, path: Path) -> None:
        """Write the FP32 ONNX model to ``path`` (large models with external data beside it)."""

    @abstractmethod
    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """Deterministic calibration feeds, disjoint from the evaluation feeds; ``count`` caps their number."""

    @abstractmethod
    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """Deterministic evaluation feeds; ``count`` caps their number (a prefix of the full set)."""

    def reduce_outputs(self, index: int, outputs: Outputs) -> Outputs:
        """Shrink one evaluation result to what ``score`` needs (e.g. per-token NLL instead of full logits).

        ``index`` is the position of the feed in ``evaluation_feeds()``. The default keeps everything.
        """
        return outputs

    @abstractmethod
    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Compare a candidate model with the FP32 reference on the evaluation feeds.

        Both lists hold ``reduce_outputs`` results aligned with ``evaluation_feeds()`` (possibly a prefix of
        it). Returns named figures (for example ``{"cosine_mean": ..., "cosine_min": ...}``); every key is
        documented in the subclass docstring.
        """
