"""MoE detection, expert-aware calibration, router protection, few-token fallback and routing agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_graphs import EXPERTS, ToyMoE, export_moe, moe_tokens, routed_to
from onnxsmith.calibration.collection import collect
from onnxsmith.rewrite.int8_qdq import activation_qparams
from onnxsmith.calibration.observers import MinMaxObserver
from onnxsmith.calibration.routing import RoutedObserver
from onnxsmith.optimizer.evaluation import evaluate
from onnxsmith.core.pass_base import PassContext
from onnxsmith.core.graph import import_graph
from onnxsmith.analysis.moe_patterns import find_moe_layers
from onnxsmith.passes.moe_qdq import MoeQuantize
from onnxsmith.passes.qdq_int8 import QuantizeInt8


@pytest.fixture(scope="module", params=["dispatch", "dense"])
def moe_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, onnx.ModelProto]:
    path = export_moe(tmp_path_factory.mktemp("moe") / f"{request.param}.onnx", dense=request.param == "dense")
    return request.param, onnx.shape_inference.infer_shapes(onnx.load(path))


def _feeds(count: int = 4, idle_expert: int | None = None) -> list[dict[str, np.ndarray]]:
    return [{"x": moe_tokens(24, seed=i, idle_expert=idle_expert)} for i in range(count)]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _calibrated(quantizer: MoeQuantize, model: onnx.ModelProto, feeds: list) -> PassContext:
    context = PassContext(calibration_data=feeds, progress=False)
    context.calibration = collect(model, quantizer.calibration_request(model), feeds, progress=False)
    return context


def test_detects_router_experts_shared_expert_and_form(moe_model: tuple[str, onnx.ModelProto]) -> None:
    form, model = moe_model
    (layer,) = find_moe_layers(import_graph(model))
    assert layer.router == "/gate/MatMul" and layer.input == "x" and layer.top_k == 1
    assert layer.form == form
    assert sorted(layer.experts) == list(range(EXPERTS))
    for index, expert in layer.experts.items():
        assert sorted(expert.gemms) == sorted(f"/experts.{index}/{p}_proj/MatMul" for p in ("gate", "up", "down"))
        assert sorted(expert.entries) == sorted(f"/experts.{index}/{p}_proj/MatMul" for p in ("gate", "up"))
    assert sorted(layer.shared) == sorted(f"/shared_expert/{p}_proj/MatMul" for p in ("gate", "up", "down"))
    ops = {node.op_type for node in model.graph.node}
    assert ("OneHot" in ops) == (form == "dense") and ("NonZero" in ops) == (form == "dispatch")


@pytest.mark.parametrize("dense", [False, True])
def test_topk_router_is_recognised_and_calibrated(dense: bool, tmp_path: Path) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(export_moe(tmp_path / "topk.onnx", dense, topk=True)))
    (layer,) = find_moe_layers(import_graph(model))
    assert layer.top_k == 1 and layer.choice.startswith("/TopK")
    assert sorted(layer.experts) == list(range(EXPERTS)) and len(layer.shared) == 3
    feeds = _feeds()
    context = _calibrated(MoeQuantize(), model, feeds)
    tokens = np.concatenate([feed["x"] for feed in feeds])
    counts = {obs.expert: obs.tokens for obs in context.calibration.values() if isinstance(obs, RoutedObserver)}
    assert counts == {e: len(routed_to(tokens, e)) for e in range(EXPERTS)}


def test_graph_without_router_has_no_moe_layer() -> None:
    from graphs import transformer_block

    assert find_moe_layers(import_graph(transformer_block())) == []


def test_expert_statistics_are_those_of_its_routed_tokens(moe_model: tuple[str, onnx.ModelProto]) -> None:
    """Each expert's entry and inner activation ranges equal numpy's over exactly the tokens routed to it."""
    form, model = moe_model
    feeds = _feeds()
    quantizer = MoeQuantize()
    context = _calibrated(quantizer, model, feeds)
    plan = quantizer.plan(import_graph(model))
    tokens = np.concatenate([feed["x"] for feed in feeds])
    torch_model = ToyMoE(dense=form == "dense")
    expert_groups = {key: group for key, group in plan.groups.items() if group.expert is not None}
    assert len(expert_groups) == 2 * EXPERTS  # each expert's token input and its down projection's input
    for key, group in expert_groups.items():
        _, index = group.expert
        observer = context.calibration[key]
        assert isinstance(observer, RoutedObserver) and observer.select_rows == (form == "dense")
        rows = routed_to(tokens, index)
        assert observer.tokens == len(rows) > 0
        if "down_proj" in group.consumers[0][0].name:
            with torch.no_grad():
                rows = torch_model.experts[index].inner(torch.from_numpy(rows)).numpy()
        assert observer.inner.min == pytest.approx(float(rows.min()), abs=1e-5)
        assert observer.inner.max == pytest.approx(float(rows.max()), abs=1e-5)


@pytest.fixture(scope="module")
def dense_moe(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The dense form alone (the dispatch form holds only routed rows: no contrast to draw there)."""
    path = export_moe(tmp_path_factory.mktemp("moe-dense") / "dense.onnx", dense=True)
    return onnx.shape_inference.infer_shapes(onnx.load(path))


