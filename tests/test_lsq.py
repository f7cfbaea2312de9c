"""Learned steps: the LSQ gradient, pluggable scale gradients, training, and ptq-qdq's learned INT4 forms."""

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.lsq import SCALE_GRADIENT_FUNCTIONS, block_expander, fake_quantize, train_layer, train_weight_steps
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.ptq_qdq import PtqQuantize

RNG = np.random.default_rng(11)


def lsq_autograd_formula(v, s, bits, g):
    """LSQ written with straight-through rounding and the gradient-scale trick; autograd gives LSQ's gradient."""
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s_scaled = (s - s * g).detach() + s * g
    ratio = torch.clamp(v / s_scaled, -qn, qp)
    return ((torch.round(ratio) - ratio).detach() + ratio) * s_scaled


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_gradient_equals_autograd_of_the_formula(bits):
    s0 = torch.tensor(RNG.uniform(0.05, 0.5, size=(1, 5)), dtype=torch.float64)
    ratios = np.linspace(-1.6, 1.6, 30).reshape(6, 5) * 2 ** (bits - 1) + RNG.uniform(-0.3, 0.3, size=(6, 5))
    v0 = torch.tensor(ratios) * s0
    upstream = torch.tensor(RNG.standard_normal((6, 5)), dtype=torch.float64)
    g = 1 / math.sqrt(6 * (2 ** (bits - 1) - 1))
    grads = []
    for fn in (lambda v, s: fake_quantize(v, s, bits), lambda v, s: lsq_autograd_formula(v, s, bits, g)):
        v, s = v0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        out = fn(v, s)
        (out * upstream).sum().backward()
        grads.append((out.detach(), v.grad, s.grad))
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference)
    ratio = (v0 / s0).abs()
    assert (ratio > 2 ** (bits - 1)).any() and (ratio < 2 ** (bits - 1) - 1).any()  # clipped and inside values


def test_scale_gradient_is_pluggable():
    v = torch.tensor([[0.26, -3.0, 0.9]], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    fake_quantize(v, s, 2, grad_scale=1.0, scale_gradient="clip").sum().backward()
    assert s.grad.item() == pytest.approx(-2.0 + 1.0)  # inside values add 0; -3.0 -> -Q_N = -2, 0.9 -> Q_P = 1
    calls = []

    def custom(ratio, qn, qp):
        calls.append((qn, qp))
        return torch.ones_like(ratio)

    s.grad = None
    fake_quantize(v, s, 4, grad_scale=0.5, scale_gradient=custom).sum().backward()
    assert calls == [(8, 7)] and s.grad.item() == pytest.approx(1.5)
    assert set(SCALE_GRADIENT_FUNCTIONS) >= {"lsq", "clip"}


def test_fake_quantize_rounds_half_to_even_like_quantize_linear():
    out = fake_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), 8)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0]


def constructed_layer():
    """Rows with two outlier channels and a weight with a few large entries: max-based steps are far from best."""
    x = RNG.standard_normal((256, 64)).astype(np.float32)
    x[:, [3, 17]] *= 12
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    w[RNG.integers(0, 64, 20), RNG.integers(0, 32, 20)] *= 6
    return x, w


def max_steps(w, block):
    amax = np.abs(w).reshape(-1, block, w.shape[1]).max(axis=1)
    return (amax / 7).astype(np.float32)


def test_training_lowers_the_reconstruction_error():
    x, w = constructed_layer()
    steps = max_steps(w, 32)
    expand = block_expander(32, 1, *w.shape)
    act = float(np.abs(x).max() / 7)
    result = train_layer(x, w, steps, expand, 4, act, 4, iterations=150)
    assert result.loss_after < 0.7 * result.loss_before
    assert result.weight_steps.shape == steps.shape and result.act_step != act
    gram = x.T @ x / len(x)
    weight_only = train_weight_steps(w, gram, steps, expand, 4, iterations=150)
    assert weight_only.loss_after < 0.9 * weight_only.loss_before


