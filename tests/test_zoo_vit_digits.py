"""The ``vit-digits`` zoo model: export fidelity, graph patterns, feeds and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxsmith.models.vit_digits import VitDigits, load_trained_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vit-digits") / "model.onnx"
    VitDigits().export(path)
    return path


@pytest.fixture(scope="module")
def session(exported: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(session: ort.InferenceSession) -> list[dict[str, np.ndarray]]:
    return [{"logits": session.run(["logits"], feed)[0]} for feed in VitDigits().evaluation_feeds()]


def test_export_matches_torch(session: ort.InferenceSession) -> None:
    model = load_trained_model()
    for feed in VitDigits().evaluation_feeds(count=2):
        with torch.no_grad():
            expected = model(torch.from_numpy(feed["pixels"])).numpy()
        (actual,) = session.run(["logits"], feed)
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_graph_has_attention_and_gelu(exported: Path) -> None:
    graph = onnx.load(str(exported)).graph
    op_types = {node.op_type for node in graph.node}
    assert {"Softmax", "Erf", "MatMul", "LayerNormalization"} <= op_types
    consumers = {name: node.op_type for node in graph.node for name in node.input}
    softmax_outputs = [node.output[0] for node in graph.node if node.op_type == "Softmax"]
    assert len(softmax_outputs) == 2
    assert all(consumers[name] == "MatMul" for name in softmax_outputs)
    assert [i.name for i in graph.input] == ["pixels"]
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.parametrize("batch", [1, 50])
def test_dynamic_batch(session: ort.InferenceSession, batch: int) -> None:
    images = VitDigits().evaluation_feeds(count=1)[0]["pixels"][:batch]
    (logits,) = session.run(["logits"], {"pixels": images})
    assert logits.shape == (batch, 10)


def test_feeds_are_deterministic_and_disjoint() -> None:
    zoo = VitDigits()
    calibration, evaluation = zoo.calibration_feeds(), zoo.evaluation_feeds()
    assert [f["pixels"].shape for f in calibration] == [(8, 1, 8, 8)] * 8
    assert [len(f["pixels"]) for f in evaluation] == [50] * 9
    assert all(f["pixels"].dtype == np.float32 for f in calibration + evaluation)
    for first, second in [(calibration, zoo.calibration_feeds()), (evaluation, zoo.evaluation_feeds())]:
        assert all(np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(first, second, strict=True))
    assert len(zoo.calibration_feeds(count=3)) == 3
    assert len(zoo.evaluation_feeds(count=2)) == 2
    calibration_images = {f["pixels"][i].tobytes() for f in zoo.calibration_feeds(count=1000) for i in range(8)}
    evaluation_images = {image.tobytes() for f in evaluation for image in f["pixels"]}
    assert not calibration_images & evaluation_images


def test_score_of_reference_against_itself(reference: list[dict[str, np.ndarray]]) -> None:
    scores = VitDigits().score(reference, reference)
    assert scores["top1_agreement"] == 1.0
    assert scores["accuracy"] == scores["accuracy_fp"] >= 0.9


def test_score_of_a_prefix(reference: list[dict[str, np.ndarray]]) -> None:
    scores = VitDigits().score(reference[:2], reference[:2])
    assert scores["top1_agreement"] == 1.0
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_score_of_a_wrong_candidate(reference: list[dict[str, np.ndarray]]) -> None:
    rng = np.random.default_rng(0)
    shuffled = [{"logits": rng.permutation(outputs["logits"], axis=1)} for outputs in reference]
    scores = VitDigits().score(reference, shuffled)
    assert scores["top1_agreement"] < 1.0
    assert scores["accuracy"] < scores["accuracy_fp"]


def test_score_rejects_misaligned_results(reference: list[dict[str, np.ndarray]]) -> None:
    with pytest.raises(ValueError):
        VitDigits().score(reference, reference[:1])
    truncated = [{"logits": reference[0]["logits"][:10]}]
    with pytest.raises(ValueError):
        VitDigits().score(truncated, truncated)
    with pytest.raises(ValueError):
        VitDigits().score(reference + reference[:1], reference + reference[:1])
