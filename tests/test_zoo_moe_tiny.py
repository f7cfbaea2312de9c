"""The ``moe-tiny`` zoo models: export fidelity, KV-cache decoding, real per-token routing, the dense one-hot
variant, CLA/GQA structure, trained quality, feeds and scoring."""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxsmith.models.moe_tiny import (
    CACHE_LAYERS,
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    QUERY_HEADS,
    ROUTED_EXPERTS,
    WINDOW,
    MoeTiny,
    MoeTinyDense,
    build_torch_model,
    empty_past,
    expert_token_counts,
    past_names,
    present_names,
)
from onnxsmith.models.zoo import get_zoo_model

EXPERT_MATMUL = re.compile(r"^/layers\.(\d+)/mlp/experts\.(\d+)/(gate|up|down)_proj/MatMul$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe_tiny") / "model.onnx"
    MoeTiny().export(path)
    return path


@pytest.fixture(scope="module")
def exported_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe_tiny_dense") / "model.onnx"
    MoeTinyDense().export(path)
    return path


@pytest.fixture(scope="module")
def graph(exported: Path) -> onnx.GraphProto:
    return onnx.load(exported).graph


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _evaluation_batch() -> np.ndarray:
    return np.concatenate([feed["input_ids"] for feed in MoeTiny().evaluation_feeds()])


def _prefill(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, **empty_past(len(ids))}


def _ancestors(graph: onnx.GraphProto, tensor: str, scope: str) -> dict[str, onnx.NodeProto]:
    """Nodes (by name) that ``tensor`` descends from through nodes whose names start with ``scope``."""
    producer = {out: node for node in graph.node for out in node.output}
    pending, seen = deque([tensor]), {}
    while pending:
        node = producer.get(pending.popleft())
        if node is None or node.name in seen or not node.name.startswith(scope):
            continue
        seen[node.name] = node
        pending.extend(node.input)
    return seen


def _depends_on(graph: onnx.GraphProto, tensor: str, op_type: str, scope: str) -> bool:
    """Whether ``tensor`` descends from an ``op_type`` node through nodes whose names start with ``scope``."""
    return any(node.op_type == op_type for node in _ancestors(graph, tensor, scope).values())


@pytest.mark.parametrize("seq", [WINDOW, 37, 1])  # seq 1 leaves most experts with no tokens
def test_onnx_matches_torch(exported: Path, seq: int) -> None:
    ids = _evaluation_batch()[:2, :seq]
    logits, *presents = _session(exported).run(["logits", *present_names()], _prefill(ids))
    with torch.no_grad():
        expected, expected_presents = build_torch_model()(torch.from_numpy(ids))
    assert logits.shape == (2, seq, 256)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    for present, tensor in zip(presents, (t for pair in expected_presents for t in pair), strict=True):
        assert present.shape == (2, KV_HEADS, seq, HEAD_DIM)
        np.testing.assert_allclose(present, tensor.numpy(), atol=1e-4, rtol=0)


def test_decode_step_matches_full_run(exported: Path) -> None:
    """Prefill 100 bytes, then decode byte 101 over the returned cache: same logits as one 101-byte run."""
    ids = _evaluation_batch()[:1, :101]
    session = _session(exported)
    _, *presents = session.run(["logits", *present_names()], _prefill(ids[:, :100]))
    step = session.run(None, {"input_ids": ids[:, 100:], **dict(zip(past_names(), presents, strict=True))})
    (full,) = session.run(["logits"], _prefill(ids))
    assert step[0].shape == (1, 1, 256)
    np.testing.assert_allclose(step[0][0, -1], full[0, -1], atol=1e-4, rtol=0)
    assert [present.shape for present in step[1:]] == [(1, KV_HEADS, 101, HEAD_DIM)] * 4
    with torch.no_grad():
        model = build_torch_model()
        _, past = model(torch.from_numpy(ids[:, :100]))
        logits, _ = model(torch.from_numpy(ids[:, 100:]), past)
    np.testing.assert_allclose(logits.numpy()[0, -1], full[0, -1], atol=1e-4, rtol=0)