def test_dense_form_naive_statistics_see_every_token(dense_moe: onnx.ModelProto) -> None:
    """The contrast: int8-qdq on the dense form observes each expert's inner tensor over all tokens."""
    model = dense_moe
    feeds = _feeds()
    naive = collect(model, QuantizeInt8().calibration_request(model), feeds, progress=False)
    aware = _calibrated(MoeQuantize(), model, feeds).calibration
    inner = "/experts.0/Mul_1_output_0"
    assert naive[inner].count > aware[inner].inner.count
    assert (naive[inner].min, naive[inner].max) != (aware[inner].inner.min, aware[inner].inner.max)


def test_dense_form_splits_the_shared_input_per_expert(moe_model: tuple[str, onnx.ModelProto]) -> None:
    form, model = moe_model
    feeds = _feeds()
    quantizer = MoeQuantize(min_expert_tokens=1)
    result = quantizer.run(onnx.load_from_string(model.SerializeToString()), _calibrated(quantizer, model, feeds))
    assert result.changes["experts_fallback"] == 0
    x_pairs = [node for node in result.model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "x"]
    # dense: the shared expert's pair plus one per routed expert; dispatch: experts read their own gathered rows
    assert len(x_pairs) == (1 + EXPERTS if form == "dense" else 1)
    assert _relative_error(_run(result.model, feeds[0]["x"]), _run(model, feeds[0]["x"])) < 0.05


def test_router_and_its_input_stay_float(moe_model: tuple[str, onnx.ModelProto]) -> None:
    _, model = moe_model
    feeds = _feeds()
    for quantize_router in (False, True):
        quantizer = MoeQuantize(min_expert_tokens=1, quantize_router=quantize_router)
        result = quantizer.run(onnx.load_from_string(model.SerializeToString()), _calibrated(quantizer, model, feeds))
        producers = {out: node for node in result.model.graph.node for out in node.output}
        router = next(node for node in result.model.graph.node if node.name == "/gate/MatMul")
        readers = [producers[name].op_type if name in producers else "input/initializer" for name in router.input]
        assert readers == (["DequantizeLinear"] * 2 if quantize_router else ["input/initializer"] * 2)
        (detail,) = [d for d in result.details if d["kind"] == "router"]
        assert detail["precision"] == ("int8" if quantize_router else "float")


@pytest.mark.parametrize("fallback", ["weight-only", "shared-scale"])
def test_expert_without_tokens_is_reported_and_falls_back(moe_model: tuple[str, onnx.ModelProto],
                                                          fallback: str) -> None:
    form, model = moe_model
    feeds = _feeds(idle_expert=2)
    quantizer = MoeQuantize(min_expert_tokens=1, expert_fallback=fallback)
    context = _calibrated(quantizer, model, feeds)
    result = quantizer.run(onnx.load_from_string(model.SerializeToString()), context)
    experts = {d["expert"]: d for d in result.details if d["kind"] == "expert"}
    assert experts[2]["tokens"] == 0 and experts[2]["activation"].startswith(f"{fallback} fallback: 0 ")
    assert experts[0]["tokens"] > 0 and experts[0]["activation"] == "calibrated on its routed tokens"
    assert result.changes["experts_fallback"] == 1 and result.changes["expert_tokens_min"] == 0
    producers = {out: node for node in result.model.graph.node for out in node.output}
    nodes = {node.name: node for node in result.model.graph.node}
    for name in experts[2]["gemms"]:
        data = producers.get(nodes[name].input[0])
        entry = "down_proj" not in name
        quantized = data is not None and data.op_type == "DequantizeLinear"
        assert quantized == (fallback == "shared-scale" and entry), name
        assert producers[nodes[name].input[1]].op_type == "DequantizeLinear"  # weights stay int8
        if quantized:
            moe_input = activation_qparams(context.calibration["x"], MoeQuantize().options)[0]
            scale = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer
                                                    if i.name == data.input[1]))
            assert scale == pytest.approx(float(moe_input))
    idle = moe_tokens(24, seed=9, idle_expert=2)
    assert _relative_error(_run(result.model, idle), _run(model, idle)) < 0.05


