"""reorder-channels: function-preserving channel permutations, verified by the pass manager and compared here."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.blocks import GridSpec
from onnxsmith.calibration.channel_order import STRATEGIES, GemmWeight, choose_permutation
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.optimizer.registry import PASSES
from onnxsmith.passes.reorder_channels import ReorderChannels
from onnxsmith.passes.shape_inference import ShapeInference

GRID = "4x4"


def channel_scales(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Per-channel ranges alternating large and small, so every quantization block mixes both until reordered."""
    return np.where(np.arange(channels) % 2 == 0, 4.0, 0.25).astype(np.float32) * rng.uniform(0.9, 1.1, channels)


def weight(rng, shape, name, scale_axis=None, scales=None):
    values = rng.standard_normal(shape).astype(np.float32)
    if scale_axis is not None:
        values *= scales.reshape([-1 if a == scale_axis else 1 for a in range(len(shape))])
    return numpy_helper.from_array(values, name)


def scalar(value, name):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_bn_relu_conv():
    rng = np.random.default_rng(1)
    scales = channel_scales(rng, 8)
    inits = [weight(rng, (8, 3, 3, 3), "w1", 0, scales), weight(rng, (8,), "b1", 0, scales),
             weight(rng, (4, 8, 3, 3), "w2", 1, scales[::-1].copy()), weight(rng, (4,), "b2")]
    inits += graphs.batchnorm_parameters(rng, "bn", 8)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"], name="bn"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits)


def conv_depthwise_conv():
    rng = np.random.default_rng(2)
    scales = channel_scales(rng, 8)
    inits = [weight(rng, (8, 3, 3, 3), "w1", 0, scales), weight(rng, (8,), "b1"),
             weight(rng, (8, 1, 3, 3), "wd"), weight(rng, (8,), "bd"), weight(rng, (4, 8, 1, 1), "w3", 1, scales)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "wd", "bd"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w3"], ["y"], name="conv3"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits)


def mlp_gelu():
    """graphs.matmul_add_gelu with its 32 hidden channels alternately wide and narrow (fc1 columns, fc2 rows)."""
    model = graphs.matmul_add_gelu()
    scales = channel_scales(np.random.default_rng(3), 32)
    for index, init in enumerate(model.graph.initializer):
        if init.name in ("w1", "w2"):
            values = numpy_helper.to_array(init) * (scales[None] if init.name == "w1" else scales[:, None])
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    return model


def swiglu_mlp():
    rng = np.random.default_rng(4)
    scales = channel_scales(rng, 32)
    inits = [weight(rng, (16, 32), "wg", 1, scales), weight(rng, (16, 32), "wu", 1, scales[::-1].copy()),
             weight(rng, (32, 16), "wd", 0, scales)]
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["x", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["h"], name="gated"),
        helper.make_node("MatMul", ["h", "wd"], ["y"], name="down_proj"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", "S", 16])], [tensor("y", ["N", "S", 16])], inits)


HEADS, HEAD_DIM = 2, 8


def multi_head_attention():
    """x[N,S,16] -> 2 heads of 8: softmax(q k^T) v, merged (to a shape computed from Shape), O-proj; V-proj has
    a bias."""
    rng = np.random.default_rng(5)
    hidden = HEADS * HEAD_DIM
    scales = channel_scales(rng, hidden)
    inits = [weight(rng, (hidden, hidden), f"w{n}") for n in "qk"]
    inits += [weight(rng, (hidden, hidden), "wv", 1, scales), weight(rng, (hidden,), "bv"),
              weight(rng, (hidden, hidden), "wo", 0, scales), weight(rng, (hidden,), "bo"),
              numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "split"),
              numpy_helper.from_array(np.array([hidden], np.int64), "hidden")]
    nodes = [helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
             helper.make_node("Add", ["v0", "bv"], ["v"], name="v_bias")]
    nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}0"], name=f"{name}_proj") for name in "qk"]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        source = name if name == "v" else f"{name}0"
        nodes += [helper.make_node("Reshape", [source, "split"], [f"{name}4"], name=f"{name}_split"),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], name=f"{name}_heads", perm=perm)]
    nodes += [
        helper.make_node("MatMul", ["qh", "kh"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["ctx"], name="context"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["ctx_t"], ["ctx_shape"], name="ctx_shape", end=2),
        helper.make_node("Concat", ["ctx_shape", "hidden"], ["merge_shape"], name="merge_shape", axis=0),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge"),
        helper.make_node("MatMul", ["merged", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["y"], name="o_bias"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", "S", hidden])], [tensor("y", ["N", "S", hidden])], inits)


def residual_pair():
    """x[N,16] -> a = x W1, b = Relu(x W2) -> Relu(a + b) -> W3 -> y."""
    rng = np.random.default_rng(6)
    scales = channel_scales(rng, 12)
    inits = [weight(rng, (16, 12), "w1", 1, scales), weight(rng, (16, 12), "w2", 1, scales),
             weight(rng, (12, 6), "w3", 0, scales)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="left"),
        helper.make_node("MatMul", ["x", "w2"], ["b0"], name="right"),
        helper.make_node("Relu", ["b0"], ["b"], name="right_relu"),
        helper.make_node("Add", ["a", "b"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w3"], ["y"], name="out"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 6])], inits)


def two_layers(middle, extra_inits=(), extra_outputs=()):
    """x[N,16] -> MatMul W1 [16,12] -> ``middle`` nodes (``h`` -> ``m``) -> MatMul W2 [12,6] -> y."""
    rng = np.random.default_rng(7)
    scales = channel_scales(rng, 12)
    inits = [weight(rng, (16, 12), "w1", 1, scales), weight(rng, (12, 6), "w2", 0, scales), *extra_inits]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), *middle,
             helper.make_node("MatMul", ["m", "w2"], ["y"], name="fc2")]
    outputs = [tensor("y", ["N", 6]), *extra_outputs]
    return graphs.make_model(nodes, [tensor("x", ["N", 16])], outputs, inits)


def reaching_graph_output():
    return two_layers([helper.make_node("Relu", ["h"], ["m"], name="relu")], extra_outputs=[tensor("m", ["N", 12])])


def through_layernorm():
    params = [numpy_helper.from_array(np.ones(12, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(12, np.float32), "beta")]
    return two_layers([helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["m"], name="ln", axis=-1)],
                      params)


def through_concat():
    rng = np.random.default_rng(8)
    inits = [weight(rng, (16, 6), "wa"), weight(rng, (16, 6), "wb"), weight(rng, (12, 6), "w2")]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="fa"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="fb"),
        helper.make_node("Concat", ["a", "b"], ["m"], name="concat", axis=-1),
        helper.make_node("MatMul", ["m", "w2"], ["y"], name="fc2"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 6])], inits)


