"""prune-nm: N:M masks on the input axis TensorRT needs, magnitude vs Wanda scores, skips, and the norm observer."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.observers import ChannelEntropyObserver, ChannelNormObserver
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.prune_nm import PruneNM
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.core.sparsity import channel_factors, nm_mask, satisfies_nm


def single(op, weight, x_shape, y_shape, **attrs):
    model = graphs.make_model(
        [helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(weight, "w")],
    )
    return model


def prune(model, feeds=None, **options):
    passes = [ShapeInference(), PruneNM(**{"skip_head": False, **options})]
    result = PassManager(passes).run(model, PassContext(calibration_data=feeds))
    return result.model, result.records[-1]


def pruned_weight(model):
    (init,) = [t for t in model.graph.initializer if t.name.startswith("w_")]
    return numpy_helper.to_array(init)


RNG = np.random.default_rng(0)
CASES = [
    ("MatMul", RNG.standard_normal((64, 72)).astype(np.float32), ["N", 64], ["N", 72], {}, 0),
    ("Gemm", RNG.standard_normal((72, 64)).astype(np.float32), ["N", 64], ["N", 72], {"transB": 1}, 1),
    ("Gemm", RNG.standard_normal((64, 72)).astype(np.float32), ["N", 64], ["N", 72], {"transB": 0}, 0),
    ("Conv", RNG.standard_normal((64, 64, 3, 3)).astype(np.float32), [1, 64, 5, 5], [1, 64, 3, 3], {}, 1),
]


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("op, weight, x_shape, y_shape, attrs, axis", CASES)
def test_every_pruned_weight_is_n_of_m_on_the_input_axis(op, weight, x_shape, y_shape, attrs, axis, n, m):
    pruned_model, record = prune(single(op, weight, x_shape, y_shape, **attrs), n=n, m=m)
    pruned = pruned_weight(pruned_model)
    assert satisfies_nm(pruned, n, m, axis)
    assert not satisfies_nm(pruned, n, m, 1 - axis if pruned.ndim == 2 else 0) or pruned.shape[0] < m
    assert np.count_nonzero(pruned) == weight.size * n // m
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], weight[kept])  # kept weights are not updated
    # magnitude: in every group the kept entries are the largest |w|
    moved = np.moveaxis(np.abs(weight), axis, 0).reshape(weight.shape[axis] // m, m, -1)
    kept_moved = np.moveaxis(kept, axis, 0).reshape(moved.shape)
    assert (np.where(kept_moved, moved, np.inf).min(axis=1) >= np.where(kept_moved, -np.inf, moved).max(axis=1)).all()
    assert record.changes["pruned"] == 1
    feed = {"x": RNG.standard_normal([2 if d == "N" else d for d in x_shape]).astype(np.float32)}
    assert np.isfinite(run_session(create_session(pruned_model), feed)["y"]).all()


def test_wanda_weighs_magnitudes_by_input_channel_norms():
    w = np.ones((64, 64), np.float32)
    w[1::4] = w[3::4] = 2.0  # magnitude keeps input channels 1 and 3 of every group of 4
    scale = np.ones(64, np.float32)
    scale[0::4] = 10.0  # channel 0 of every group is 10x louder: Wanda keeps it
    feeds = [{"x": (RNG.standard_normal((16, 64)) * scale).astype(np.float32)} for _ in range(3)]
    model = single("MatMul", w, ["N", 64], ["N", 64])
    magnitude = pruned_weight(prune(model, n=2, m=4)[0])
    wanda = pruned_weight(prune(model, feeds, n=2, m=4, score="wanda")[0])
    assert (magnitude[0::4] == 0).all() and (magnitude[1::4] != 0).all()
    assert (wanda[0::4] != 0).all() and satisfies_nm(wanda, 2, 4, 0)
    norms = np.sqrt(sum((f["x"].astype(np.float64) ** 2).sum(axis=0) for f in feeds))
    np.testing.assert_array_equal(wanda != 0, nm_mask(np.abs(w) * norms[:, None], 2, 4, 0))


def test_small_excluded_and_ragged_layers_are_skipped_with_reasons():
    nodes = [helper.make_node("MatMul", ["x", "w_small"], ["a"], name="small"),
             helper.make_node("MatMul", ["a", "w_odd"], ["b"], name="odd"),
             helper.make_node("MatMul", ["b", "w_head"], ["y"], name="lm_head")]
    inits = [numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w_small", (64, 30)), ("w_odd", (30, 64)), ("w_head", (64, 64)))]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)
    pruned, record = prune(model, exclude_regex=["head"], min_channels=16)
    reasons = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
    assert set(reasons) == {"odd", "lm_head"} and "multiple of 4" in reasons["odd"] and reasons["lm_head"] == "excluded"
    assert record.changes["pruned"] == 1
    _, default = prune(model)
    assert "fewer than 64" in {d["node"]: d.get("reason") for d in default.details}["small"]


def test_bad_options_and_wanda_needs_calibration():
    for options in ({"n": 4, "m": 4}, {"n": 0}, {"score": "entropy"}, {"score": "esparse", "alpha": -1}, {"min_channels": 0}):
        with pytest.raises(ValueError):
            PruneNM(**options)
    assert PruneNM().needs_calibration is False and PruneNM(score="wanda").needs_calibration is True


def test_channel_norm_observer_streams_sum_of_squares():
    batches = [RNG.standard_normal((2, 5, 7)) for _ in range(3)]
    observer = ChannelNormObserver(axis=1)
    for batch in batches:
        observer.observe(batch)
    expected = sum((b ** 2).sum(axis=(0, 2)) for b in batches)
    np.testing.assert_allclose(observer.sum_squares, expected)
    np.testing.assert_allclose(observer.norms, np.sqrt(expected))
    with pytest.raises(ValueError, match="channels"):
        observer.observe(np.ones((2, 4, 7)))


def test_channel_entropy_observer_matches_one_shot_histograms_whatever_the_batching():
    rng = np.random.default_rng(5)
    data = rng.standard_normal((6, 50, 3)) * np.array([1.0, 0.1, 0.0])  # channel 2 is constant 0
    data[4, :, 0] *= 5.0  # a late batch beyond channel 0's range doubles it
    streamed = ChannelEntropyObserver(axis=-1, bins=16)
    for batch in data:
        streamed.observe(batch)
    assert streamed.histograms.sum(axis=1).tolist() == [300, 300, 300]
    for channel in (0, 1):
        values = data[..., channel].ravel()
        slots = np.floor(values / (streamed.range_max[channel] / 8)).astype(int) + 8  # the final range, one shot
        expected = np.bincount(slots, minlength=16)
        np.testing.assert_array_equal(streamed.histograms[channel], expected)
        p = expected[expected > 0] / values.size
        assert streamed.entropy[channel] == pytest.approx(-(p * np.log(p)).sum())
    assert streamed.range_max[0] >= np.abs(data[..., 0]).max() > streamed.range_max[0] / 2
    assert streamed.entropy[2] == 0.0
    np.testing.assert_allclose(streamed.sum_squares, (data ** 2).sum(axis=(0, 1)))
    with pytest.raises(ValueError, match="multiple of 4"):
        ChannelEntropyObserver(bins=6)


def test_esparse_factors_normalise_entropy_and_norms():
    entropy, norms = np.array([1.0, 3.0]), np.array([10.0, 30.0])
    np.testing.assert_allclose(channel_factors("esparse", norms, entropy, alpha=0.0), [0.5, 1.5])
    np.testing.assert_allclose(channel_factors("esparse", norms, entropy, alpha=2.0), [1.5, 4.5])
    np.testing.assert_allclose(channel_factors("wanda", norms), norms)
    assert channel_factors("magnitude") is None
    with pytest.raises(ValueError, match="entropy"):
        channel_factors("esparse", norms)


def test_esparse_prefers_high_entropy_channels_of_equal_norm():
    """In every group of 4 input channels, channel 0 carries rare spikes and channel 1 dense +-1 values of the
    same energy (channels 2 and 3 are silent). At 1:4 Wanda cannot tell 0 and 1 apart and keeps the earlier;
    E-Sparse with alpha = 0 keeps the high-entropy channel 1."""
    tokens = 256
    x = np.zeros((tokens, 64))
    x[:, 1::4] = np.random.default_rng(6).choice([-1.0, 1.0], size=(tokens, 16))
    x[::64, 0::4] = 8.0  # 4 spikes of 8: the same sum of squares as 256 values of +-1
    model = single("MatMul", np.ones((64, 64), np.float32), ["N", 64], ["N", 64])
    feeds = [{"x": x[i::4].astype(np.float32)} for i in range(4)]
    wanda = pruned_weight(prune(model, feeds, n=1, m=4, score="wanda")[0])
    esparse = pruned_weight(prune(model, feeds, n=1, m=4, score="esparse", alpha=0.0)[0])
    assert (wanda[0::4] != 0).all() and (wanda[1::4] == 0).all()
    assert (esparse[1::4] != 0).all() and (esparse[0::4] == 0).all()


def test_a_tied_weight_pruned_with_two_masks_keeps_both():
    """Regression (found by test_fuzz_passes): with activation-aware scores two layers sharing one weight get
    different masks, but both pruned copies had the same name, so the export kept one and the other layer silently
    ran with the wrong mask. Equal masks (magnitude) still share one tensor."""
    rng = np.random.default_rng(1)
    channel_scale = np.where(np.arange(8) % 2 == 0, 100.0, 0.01).astype(np.float32)
    model = graphs.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
         helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
         helper.make_node("MatMul", ["hs", "w"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(channel_scale, "s")],
    )
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(2)]
    for score, distinct in (("wanda", 2), ("magnitude", 1)):
        pruned, _ = prune(model, feeds, score=score, min_channels=8)
        inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        weights = {node.name: node.input[1] for node in pruned.graph.node if node.op_type == "MatMul"}
        assert len(set(weights.values())) == distinct, score
        if score == "wanda":  # mm2 reads channels scaled by 100 at even positions: its mask keeps those
            assert (inits[weights["mm2"]][0::2] != 0).all() and (inits[weights["mm2"]][1::2] == 0).all()
            assert not np.array_equal(inits[weights["mm1"]] != 0, inits[weights["mm2"]] != 0)