def test_cache_holds_exactly_the_kv_owning_layers(graph: onnx.GraphProto) -> None:
    """Inputs/outputs name the caches of layers 0 and 2; each present is Concat(past, new rotated K or new V)."""
    assert CACHE_LAYERS == (0, 2)
    assert past_names() == ["past_key.0", "past_value.0", "past_key.2", "past_value.2"]
    assert [i.name for i in graph.input] == ["input_ids", *past_names()]
    assert [o.name for o in graph.output] == ["logits", *present_names()]
    for value in [*graph.input[1:], *graph.output[1:]]:
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param or d.dim_value for d in dims][1::2] == [KV_HEADS, HEAD_DIM]
        assert dims[0].dim_param and dims[2].dim_param
    producer = {out: node for node in graph.node for out in node.output}
    for layer in CACHE_LAYERS:
        scope = f"/layers.{layer}/attn/"
        for kind, projection, other, rotated in (("key", "k", "v", True), ("value", "v", "k", False)):
            concat = producer[f"present_{kind}.{layer}"]
            assert concat.op_type == "Concat" and concat.input[0] == f"past_{kind}.{layer}", concat.name
            new = _ancestors(graph, concat.input[1], scope)
            assert f"{scope}{projection}_proj/MatMul" in new and f"{scope}{other}_proj/MatMul" not in new
            assert any(node.op_type == "Neg" for node in new.values()) == rotated, concat.name
            assert [node.name for node in graph.node if concat.input[1] in node.input] == [concat.name]
    concats = [node for node in graph.node if node.op_type == "Concat" and set(node.input) & set(past_names())]
    assert len(concats) == 2 * len(CACHE_LAYERS)


def test_routing_is_per_token_dispatch(graph: onnx.GraphProto) -> None:
    ops = [node.op_type for node in graph.node]
    assert ops.count("NonZero") == LAYERS * ROUTED_EXPERTS
    assert "OneHot" not in ops
    expert_matmuls = [node for node in graph.node if EXPERT_MATMUL.match(node.name)]
    assert len(expert_matmuls) == LAYERS * ROUTED_EXPERTS * 3
    for node in expert_matmuls:
        layer = EXPERT_MATMUL.match(node.name).group(1)
        assert _depends_on(graph, node.input[0], "NonZero", f"/layers.{layer}/mlp/"), node.name
    for node in graph.node:
        match = re.match(r"^/layers\.(\d+)/mlp/(gate|shared_expert/\w+)/MatMul$", node.name)
        if match:
            assert not _depends_on(graph, node.input[0], "NonZero", f"/layers.{match.group(1)}/mlp/"), node.name


def test_each_expert_sees_only_its_tokens(exported: Path) -> None:
    """Expert inputs at run time have exactly as many rows as tokens routed there; every expert of every layer
    of the trained model gets at least 5% of the evaluation tokens."""
    model = onnx.load(exported)
    probes = {}
    for node in model.graph.node:
        match = EXPERT_MATMUL.match(node.name)
        if match and match.group(3) == "gate":
            probes[int(match.group(1)), int(match.group(2))] = node.input[0]
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    ids = _evaluation_batch()
    rows = dict(zip(probes, _session(model).run(list(probes.values()), _prefill(ids)), strict=True))
    counts = expert_token_counts(build_torch_model(), torch.from_numpy(ids))
    for (layer, expert), tokens in rows.items():
        assert tokens.shape == (counts[layer, expert], HIDDEN)
    assert (counts.sum(axis=1) == ids.size).all()
    assert (counts >= 0.05 * ids.size).all(), counts