def residual_with_graph_input():
    rng = np.random.default_rng(9)
    inits = [weight(rng, (16, 16), "w1", 1, channel_scales(rng, 16)), weight(rng, (16, 6), "w2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "x"], ["m"], name="residual"),
        helper.make_node("MatMul", ["m", "w2"], ["y"], name="fc2"),
    ]
    return graphs.make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 6])], inits)


def feeds(model, count=2):
    rng = np.random.default_rng(11)
    result = []
    for _ in range(count):
        feed = {}
        for graph_input in model.graph.input:
            dims = [d.dim_value or 3 for d in graph_input.type.tensor_type.shape.dim]
            feed[graph_input.name] = rng.standard_normal(dims).astype(np.float32)
        result.append(feed)
    return result


def copy(model):
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def run_pass(model, **options):
    """Shape inference then reorder-channels through the manager (which verifies it); returns (model, record)."""
    probes = feeds(model)
    result = PassManager([ShapeInference(symbolic=True), ReorderChannels(**options)], probe_feeds=probes).run(copy(model))
    record = result.records[-1]
    assert record.name == "reorder-channels"
    for feed in probes:
        expected = run_session(create_session(model, optimize=False), feed)
        actual = run_session(create_session(result.model, optimize=False), feed)
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5 * float(np.abs(value).max()))
    return result.model, record


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def raw_initializers(model):
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def weight_of(model, node_name, index=1):
    node = next(n for n in model.graph.node if n.name == node_name)
    return initializers(model)[node.input[index]]