def test_training_keeps_the_best_steps_seen():
    x, w = constructed_layer()
    result = train_layer(x, w, max_steps(w, 32), block_expander(32, 1, *w.shape), 4, None, 8, iterations=5, lr=10.0)
    assert result.loss_after <= result.loss_before


# ------------------------------------------------------------------------------------------- ptq-qdq


def mlp():
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((96, 64)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)


def run_ptq(model, feeds, **options):
    base = dict(wbits=4, abits=4, block_size=32, rounds=0, twin=False)
    result = PassManager([PtqQuantize(**{**base, **options})]).run(model, PassContext(calibration_data=feeds,
                                                                                       progress=False))
    return result.model, result.records[-1]


def test_ptq_qdq_learned_int4_weights_run_and_improve():
    model = mlp()
    feeds = [{"x": (RNG.standard_normal((32, 64)) * np.linspace(0.1, 4, 64)).astype(np.float32)} for _ in range(4)]
    int8_store, _ = run_ptq(model, feeds)
    int4_store, record = run_ptq(model, feeds, weight_dtype="int4")
    learned, learned_record = run_ptq(model, feeds, weight_dtype="int4", learn_steps=60)
    types = {t.name: t.data_type for t in int4_store.graph.initializer}
    int4_weights = [name for name, kind in types.items() if kind == TensorProto.INT4]
    assert len(int4_weights) == 2 and all("_weight_int4" in name for name in int4_weights)
    reference = [run_session(create_session(model), f)["y"] for f in feeds]

    def outputs(candidate):
        session = create_session(candidate)
        return [run_session(session, f)["y"] for f in feeds]

    for a, b in zip(outputs(int8_store), outputs(int4_store)):
        np.testing.assert_array_equal(a, b)  # same levels, INT4 storage

    def error(candidate):
        return sum(float(np.sum((o - r) ** 2)) for o, r in zip(outputs(candidate), reference))

    assert error(learned) < error(int4_store)
    assert learned_record.changes["layers_learned"] == 2 and record.changes["layers_learned"] == 0
    layers = [d for d in learned_record.details if d["kind"] == "layer"]
    assert all(d["learned_to"] < d["learned_from"] for d in layers)


def test_ptq_qdq_block_size_falls_back_to_per_channel_where_it_does_not_divide():
    model = mlp()
    feeds = [{"x": RNG.standard_normal((8, 64)).astype(np.float32)}]
    _, record = run_ptq(model, feeds, block_size=64)  # divides fc1's 64 inputs, not fc2's 96
    grids = {d["node"]: d["grid"] for d in record.details if d["kind"] == "weight"}
    assert grids == {"fc1": "96x1", "fc2": "64x1"}


def test_int4_storage_needs_at_most_four_bits():
    with pytest.raises(ValueError, match="wbits <= 4"):
        PtqQuantize(wbits=8, weight_dtype="int4")


def test_ptq_qdq_gptq_rounding_lowers_the_output_error():
    model = mlp()
    rng = np.random.default_rng(5)
    mixing = rng.standard_normal((64, 64)).astype(np.float32) / 4 + np.eye(64, dtype=np.float32)
    feeds = [{"x": rng.standard_normal((64, 64)).astype(np.float32) @ mixing} for _ in range(4)]
    nearest, _ = run_ptq(model, feeds, abits=8, weight_dtype="int4")
    gptq, record = run_ptq(model, feeds, abits=8, weight_dtype="int4", rounding="gptq")
    reference = [run_session(create_session(model), f)["y"] for f in feeds]

    def error(candidate):
        session = create_session(candidate)
        return sum(float(np.sum((run_session(session, f)["y"] - r) ** 2)) for f, r in zip(feeds, reference))

    assert error(gptq) < error(nearest)
    weights = [d for d in record.details if d["kind"] == "weight"]
    assert [d["rounding"] for d in weights] == ["gptq", "gptq"] and all(np.isfinite(d["sqnr_db"]) for d in weights)
