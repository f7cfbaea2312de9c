"""The ``moe-tiny`` zoo model: export fidelity, real per-token routing, CLA/GQA structure, feeds and scoring."""

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
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    QUERY_HEADS,
    ROUTED_EXPERTS,
    WINDOW,
    MoeTiny,
    build_torch_model,
    expert_token_counts,
)

EXPERT_MATMUL = re.compile(r"^/layers\.(\d+)/mlp/experts\.(\d+)/(gate|up|down)_proj/MatMul$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe_tiny") / "model.onnx"
    MoeTiny().export(path)
    return path


@pytest.fixture(scope="module")
def graph(exported: Path) -> onnx.GraphProto:
    return onnx.load(exported).graph


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _evaluation_batch() -> np.ndarray:
    return np.concatenate([feed["input_ids"] for feed in MoeTiny().evaluation_feeds()])


def _depends_on(graph: onnx.GraphProto, tensor: str, op_type: str, scope: str) -> bool:
    """Whether ``tensor`` descends from an ``op_type`` node through nodes whose names start with ``scope``."""
    producer = {out: node for node in graph.node for out in node.output}
    pending, seen = deque([tensor]), set()
    while pending:
        node = producer.get(pending.popleft())
        if node is None or node.name in seen or not node.name.startswith(scope):
            continue
        if node.op_type == op_type:
            return True
        seen.add(node.name)
        pending.extend(node.input)
    return False


@pytest.mark.parametrize("seq", [WINDOW, 37, 1])  # seq 1 leaves most experts with no tokens
def test_onnx_matches_torch(exported: Path, seq: int) -> None:
    ids = _evaluation_batch()[:2, :seq]
    (logits,) = _session(exported).run(["logits"], {"input_ids": ids})
    with torch.no_grad():
        expected = build_torch_model()(torch.from_numpy(ids)).numpy()
    assert logits.shape == (2, seq, 256)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


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
    """Expert inputs at run time have exactly as many rows as tokens routed there, and no expert is idle."""
    model = onnx.load(exported)
    probes = {}
    for node in model.graph.node:
        match = EXPERT_MATMUL.match(node.name)
        if match and match.group(3) == "gate":
            probes[int(match.group(1)), int(match.group(2))] = node.input[0]
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    ids = _evaluation_batch()
    rows = dict(zip(probes, _session(model).run(list(probes.values()), {"input_ids": ids}), strict=True))
    counts = expert_token_counts(build_torch_model(), torch.from_numpy(ids))
    for (layer, expert), tokens in rows.items():
        assert tokens.shape == (counts[layer, expert], HIDDEN)
    assert (counts.sum(axis=1) == ids.size).all()
    assert (counts >= 0.05 * ids.size).all(), counts


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
    assert all(feed["input_ids"].shape == (1, WINDOW) and feed["input_ids"].dtype == np.int64 for feed in evaluation)
    assert np.array_equal(zoo.evaluation_feeds(1)[0]["input_ids"], evaluation[0]["input_ids"])
    eval_rows = {feed["input_ids"].tobytes() for feed in evaluation}
    assert not eval_rows & {feed["input_ids"].tobytes() for feed in calibration}


def test_score(exported: Path) -> None:
    zoo = MoeTiny()
    session = _session(exported)
    logits = [session.run(["logits"], feed)[0] for feed in zoo.evaluation_feeds(8)]
    reference = [zoo.reduce_outputs(i, {"logits": out}) for i, out in enumerate(logits)]
    assert reference[0]["nll"].shape == (1, WINDOW - 1) and reference[0]["argmax"].shape == (1, WINDOW)

    perfect = zoo.score(reference, reference)
    assert perfect["perplexity"] == perfect["perplexity_fp"] and perfect["top1_agreement"] == 1.0
    assert 1.0 < perfect["perplexity_fp"] < 1000.0

    rng = np.random.default_rng(0)
    noisy = [
        zoo.reduce_outputs(i, {"logits": out + rng.normal(0.0, 1.0, out.shape).astype(np.float32)})
        for i, out in enumerate(logits)
    ]
    worse = zoo.score(reference, noisy)
    assert worse["perplexity_fp"] == perfect["perplexity_fp"]
    assert worse["perplexity"] > perfect["perplexity"]
    assert worse["top1_agreement"] < 0.9