def recovered_permutation(old, new, axis):
    """The ``p`` with ``new`` = ``old`` taken at ``p`` along ``axis`` (fails when there is none)."""
    old_slices = [np.take(old, j, axis=axis) for j in range(old.shape[axis])]
    permutation = []
    for i in range(new.shape[axis]):
        matches = [j for j, s in enumerate(old_slices) if np.array_equal(np.take(new, i, axis=axis), s)]
        assert len(matches) == 1, f"slice {i} of the new weight is not one slice of the old one"
        permutation.append(matches[0])
    assert sorted(permutation) == list(range(len(permutation)))
    return np.array(permutation)


def assert_reordered(record, regions=1):
    reordered = [d for d in record.details if d["kind"] == "reordered"]
    assert record.changes["regions_reordered"] == regions == len(reordered), record.details
    assert record.verification is not None and record.verification["within_tolerance"]
    assert all(d["error_after"] < d["error_before"] for d in reordered)
    return reordered


def assert_not_identity(permutation):
    assert not np.array_equal(permutation, np.arange(len(permutation)))


def test_conv_bn_relu_conv_is_reordered():
    model = conv_bn_relu_conv()
    after, record = run_pass(model, weight_grid=GRID)
    detail, = assert_reordered(record)
    assert detail["producers"] == ["conv1"] and detail["consumers"] == ["conv2"] and detail["channels"] == 8
    p = recovered_permutation(weight_of(model, "conv1"), weight_of(after, "conv1"), 0)
    assert_not_identity(p)
    np.testing.assert_array_equal(weight_of(after, "conv2"), weight_of(model, "conv2")[:, p])
    np.testing.assert_array_equal(weight_of(after, "bn", 3), weight_of(model, "bn", 3)[p])


def test_conv_depthwise_conv_is_reordered():
    model = conv_depthwise_conv()
    after, record = run_pass(model, weight_grid=GRID)
    assert_reordered(record)
    p = recovered_permutation(weight_of(model, "conv1"), weight_of(after, "conv1"), 0)
    assert_not_identity(p)
    np.testing.assert_array_equal(weight_of(after, "depthwise"), weight_of(model, "depthwise")[p])
    np.testing.assert_array_equal(weight_of(after, "depthwise", 2), weight_of(model, "depthwise", 2)[p])


def test_mlp_with_erf_gelu_is_reordered():
    model = mlp_gelu()
    after, record = run_pass(model, weight_grid=GRID)
    detail, = assert_reordered(record)
    assert detail["producers"] == ["fc1"] and detail["consumers"] == ["fc2"]
    p = recovered_permutation(weight_of(model, "fc1"), weight_of(after, "fc1"), 1)
    assert_not_identity(p)
    np.testing.assert_array_equal(weight_of(after, "fc2"), weight_of(model, "fc2")[p])
    np.testing.assert_array_equal(weight_of(after, "fc1_bias"), weight_of(model, "fc1_bias")[p])


@pytest.mark.parametrize("build, producers, consumers", [
    (swiglu_mlp, ["gate_proj", "up_proj"], ["down_proj"]),  # silu(gate) * up
    (residual_pair, ["left", "right"], None),  # Add of two producers
])
def test_two_producers_joined_in_the_region_share_one_permutation(build, producers, consumers):
    model = build()
    after, record = run_pass(model, weight_grid=GRID)
    detail, = assert_reordered(record)
    assert sorted(detail["producers"]) == producers
    if consumers is not None:
        assert detail["consumers"] == consumers
    first, second = (recovered_permutation(weight_of(model, name), weight_of(after, name), 1) for name in producers)
    assert_not_identity(first)
    np.testing.assert_array_equal(first, second)


