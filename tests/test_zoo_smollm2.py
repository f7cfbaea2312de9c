"""The SmolLM2-135M zoo entry: its export against transformers, its token windows, NLL reduction and score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnxsmith.core.feeds import Outputs
from onnxsmith.models.smollm2 import SmolLM2, load_causal_lm, logits_only
from onnxsmith.models.zoo import zoo_model_path

WINDOWS_RUN = 3
"""Evaluation windows the tests run through onnxruntime (about 1 s each)."""


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    return SmolLM2()


@pytest.fixture(scope="session")
def onnx_path() -> Path:
    """The cached FP32 export (exported once, on first use: about 1.5 min)."""
    return zoo_model_path("smollm2")


@pytest.fixture(scope="session")
def session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def raw_logits(smollm2: SmolLM2, session: ort.InferenceSession) -> list[np.ndarray]:
    """FP32 ONNX logits [1, 256, 49152] of the first evaluation windows."""
    return [session.run(["logits"], feed)[0] for feed in smollm2.evaluation_feeds(WINDOWS_RUN)]


@pytest.fixture(scope="session")
def reference_outputs(smollm2: SmolLM2, raw_logits: list[np.ndarray]) -> list[Outputs]:
    return [smollm2.reduce_outputs(i, {"logits": logits}) for i, logits in enumerate(raw_logits)]


def test_graph_interface(session: ort.InferenceSession) -> None:
    (inp,) = session.get_inputs()
    assert inp.name == "input_ids" and inp.type == "tensor(int64)"
    assert all(isinstance(dim, str) for dim in inp.shape)  # dynamic batch and sequence
    (out,) = session.get_outputs()
    assert out.name == "logits" and out.shape[2] == 49152


def test_single_file_export(onnx_path: Path) -> None:
    assert [p.name for p in onnx_path.parent.iterdir()] == ["model.onnx"]
    assert 500e6 < onnx_path.stat().st_size < 600e6  # the tied embedding / head matrix is stored once


def test_export_matches_transformers(smollm2: SmolLM2, session: ort.InferenceSession) -> None:
    ids = smollm2.token_ids()[1000:1064].reshape(2, 32)  # batch 2 x 32 tokens: both dynamic axes differ from 1 x 256
    with torch.no_grad():
        expected = logits_only(load_causal_lm())(torch.from_numpy(ids)).numpy()
    actual = session.run(["logits"], {"input_ids": ids})[0]
    assert actual.shape == (2, 32, 49152)
    np.testing.assert_allclose(actual, expected, atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


def test_windows_are_deterministic_and_disjoint(smollm2: SmolLM2) -> None:
    tokens = smollm2.token_ids()
    assert tokens.dtype == np.int64 and len(tokens) > 100_000
    np.testing.assert_array_equal(tokens, SmolLM2().token_ids())

    evaluation = smollm2.evaluation_feeds()
    assert len(evaluation) == 80 and len(smollm2.evaluation_feeds(5)) == 5
    np.testing.assert_array_equal(np.concatenate([f["input_ids"][0] for f in evaluation]), tokens[:20_480])

    calibration = smollm2.calibration_feeds()
    assert len(calibration) == 32
    every_calibration = smollm2.calibration_feeds(10_000)
    assert len(every_calibration) == (len(tokens) - 40_960) // 256
    np.testing.assert_array_equal(
        np.concatenate([f["input_ids"][0] for f in every_calibration]),
        tokens[40_960 : 40_960 + 256 * len(every_calibration)],
    )
    for feed in evaluation + every_calibration:
        assert feed["input_ids"].shape == (1, 256) and feed["input_ids"].dtype == np.int64


def test_reduce_outputs(smollm2: SmolLM2, raw_logits: list[np.ndarray], reference_outputs: list[Outputs]) -> None:
    reduced = reference_outputs[1]
    assert reduced.keys() == {"nll", "argmax"}
    assert reduced["nll"].shape == (255,) and reduced["argmax"].shape == (256,)
    targets = torch.from_numpy(smollm2.token_ids()[257:512])
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(raw_logits[1][0, :255]).double(), targets, reduction="none"
    )
    np.testing.assert_allclose(reduced["nll"], expected.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(reduced["argmax"], raw_logits[1][0].argmax(-1))


def test_fp32_perplexity_is_plausible(smollm2: SmolLM2, reference_outputs: list[Outputs]) -> None:
    perplexity = smollm2.score(reference_outputs, reference_outputs)["perplexity"]
    assert 12 < perplexity < 25, perplexity  # about 17.5 over all 80 windows


def test_score_of_reference_is_perfect(smollm2: SmolLM2, reference_outputs: list[Outputs]) -> None:
    scores = smollm2.score(reference_outputs, reference_outputs)
    assert scores["perplexity"] == scores["perplexity_fp"]
    assert scores["top1_agreement"] == 1.0


def test_perturbed_candidate_scores_worse(
    smollm2: SmolLM2, raw_logits: list[np.ndarray], reference_outputs: list[Outputs]
) -> None:
    rng = np.random.default_rng(0)
    noisy = [
        smollm2.reduce_outputs(i, {"logits": logits + rng.normal(0, 1.0, logits.shape).astype(np.float32)})
        for i, logits in enumerate(raw_logits)
    ]
    scores = smollm2.score(reference_outputs, noisy)
    assert scores["perplexity"] > scores["perplexity_fp"]
    assert 0.3 < scores["top1_agreement"] < 1.0
