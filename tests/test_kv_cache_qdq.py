"""KV-cache QDQ: placement at the producer, once per stored tensor, shared by every consumer layer (CLA)."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moe_graphs import HEAD_DIM, KV_HEADS, cla_feed, export_cached_cla
from onnxsmith.calibration.collection import collect
from onnxsmith.core.pass_base import PassContext
from onnxsmith.core.graph import import_graph
from onnxsmith.passes.kv_cache_qdq import KvCacheQuantize
from onnxsmith.analysis.kv_patterns import find_stored_kv, trace_path


@pytest.fixture(scope="module")
def cla_model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    return onnx.load(export_cached_cla(tmp_path_factory.mktemp("cla") / "model.onnx"))


def _quantized(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, list[dict]]:
    quantizer = KvCacheQuantize(**options)
    feeds = [cla_feed(6, 0, seed=i) for i in range(4)]
    context = PassContext(calibration_data=feeds, progress=False)
    context.calibration = collect(model, quantizer.calibration_request(model), feeds, progress=False)
    result = quantizer.run(onnx.load_from_string(model.SerializeToString()), context)
    return result.model, result.details


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y", "present_key", "present_value"], feed)


def test_finds_each_stored_tensor_once_with_both_cla_consumers(cla_model: onnx.ModelProto) -> None:
    stored = find_stored_kv(import_graph(cla_model))
    assert [(entry.kind, entry.past, entry.present) for entry in stored] == [
        ("key", "past_key", "present_key"), ("value", "past_value", "present_value")]
    for entry in stored:
        assert len(entry.consumers) == 2  # layer 0 and the layer that reuses its K/V
        assert entry.tensor.inputs[0].op == "Transpose"  # new tokens' heads, before the Concat with the past


@pytest.mark.parametrize("granularity", ["per-tensor", "per-head"])
def test_one_qdq_per_stored_tensor_read_by_every_consumer(cla_model: onnx.ModelProto, granularity: str) -> None:
    quantized, details = _quantized(cla_model, granularity=granularity)
    pairs = [node for node in quantized.graph.node if node.op_type == "QuantizeLinear"]
    stored = {entry.tensor.name for entry in find_stored_kv(import_graph(cla_model))}
    assert sorted(node.input[0] for node in pairs) == sorted(stored)  # every stored K/V exactly once
    graph = import_graph(quantized)
    nodes = {node.name: node for node in graph.nodes}
    graph_inputs = {tensor.name for tensor in graph.inputs}
    for detail in details:
        assert detail["validated_consumers"] == 2
        for name in detail["consumers"]:  # both consumers reach the same DequantizeLinear output
            assert detail["qdq"] in [t.name for t in trace_path(nodes[name].inputs[1], graph_inputs)]
        scale = np.asarray(detail["scale"])
        assert scale.shape == ((KV_HEADS,) if granularity == "per-head" else ())
    for node in pairs:
        axis = [a.i for a in node.attribute if a.name == "axis"]
        assert axis == ([1] if granularity == "per-head" else [])


def test_cache_holds_int8_grid_values_and_past_passes_through(cla_model: onnx.ModelProto) -> None:
    quantized, details = _quantized(cla_model)
    scales = {detail["present"]: float(detail["scale"]) for detail in details}
    feed = cla_feed(3, 5, seed=7)
    y, present_key, present_value = _run(quantized, feed)
    for name, present, past in (("present_key", present_key, feed["past_key"]),
                                ("present_value", present_value, feed["past_value"])):
        assert present.shape == (1, KV_HEADS, 8, HEAD_DIM)
        np.testing.assert_array_equal(present[:, :, :5], past)  # the past is not quantized again
        levels = present[:, :, 5:] / scales[name]
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert np.abs(levels).max() <= 127
    reference = _run(cla_model, feed)[0]
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 0.02


def test_zero_length_past_and_off_switch(cla_model: onnx.ModelProto) -> None:
    quantized, _ = _quantized(cla_model)
    y, present_key, _ = _run(quantized, cla_feed(4, 0))
    assert y.shape == (1, 4, 8) and present_key.shape == (1, KV_HEADS, 4, HEAD_DIM)
    result = KvCacheQuantize(kv_cache="none").run(cla_model, PassContext())
    assert not result.modified and result.model is cla_model


def test_graph_without_attention_has_no_stored_kv() -> None:
    from graphs import matmul_add_gelu

    assert find_stored_kv(import_graph(matmul_add_gelu())) == []


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="kv_cache"):
        KvCacheQuantize(kv_cache="fp8")
    with pytest.raises(ValueError, match="granularity"):
        KvCacheQuantize(granularity="per-token")


def test_input_model_is_not_modified(cla_model: onnx.ModelProto) -> None:
    before = cla_model.SerializeToString()
    _quantized(cla_model)
    assert cla_model.SerializeToString() == before