def test_attention_values_are_reordered_within_heads():
    model = multi_head_attention()
    after, record = run_pass(model, weight_grid=GRID)
    detail, = assert_reordered(record)
    assert detail["producers"] == ["v_proj"] and detail["consumers"] == ["o_proj"]
    assert detail["group"] == HEAD_DIM
    skipped = [d for d in record.details if d["kind"] == "skipped"]
    reasons = {d["producers"][0]: d["reason"] for d in skipped}
    assert reasons["q_proj"] == "reaches MatMul 'scores' whose weight is not constant"
    assert reasons["k_proj"] == "reaches MatMul 'scores' on its contracted axis"
    p = recovered_permutation(weight_of(model, "v_proj"), weight_of(after, "v_proj"), 1)
    assert_not_identity(p)
    np.testing.assert_array_equal(p // HEAD_DIM, np.arange(len(p)) // HEAD_DIM)
    np.testing.assert_array_equal(weight_of(after, "o_proj"), weight_of(model, "o_proj")[p])


def test_a_constant_shared_outside_the_region_gets_a_permuted_copy():
    model = mlp_gelu()
    model.graph.node.append(helper.make_node("Mul", ["b1", "b1"], ["extra"], name="outside_user"))
    model.graph.output.append(tensor("extra", [32]))
    after, record = run_pass(model, weight_grid=GRID)
    assert_reordered(record)
    np.testing.assert_array_equal(weight_of(after, "outside_user", 0), initializers(model)["b1"])
    assert weight_of(after, "fc1_bias").tolist() != initializers(model)["b1"].tolist()


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (reaching_graph_output, "reaches graph output 'm'"),
        (through_layernorm, "reaches LayerNormalization 'ln'"),
        (through_concat, "reaches Concat 'concat'"),
        (residual_with_graph_input, "reaches graph input 'x'"),
    ],
)
def test_refused_regions_leave_the_model_unchanged(build, reason):
    model = build()
    after, record = run_pass(model, weight_grid=GRID)
    assert not record.modified and record.changes["regions_reordered"] == 0
    assert record.changes["regions_skipped"] == record.changes["regions"] >= 1
    assert any(reason in d["reason"] for d in record.details), record.details
    assert raw_initializers(after) == raw_initializers(model)


def test_an_identity_choice_is_not_rewritten():
    model = mlp_gelu()
    after, record = run_pass(model)  # per-channel: no permutation changes the objective
    assert not record.modified and record.details[0]["kind"] == "identity"
    assert raw_initializers(after) == raw_initializers(model)


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "random"}, "strategy"), ({"weight_grid": "4y4"}, "grid"), ({"wbits": 3}, "wbits"),
])
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ReorderChannels(**options)


def test_the_pass_is_registered():
    assert PASSES["reorder-channels"] is ReorderChannels
    assert ReorderChannels.lossless and not ReorderChannels.needs_calibration


def region_weights(seed=0, channels=16):
    rng = np.random.default_rng(seed)
    scales = channel_scales(rng, channels)
    producers = [rng.standard_normal((12, channels)) * scales, rng.standard_normal((8, channels)) * scales]
    consumers = [GemmWeight(rng.standard_normal((channels * 9, 5)) * np.repeat(scales, 9)[:, None], 9)]
    return producers, consumers


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("group", [None, 4])
def test_every_strategy_gives_a_permutation_within_groups(strategy, group):
    producers, consumers = region_weights()
    choice = choose_permutation(producers, consumers, GridSpec.parse("4x4"), 4, strategy, group)
    p = choice.permutation
    assert sorted(p.tolist()) == list(range(16))
    if group is not None:
        np.testing.assert_array_equal(p // group, np.arange(16) // group)
    if strategy != "auto":
        assert choice.strategy == strategy
        assert_not_identity(p)


@pytest.mark.parametrize("grid", ["per-channel", "per-tensor", "4x1", "allx4", "2x2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_never_does_worse_than_the_identity(grid, seed):
    producers, consumers = region_weights(seed)
    choice = choose_permutation(producers, consumers, GridSpec.parse(grid), 4)
    assert choice.error_after <= choice.error_before
    if choice.strategy == "identity":
        np.testing.assert_array_equal(choice.permutation, np.arange(16))


def test_producer_range_groups_interleaved_ranges():
    rng = np.random.default_rng(0)
    ranges = np.where(np.arange(16) % 2 == 0, 4.0, 1.0)
    w = rng.uniform(-1, 1, (32, 16)) * ranges
    choice = choose_permutation([w], [], GridSpec.parse("4x1"), 4, "producer-range")
    assert choice.error_after < 0.8 * choice.error_before
    assert set(choice.permutation[:8].tolist()) == set(range(1, 16, 2))


def test_mismatched_channel_counts_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="channel count"):
        choose_permutation([rng.standard_normal((4, 8))], [rng.standard_normal((6, 3))], GridSpec.parse("2x2"), 8)