def test_min_expert_tokens_triggers_fallback(moe_model: tuple[str, onnx.ModelProto],
                                            caplog: pytest.LogCaptureFixture) -> None:
    _, model = moe_model
    feeds = _feeds(count=1)
    quantizer = MoeQuantize(min_expert_tokens=1000)
    result = quantizer.run(onnx.load_from_string(model.SerializeToString()), _calibrated(quantizer, model, feeds))
    assert result.changes["experts_fallback"] == EXPERTS
    assert f"{EXPERTS} experts got fewer than 1000 calibration tokens" in caplog.text
    assert "/gate/MatMul expert 2 (" in caplog.text


def test_routed_observer_checks_row_counts() -> None:
    dense = RoutedObserver(MinMaxObserver(), "t", "c", 1, select_rows=True)
    with pytest.raises(ValueError, match="expected one per token"):
        dense.observe(np.zeros((3, 4)), np.array([0, 1]))
    dispatched = RoutedObserver(MinMaxObserver(), "t", "c", 1, select_rows=False)
    with pytest.raises(ValueError, match="routed to expert 1"):
        dispatched.observe(np.zeros((3, 4)), np.array([0, 1]))
    dispatched.observe(np.zeros((0, 4)), np.array([0, 0]))  # no token for the expert: nothing observed, no error
    assert dispatched.tokens == 0 and dispatched.inner.count == 0
    top2 = RoutedObserver(MinMaxObserver(), "t", "c", 2, top_k=2, select_rows=True)
    top2.observe(np.arange(6.0).reshape(3, 2), np.array([[2, 0], [1, 0], [0, 2]]))
    assert top2.tokens == 2 and (top2.inner.min, top2.inner.max) == (0.0, 5.0)


def test_routing_agreement(moe_model: tuple[str, onnx.ModelProto], tmp_path: Path) -> None:
    _, model = moe_model
    feeds = _feeds()
    reference = tmp_path / "reference.onnx"
    onnx.save(model, reference)
    assert evaluate(reference, reference, feeds, progress=False).routing_agreement == 1.0
    perturbed = onnx.load_from_string(model.SerializeToString())
    router_weight = next(node for node in perturbed.graph.node if node.name == "/gate/MatMul").input[1]
    initializer = next(i for i in perturbed.graph.initializer if i.name == router_weight)
    weight = onnx.numpy_helper.to_array(initializer).copy()
    weight[0, 0] *= 0.5  # expert 0's logit halves: some of its tokens move
    initializer.CopyFrom(onnx.numpy_helper.from_array(weight, router_weight))
    candidate = tmp_path / "candidate.onnx"
    onnx.save(perturbed, candidate)
    tokens = [feed["x"] for feed in feeds]
    expected = np.mean(np.concatenate([np.argmax(x[:, :EXPERTS], 1) == np.argmax(x[:, :EXPERTS] @ np.diag(
        [0.5, 1.0, 1.0][:EXPERTS]), 1) for x in tokens]))
    result = evaluate(reference, candidate, feeds, progress=False)
    assert 0.0 < result.routing_agreement < 1.0
    assert result.routing_agreement == pytest.approx(expected)
    assert list(result.routing_agreement_by_layer) == ["/ArgMax_output_0"]


def test_cli_moe_w8a8_writes_routing_agreement_and_expert_counts(moe_model: tuple[str, onnx.ModelProto],
                                                                 tmp_path: Path) -> None:
    from onnxsmith.optimizer.cli import main

    _, model = moe_model
    source = tmp_path / "moe.onnx"
    onnx.save(model, source)
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, feed in enumerate(_feeds(count=6)):
        np.savez(folder / f"{index}.npz", **feed)
    report = tmp_path / "report"
    assert main([str(source), "--recipe", "moe-w8a8", "--calib", str(folder), "--min-expert-tokens", "8",
                 "--kv-cache", "int8", "-o", str(tmp_path / "out.onnx"), "--report", str(report), "--evaluate",
                 "-q"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert 0.5 <= data["evaluation"]["routing_agreement"] <= 1.0
    records = {record["name"]: record for record in data["passes"]}
    assert records["kv-cache-qdq"]["changes"]["kv_tensors_quantized"] == 0  # no attention in this graph
    experts = [d for d in records["moe-qdq"]["details"] if d["kind"] == "expert"]
    assert sorted(d["expert"] for d in experts) == list(range(EXPERTS))
    assert sum(d["tokens"] for d in experts) == 6 * 24
    assert "routing agreement" in (report / "report.md").read_text()
