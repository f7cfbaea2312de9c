"""``moe-w8a8 --kv-cache int8`` end to end on the real ``moe-tiny`` exports (dispatch and dense one-hot)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxsmith.models.moe_tiny import CACHE_LAYERS, LAYERS, ROUTED_EXPERTS, MoeTiny, past_names, present_names
from onnxsmith.models.zoo import zoo_model_path
from onnxsmith.optimizer.cli import main
from onnxsmith.core.graph import import_graph
from onnxsmith.analysis.kv_patterns import trace_path


@pytest.fixture(scope="module", params=["moe-tiny", "moe-tiny-dense"])
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    folder = tmp_path_factory.mktemp(request.param)
    output, report = folder / "q.onnx", folder / "report"
    assert main([f"zoo:{request.param}", "--recipe", "moe-w8a8", "--kv-cache", "int8", "-o", str(output),
                 "--report", str(report), "-q"]) == 0
    return request.param, output, json.loads((report / "report.json").read_text())


def _records(report: dict) -> dict[str, dict]:
    return {record["name"]: record for record in report["passes"]}


def test_every_stored_kv_quantized_once_and_read_by_both_cla_layers(quantized: tuple[str, Path, dict]) -> None:
    _, output, report = quantized
    details = [d for d in _records(report)["kv-cache-qdq"]["details"]]
    assert sorted(d["present"] for d in details) == sorted(present_names())
    assert sorted(d["past"] for d in details) == sorted(past_names())
    model = onnx.load(output)
    quantize_inputs = [node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"]
    graph = import_graph(model)
    nodes = {node.name: node for node in graph.nodes}
    inputs = {tensor.name for tensor in graph.inputs}
    for detail in details:
        assert quantize_inputs.count(detail["tensor"]) == 1
        layers = sorted(int(name.split("/")[1].split(".")[1]) for name in detail["consumers"])
        owner = int(detail["present"].rsplit(".", 1)[1])
        assert owner in CACHE_LAYERS and layers == [owner, owner + 1]  # the owning layer and the one reusing it
        for name in detail["consumers"]:
            assert detail["qdq"] in [t.name for t in trace_path(nodes[name].inputs[1], inputs)]
        assert detail["validated_consumers"] == 2


def test_experts_counted_router_float_and_routing_kept(quantized: tuple[str, Path, dict]) -> None:
    name, _, report = quantized
    details = _records(report)["moe-qdq"]["details"]
    experts = [d for d in details if d["kind"] == "expert"]
    assert len(experts) == LAYERS * ROUTED_EXPERTS
    assert {d["form"] for d in experts} == {"dense" if name.endswith("dense") else "dispatch"}
    tokens = len(MoeTiny().calibration_feeds()) * 128
    for layer in range(LAYERS):
        assert sum(d["tokens"] for d in experts if d["moe_layer"] == f"/layers.{layer}/mlp/gate/MatMul") == tokens
    assert all(d["precision"] == "float" for d in details if d["kind"] == "router")
    evaluation = report["evaluation"]
    assert 0.97 <= evaluation["routing_agreement"] < 1.0
    assert evaluation["metrics"]["perplexity"] < evaluation["metrics"]["perplexity_fp"] * 1.02


def test_quantized_decode_step_matches_its_own_full_run(quantized: tuple[str, Path, dict]) -> None:
    """Prefill 100 bytes then decode byte 101 through the quantized cache: same logits as one 101-byte pass."""
    name, output, _ = quantized
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    feed = MoeTiny().evaluation_feeds(1)[0]
    ids = feed["input_ids"][:, :101]
    full = session.run(["logits"], {**feed, "input_ids": ids})[0]
    prefill = session.run(None, {**feed, "input_ids": ids[:, :100]})
    outputs = [o.name for o in session.get_outputs()]
    past = {p: prefill[outputs.index(q)] for p, q in zip(past_names(), present_names(), strict=True)}
    step = session.run(["logits"], {"input_ids": ids[:, 100:], **past})[0]
    np.testing.assert_allclose(step[:, -1], full[:, -1], atol=2e-3)
    assert zoo_model_path(name).exists()
