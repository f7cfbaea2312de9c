"""ptq-qdq: k-bit QDQ semantics, per-layer placement, twin forms, gradient collection and the searches' choices."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.gradients import collect_gradients
from onnxsmith.calibration.learning import resolve_loss
from onnxsmith.calibration.observers import SampleObserver
from onnxsmith.calibration.scale_search import (
    TwinActQuantizer,
    UniformActQuantizer,
    search_activation_matmul,
    uniform_fake_quantize,
)
from onnxsmith.calibration.twin_uniform import initial_delta
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.passes.ptq_qdq import PtqQuantize
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.core.graph import import_graph
from onnxsmith.passes.ptq_qdq import _as_gemm

FAST = dict(n=20)


def feeds_for(shape, count=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(count)]


def quantize(model, feeds, **options):
    result = PassManager([ShapeInference(), PtqQuantize(**options)]).run(model, PassContext(calibration_data=feeds))
    return result.model, result.records[-1]


def run(model, feed):
    return run_session(create_session(model, optimize=False), feed)["y"]


def single_matmul(k=16, n=8):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return model, w


@pytest.mark.parametrize("wbits, abits, act_dtype", [(4, 6, "uint8"), (8, 8, "int8"), (6, 4, "int8"), (5, 8, "uint8")])
def test_k_bit_qdq_equals_the_numpy_reference(wbits, abits, act_dtype):
    model, w = single_matmul()
    feeds = feeds_for((32, 16), count=2)
    quantized, _ = quantize(model, feeds, wbits=wbits, abits=abits, act_dtype=act_dtype, rounds=0)
    x_all = np.concatenate([f["x"] for f in feeds])
    w_scale = np.asarray([initial_delta(a, wbits) for a in np.abs(w).max(axis=0)], np.float32)
    a_scale = np.float32(initial_delta(float(np.abs(x_all).max()), abits))
    w_hat = uniform_fake_quantize(w, w_scale, wbits, axis=1)
    assert len(np.unique(np.rint(w_hat / w_scale))) <= 2**wbits
    for feed in feeds:
        expected = uniform_fake_quantize(feed["x"], a_scale, abits) @ w_hat
        np.testing.assert_allclose(run(quantized, feed), expected, rtol=1e-5, atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert inits["fc_weight_int8"].dtype == np.int8
    assert inits["fc_weight_int8"].min() >= -(2 ** (wbits - 1)) and inits["fc_weight_int8"].max() <= 2 ** (wbits - 1) - 1
    assert inits["fc_input0_zero_point"].dtype == (np.uint8 if act_dtype == "uint8" else np.int8)
    assert any(n.op_type == "Clip" for n in quantized.graph.node) == (abits < 8)


def test_uint8_and_int8_activations_give_identical_outputs():
    feeds = feeds_for((2, 6, 16))
    outputs = [run(quantize(graphs.attention_block(), feeds, act_dtype=d, rounds=1, **FAST)[0], feeds[0])
               for d in ("uint8", "int8")]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_every_layer_gets_its_own_activation_qdq():
    feeds = feeds_for((2, 6, 16))
    quantized, record = quantize(graphs.attention_block(), feeds, rounds=1, **FAST)
    assert record.changes["layers_quantized"] == 6  # q, k, v, scores, context, o
    assert record.changes["layers_searched"] == 6
    x_readers = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    assert sorted(n.name for n in x_readers) == [f"{p}_proj_input0_QuantizeLinear" for p in "kqv"]
    scales = {t.name for t in quantized.graph.initializer if t.name.endswith("_scale") and "_input" in t.name}
    assert scales == {f"{p}_proj_input0_scale" for p in "qkvo"} | {f"{n}_input{i}_scale" for n in ("scores", "context")
                                                                   for i in (0, 1)}


@pytest.mark.parametrize("graph_name, twin_kind", [("attention_block", "twin-softmax"), ("matmul_add_gelu", "twin-gelu")])
@pytest.mark.parametrize("metric", ["cosine", "hessian"])
def test_dual_gemm_equals_fake_quant_and_twin_is_used(graph_name, twin_kind, metric):
    build = getattr(graphs, graph_name)
    feeds = feeds_for((2, 6, 16) if graph_name == "attention_block" else (2, 5, 16), scale=2.0)
    results = {form: quantize(build(), feeds, twin=True, twin_form=form, metric=metric, rounds=1, **FAST)
               for form in ("fake-quant", "dual-gemm")}
    details = results["fake-quant"][1].details
    assert [d["dtype"] for d in details if str(d.get("dtype", "")).startswith("twin")] == [twin_kind]
    assert sum(n.name.endswith("_parts_sum") for n in results["dual-gemm"][0].graph.node) == 1
    outputs = {form: run(model, feeds[0]) for form, (model, _) in results.items()}
    np.testing.assert_allclose(outputs["dual-gemm"], outputs["fake-quant"], atol=1e-4, rtol=1e-4)
    reference = run(build(), feeds[0])
    assert not np.allclose(outputs["fake-quant"], reference, atol=1e-6)  # it did quantize


def test_search_lowers_the_output_error_against_max_based_steps():
    model, _ = single_matmul(k=64, n=32)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_t(2, (64, 64)).astype(np.float32)} for _ in range(3)]  # heavy tails: clipping pays
    errors = {}
    for rounds in (0, 3):
        quantized, _ = quantize(model, feeds, wbits=4, abits=4, metric="mse", rounds=rounds)
        errors[rounds] = sum(float(np.mean((run(quantized, f) - run(model, f)) ** 2)) for f in feeds)
    assert errors[3] < 0.8 * errors[0]


def test_conv_is_searched_as_its_im2col_gemm():
    feeds = feeds_for((2, 3, 8, 8), count=2)
    cleaned = PassManager(load_recipe("cleanup").build()).run(graphs.conv_bn_relu(), PassContext()).model
    layers, _ = PtqQuantize().layers(import_graph(cleaned))
    assert [layer.node.op for layer in layers] == ["Conv", "Conv"]
    first = layers[0]
    output = first.node.outputs[0].name
    x, w, _ = _as_gemm(first, [f["x"] for f in feeds], None)
    sliced = onnx.utils.Extractor(cleaned).extract_model(["x"], [output])
    expected = np.concatenate([np.moveaxis(run_session(create_session(sliced, optimize=False), f)[output], 1, -1)
                               .reshape(-1, w.shape[1]) for f in feeds])
    np.testing.assert_allclose(x @ w + first.node.inputs[2].values, expected, rtol=1e-4, atol=1e-4)
    _, record = quantize(cleaned, feeds, rounds=1, **FAST)
    assert record.changes["layers_searched"] == 2


def test_search_rows_are_drawn_evenly_from_every_sample_and_match_the_gradient_rows():
    feeds = feeds_for((2, 3, 8, 8), count=3)  # 2 x 64 output positions per sample
    cleaned = PassManager(load_recipe("cleanup").build()).run(graphs.conv_bn_relu(), PassContext()).model
    first = PtqQuantize().layers(import_graph(cleaned))[0][0]
    samples = [f["x"] for f in feeds]
    grads = [np.arange(2 * 8 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 8) + 1000 * i for i in range(3)]
    x_all, w, g_all = _as_gemm(first, samples, grads)
    assert len(x_all) == len(g_all) == 3 * 128
    x, w_sub, g = _as_gemm(first, samples, grads, max_rows=60)
    np.testing.assert_array_equal(w_sub, w)
    assert len(x) == len(g) == 60  # 20 per sample
    picked = [int(np.flatnonzero((x_all == row).all(axis=1))[0]) for row in x]
    assert [p // 128 for p in picked] == [0] * 20 + [1] * 20 + [2] * 20
    np.testing.assert_array_equal(g, g_all[picked])
    assert _as_gemm(first, samples, grads, max_rows=10_000)[0].shape == x_all.shape


def test_hessian_gradients_match_torch_autograd_and_are_nonzero():
    model = graphs.matmul_add_gelu()
    feeds = feeds_for((2, 5, 16), count=2)
    observers = {name: SampleObserver(name=name) for name in ("h", "o")}
    collect_gradients(model, observers, feeds, loss="pseudo-label", progress=False)
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    for index, feed in enumerate(feeds):
        x = torch.from_numpy(feed["x"])
        h = (x @ inits["w1"]).requires_grad_(True)
        g = torch.nn.functional.gelu(h + inits["b1"])
        o = (g @ inits["w2"]).requires_grad_(True)
        o.retain_grad()
        logits = (o + inits["b2"]).reshape(-1, 8)
        torch.nn.functional.cross_entropy(logits, logits.detach().argmax(-1)).backward()
        for name, tensor in (("h", h), ("o", o)):
            got = observers[name].samples[index]
            np.testing.assert_allclose(got, tensor.grad.numpy(), rtol=1e-4, atol=1e-6)
            assert np.abs(got).max() > 0


def test_contrastive_loss_has_nonzero_gradient_at_the_fp_model_and_auto_reads_the_task():
    model = graphs.matmul_add_gelu()
    assert resolve_loss(model, "auto") == "pseudo-label"
    onnx.helper.set_model_props(model, {"onnxsmith.task": "embedding"})
    assert resolve_loss(model, "auto") == "contrastive"
    feeds = feeds_for((1, 5, 16), count=3)
    observers = {"o": SampleObserver(name="o")}
    collect_gradients(model, observers, feeds, loss="auto", progress=False)
    assert all(np.abs(s).max() > 0 for s in observers["o"].samples)


def test_gradient_request_only_for_the_hessian_metric():
    model = onnx.shape_inference.infer_shapes(graphs.matmul_add_gelu())
    assert PtqQuantize(metric="cosine").gradient_request(model) is None
    request = PtqQuantize(metric="hessian", loss="contrastive").gradient_request(model)
    assert sorted(request.observers) == ["h", "o"] and request.loss == "contrastive"


def test_hessian_search_without_gradients_falls_back_to_cosine_and_says_why(monkeypatch):
    import onnxsmith.calibration.gradients as gradients

    def unsupported(*args, **kwargs):
        raise NotImplementedError("TorchGraph does not support op ai.onnx::Mish (node 'm')")

    monkeypatch.setattr(gradients, "collect_gradients", unsupported)
    model = graphs.matmul_add_gelu()
    feeds = feeds_for((2, 5, 16), count=2)
    quantized, record = quantize(model, feeds, metric="hessian", rounds=1, n=10)
    assert record.changes["metric"] == "cosine" and record.changes["metric_fallback"] == "hessian -> cosine"
    assert {"kind": "fallback", "reason": "hessian metric needs gradients, which are unavailable: TorchGraph does "
            "not support op ai.onnx::Mish (node 'm')"} in record.details
    assert record.changes["layers_searched"] > 0
    assert all(d["metric"] == "cosine" for d in record.details if d.get("kind") == "layer")
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)


def test_activation_matmul_search_picks_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    a = [rng.standard_t(3, (2, 6, 6)).astype(np.float32) for _ in range(3)]
    b = [rng.standard_normal((2, 6, 4)).astype(np.float32) for _ in range(3)]
    result = search_activation_matmul(a, b, bits=4, metric="mse", rounds=1, n=30)
    qa, qb = UniformActQuantizer(4), UniformActQuantizer(4)
    step_a, grid_a = qa.steps(np.concatenate([x.ravel() for x in a]), 0.01, 1.2, 30)
    step_b, _ = qb.steps(np.concatenate([x.ravel() for x in b]), 0.01, 1.2, 30)

    def error(sa, sb):
        return sum(float(np.sum((qa.fake_quantize(x, sa) @ qb.fake_quantize(y, sb) - x @ y) ** 2)) for x, y in zip(a, b))

    candidates = np.concatenate([[step_a], grid_a])
    best_a = float(candidates[int(np.argmin([error(float(s), step_b) for s in candidates]))])
    assert result.a_scale == pytest.approx(best_a)
    assert result.history == sorted(result.history, reverse=True)
    assert result.history[-1] < result.history[0]


def test_activation_matmul_search_twin_softmax_and_hessian_weighting():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 8, 8)) * 3
    probs = [(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)]
    v = [rng.standard_normal((4, 8, 5)).astype(np.float32)]
    twin = TwinActQuantizer("softmax", 6)
    result = search_activation_matmul(probs, v, bits=6, metric="hessian", G=[np.ones((4, 8, 5))],
                                      quantizers=(twin, UniformActQuantizer(6)), rounds=2, n=10)
    assert result.a_scale.layout == "softmax" and result.a_scale.bits == 6
    mse = search_activation_matmul(probs, v, bits=6, metric="mse", quantizers=(twin, UniformActQuantizer(6)),
                                   rounds=2, n=10)
    assert result.a_scale == mse.a_scale and result.b_scale == mse.b_scale  # G = 1: hessian is mse
    with pytest.raises(ValueError, match="hessian"):
        search_activation_matmul(probs, v, bits=6, metric="hessian")


@pytest.mark.parametrize("options, message", [
    (dict(wbits=3), "wbits"), (dict(abits=9), "abits"), (dict(metric="l1"), "metric"),
    (dict(twin_form="x"), "twin_form"), (dict(loss="kl"), "loss"), (dict(rounds=-1), "rounds"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        PtqQuantize(**options)


@pytest.mark.parametrize("recipe, metric, twin", [("base-ptq", "cosine", False), ("ptq4vit", "hessian", True)])
def test_recipes_take_bit_widths(recipe, metric, twin):
    passes = load_recipe(recipe).build({"wbits": 6, "abits": 5})
    ptq = passes[-1]
    assert (ptq.name, ptq.options.wbits, ptq.options.abits, ptq.options.metric, ptq.options.twin) == ("ptq-qdq", 6, 5, metric, twin)


def test_activation_matmul_search_accepts_samples_of_different_lengths():
    rng = np.random.default_rng(2)
    q = [rng.standard_normal((2, t, 4)).astype(np.float32) for t in (3, 7)]
    kt = [rng.standard_normal((2, 4, t)).astype(np.float32) for t in (3, 7)]
    grads = [rng.standard_normal((2, t, t)) for t in (3, 7)]
    for metric in ("mse", "cosine", "hessian"):
        result = search_activation_matmul(q, kt, bits=5, metric=metric, G=grads, rounds=1, n=8)
        assert result.history[-1] <= result.history[0]


def test_layout_without_a_gemm_form_keeps_max_based_steps():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_UPPER")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    quantized, record = quantize(model, feeds_for((2, 3, 6, 6), count=2), wbits=6, rounds=1, **FAST)
    assert record.changes["layers_searched"] == 0
    layer = next(d for d in record.details if d.get("kind") == "layer")
    assert layer["searched"] is False
    scale = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}["conv_weight_scale"]
    expected = [initial_delta(float(a), 6) for a in np.abs(w).reshape(4, -1).max(axis=1)]
    np.testing.assert_allclose(scale, expected, rtol=1e-6)


@pytest.mark.parametrize("act_groups", [1, 2])
def test_an_all_zero_activation_is_quantized_not_refused(act_groups):
    """Regression (found by test_fuzz_passes): a layer input that is 0 on every calibration feed (a dead ReLU)
    made the step search raise 'x_absmax must be finite and > 0'; every step is exact there, so the one candidate
    is the smallest normal step (as for int8-qdq's all-zero ranges)."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("Abs", ["x"], ["a"], name="abs"),
         helper.make_node("Neg", ["a"], ["n"], name="neg"),
         helper.make_node("Relu", ["n"], ["dead"], name="relu"),
         helper.make_node("MatMul", ["dead", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    quantized, record = quantize(model, feeds_for((2, 4)), rounds=1, act_groups=act_groups, **FAST)
    assert record.modified
    out = run(quantized, feeds_for((2, 4), count=1, seed=5)[0])
    assert np.array_equal(out, np.zeros((2, 3), np.float32))
