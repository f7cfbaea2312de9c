"""The all-MiniLM-L6-v2 zoo entry: its export, feeds and score, against sentence-transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sentence_transformers import SentenceTransformer

from onnxsmith.core.feeds import Outputs
from onnxsmith.models.minilm import MAX_TOKENS, MiniLM, model_dir
from onnxsmith.models.text_data import pydoc_sentences
from onnxsmith.models.zoo import zoo_model_path


@pytest.fixture(scope="session")
def minilm() -> MiniLM:
    return MiniLM()


@pytest.fixture(scope="session")
def onnx_path() -> Path:
    """The cached FP32 export (exported once, on first use)."""
    return zoo_model_path("minilm")


@pytest.fixture(scope="session")
def session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference_outputs(minilm: MiniLM, session: ort.InferenceSession) -> list[Outputs]:
    """The FP32 ONNX model's outputs on every evaluation feed."""
    return [
        minilm.reduce_outputs(i, dict(zip(["sentence_embedding"], session.run(["sentence_embedding"], feed))))
        for i, feed in enumerate(minilm.evaluation_feeds())
    ]


def test_graph_interface(session: ort.InferenceSession) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for arg in inputs.values():
        assert arg.type == "tensor(int64)"
        assert all(isinstance(dim, str) for dim in arg.shape)  # dynamic batch and sequence
    (output,) = session.get_outputs()
    assert output.name == "sentence_embedding"
    assert output.shape[1] == 384


def test_export_matches_sentence_transformers(
    minilm: MiniLM, reference_outputs: list[Outputs], session: ort.InferenceSession
) -> None:

    sentences = minilm.evaluation_sentences()
    reference = SentenceTransformer(str(model_dir()), device="cpu")
    reference.max_seq_length = MAX_TOKENS  # two evaluation sentences are longer and get truncated
    expected = reference.encode(sentences, convert_to_numpy=True)
    one_by_one = np.concatenate([out["sentence_embedding"] for out in reference_outputs])
    assert one_by_one.shape == (100, 384)
    cosines = np.sum(one_by_one * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)

    padded = session.run(None, minilm.encode(sentences[:8]))[0]  # batch 8, padded: the mask must hide padding
    np.testing.assert_allclose(padded, expected[:8], atol=1e-4)


def test_feeds_are_deterministic(minilm: MiniLM) -> None:
    other = MiniLM()
    for mine, theirs in zip(minilm.evaluation_feeds(), other.evaluation_feeds(), strict=True):
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
    first = minilm.calibration_feeds()
    assert len(first) == 32
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other.calibration_feeds()))


def test_feed_shapes(minilm: MiniLM) -> None:
    feeds = minilm.evaluation_feeds()
    assert len(feeds) == 100
    assert len(minilm.evaluation_feeds(7)) == 7
    lengths = {feed["input_ids"].shape[1] for feed in feeds}
    assert len(lengths) > 10 and max(lengths) <= 128  # variable length, truncated
    for feed in feeds:
        assert feed["input_ids"].shape[0] == 1
        assert all(array.dtype == np.int64 and array.shape == feed["input_ids"].shape for array in feed.values())
        assert feed["attention_mask"].all() and not feed["token_type_ids"].any()


def test_calibration_disjoint_from_evaluation(minilm: MiniLM) -> None:
    assert minilm.calibration_sentences() == list(pydoc_sentences()[:32])
    assert len(minilm.calibration_feeds(512)) == 512
    every_calibration = minilm.calibration_sentences(10_000)
    assert len(every_calibration) == len(pydoc_sentences()) - 100
    assert not set(every_calibration) & set(minilm.evaluation_sentences())  # by text, not just by position


def test_score_of_reference_is_perfect(minilm: MiniLM, reference_outputs: list[Outputs]) -> None:
    scores = minilm.score(reference_outputs, reference_outputs)
    assert scores == pytest.approx({"cosine_mean": 1.0, "cosine_min": 1.0}, abs=1e-12)


def test_perturbed_candidate_scores_worse(minilm: MiniLM, reference_outputs: list[Outputs]) -> None:
    rng = np.random.default_rng(0)
    noisy = [
        {"sentence_embedding": out["sentence_embedding"] + rng.normal(0, 0.02, out["sentence_embedding"].shape)}
        for out in reference_outputs
    ]
    scores = minilm.score(reference_outputs, noisy)
    assert 0.5 < scores["cosine_min"] <= scores["cosine_mean"] < 0.999


def test_esparse24_on_minilm_folds_shuffles_and_prunes_every_gemm(minilm: MiniLM, onnx_path: Path) -> None:
    """The real model through esparse24: the shuffle is verified lossless (fc1 -> fc2 and V -> O fold, the
    LayerNorm readers get a Gather) and all 36 GEMM weights end 2:4 on their input axis."""
    import onnx

    from onnxsmith.analysis.sparsity import inspect_sparsity
    from onnxsmith.optimizer.manager import PassManager
    from onnxsmith.core.pass_base import PassContext
    from onnxsmith.optimizer.recipes import load_recipe

    feeds = minilm.calibration_feeds(2)
    result = PassManager(load_recipe("esparse24").build({"shuffle": "global"}), probe_feeds=feeds[:1]).run(
        onnx.load(str(onnx_path)), PassContext(calibration_data=feeds, progress=False))
    shuffle = next(record for record in result.records if record.name == "shuffle-nm")
    assert shuffle.verification["within_tolerance"]
    assert shuffle.changes["folded"] == 12 and shuffle.changes["gathered"] == 24
    patterns = [row.pattern for row in inspect_sparsity(result.model)]
    assert len(patterns) == 36 and set(patterns) == {"2:4"}


def test_int4_gptq_and_w4a8_on_minilm_write_runnable_int4_models(minilm: MiniLM, onnx_path: Path,
                                                                  reference_outputs: list[Outputs]) -> None:
    """The real model through int4-gptq (MatMulNBits, block 32) and w4a8 (INT4 DequantizeLinear + INT8
    activations): every GEMM weight is 4-bit in the written form and onnxruntime runs both close to FP32."""
    import onnx

    from onnxsmith.backends.onnxruntime import create_session, run_session
    from onnxsmith.optimizer.manager import PassManager
    from onnxsmith.core.pass_base import PassContext
    from onnxsmith.optimizer.recipes import load_recipe

    feeds = minilm.calibration_feeds(4)
    evaluation = minilm.evaluation_feeds()[:20]
    cases = (("int4-gptq", {"block_size": 32, "target": "onnxruntime"}, "MatMulNBits", 0.97),
             ("w4a8", {}, "int4 weights", 0.9))
    for recipe, options, kind, floor in cases:
        result = PassManager(load_recipe(recipe).build(options), probe_feeds=feeds[:1]).run(
            onnx.load(str(onnx_path)), PassContext(calibration_data=feeds, progress=False))
        model = result.model
        if kind == "MatMulNBits":
            assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 36
        else:
            assert sum(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer) == 36
        session = create_session(model)
        outputs = [minilm.reduce_outputs(i, run_session(session, feed, ["sentence_embedding"]))
                   for i, feed in enumerate(evaluation)]
        assert minilm.score(reference_outputs[:20], outputs)["cosine_mean"] > floor