def test_dense_variant_matches_dispatch(exported: Path, exported_dense: Path) -> None:
    dense = onnx.load(exported_dense).graph
    ops = [node.op_type for node in dense.node]
    assert ops.count("OneHot") == LAYERS and "NonZero" not in ops
    downs = [node for node in dense.node if EXPERT_MATMUL.match(node.name) and node.name.endswith("down_proj/MatMul")]
    assert len(downs) == LAYERS * ROUTED_EXPERTS
    for down in downs:  # each expert output is scaled by its column of the one-hot gate
        (combine,) = [node for node in dense.node if down.output[0] in node.input]
        layer = EXPERT_MATMUL.match(down.name).group(1)
        assert combine.op_type == "Mul" and _depends_on(dense, combine.input[1], "OneHot", f"/layers.{layer}/mlp/")
    ids = _evaluation_batch()[:8]
    expected = _session(exported).run(None, _prefill(ids))
    actual = _session(exported_dense).run(None, _prefill(ids))
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        dense_logits, _ = build_torch_model(dense=True)(torch.from_numpy(ids))
    np.testing.assert_allclose(dense_logits.numpy(), expected[0], atol=1e-4, rtol=0)
    assert isinstance(get_zoo_model("moe-tiny-dense"), MoeTinyDense)


def test_cross_layer_attention_and_gqa(graph: onnx.GraphProto) -> None:
    torch_model = build_torch_model()
    for index, layer in enumerate(torch_model.layers):
        assert layer.attn.q_proj.weight.shape == (QUERY_HEADS * HEAD_DIM, HIDDEN)
        if index % 2:
            assert not hasattr(layer.attn, "k_proj") and not hasattr(layer.attn, "v_proj")
        else:
            assert layer.attn.k_proj.weight.shape == (KV_HEADS * HEAD_DIM, HIDDEN)
            assert layer.attn.v_proj.weight.shape == (KV_HEADS * HEAD_DIM, HIDDEN)
    assert QUERY_HEADS == 4 and KV_HEADS == 2 and HEAD_DIM == 16
    kv_matmuls = sorted(node.name for node in graph.node if re.search(r"/attn/[kv]_proj/", node.name))
    assert kv_matmuls == [f"/layers.{i}/attn/{p}_proj/MatMul" for i in (0, 2) for p in "kv"]
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.name in kv_matmuls:
            assert list(initializers[node.input[1]].dims) == [HIDDEN, KV_HEADS * HEAD_DIM]


def test_feeds_are_deterministic_and_disjoint() -> None:
    zoo = MoeTiny()
    evaluation, calibration = zoo.evaluation_feeds(), zoo.calibration_feeds()
    assert len(evaluation) == 32 and len(calibration) == 16
    assert len(zoo.evaluation_feeds(3)) == 3 and len(zoo.calibration_feeds(5)) == 5
    for feed in evaluation + calibration:
        assert list(feed) == ["input_ids", *past_names()]
        assert feed["input_ids"].shape == (1, WINDOW) and feed["input_ids"].dtype == np.int64
        for name in past_names():
            assert feed[name].shape == (1, KV_HEADS, 0, HEAD_DIM) and feed[name].dtype == np.float32
    assert np.array_equal(zoo.evaluation_feeds(1)[0]["input_ids"], evaluation[0]["input_ids"])
    eval_rows = {feed["input_ids"].tobytes() for feed in evaluation}
    assert not eval_rows & {feed["input_ids"].tobytes() for feed in calibration}


def test_score_and_trained_perplexity(exported: Path) -> None:
    zoo = MoeTiny()
    session = _session(exported)
    logits = [session.run(None, feed)[0] for feed in zoo.evaluation_feeds()]
    reference = [zoo.reduce_outputs(i, {"logits": out}) for i, out in enumerate(logits)]
    assert reference[0]["nll"].shape == (1, WINDOW - 1) and reference[0]["argmax"].shape == (1, WINDOW)

    perfect = zoo.score(reference, reference)
    assert perfect["perplexity"] == perfect["perplexity_fp"] and perfect["top1_agreement"] == 1.0
    assert 1.0 < perfect["perplexity_fp"] < 4.0  # trained: 3.22 on all 32 windows; the untrained init scores 398

    rng = np.random.default_rng(0)
    noisy = [
        zoo.reduce_outputs(i, {"logits": out + rng.normal(0.0, 1.0, out.shape).astype(np.float32)})
        for i, out in enumerate(logits)
    ]
    worse = zoo.score(reference, noisy)
    assert worse["perplexity_fp"] == perfect["perplexity_fp"]
    assert worse["perplexity"] > perfect["perplexity"]
    assert worse["top1_agreement"] < 0.9
