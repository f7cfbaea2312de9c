"""shuffle-nm and the N:M permutation search: lossless absorption (folded or Gather), kept score never lowered."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.nm_shuffle import choose_nm_permutation, kept_fraction
from onnxsmith.core.sparsity import satisfies_nm
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.prune_nm import PruneNM
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.passes.shuffle_nm import ShuffleNM

SMALL = {"min_channels": 8}


def random_scores(rng, channels, columns):
    """Heavy-tailed non-negative scores with per-channel importance, like |W| * channel norms."""
    return np.abs(rng.standard_normal((channels, columns))) * np.exp(rng.standard_normal((channels, 1)))


@pytest.mark.parametrize("method", ["global", "local", "apex"])
@pytest.mark.parametrize("seed", range(6))
def test_shuffle_never_lowers_the_kept_score_on_random_cases(method, seed):
    rng = np.random.default_rng(seed)
    channels = int(rng.choice([16, 32, 48]))
    scores = [random_scores(rng, channels, int(rng.integers(4, 24))) for _ in range(int(rng.integers(1, 4)))]
    choice = choose_nm_permutation(scores, 2, 4, method, block=16)
    assert sorted(choice.permutation) == list(range(channels))
    assert choice.kept_before == pytest.approx(kept_fraction(scores, 2, 4))
    assert choice.kept_after == pytest.approx(kept_fraction(scores, 2, 4, choice.permutation))
    assert choice.kept_after >= choice.kept_before
    assert choice.method in (method, "identity")


@pytest.mark.parametrize("seed", range(4))
def test_local_and_apex_searches_improve_on_the_global_shuffle_for_4_of_8_and_2_of_4(seed):
    rng = np.random.default_rng(100 + seed)
    scores = [random_scores(rng, 64, 16)]
    for n, m, better in ((2, 4, "apex"), (4, 8, "local")):
        shuffled = choose_nm_permutation(scores, n, m, "global").kept_after
        assert choose_nm_permutation(scores, n, m, better, block=32).kept_after >= shuffled - 1e-9
        assert shuffled > kept_fraction(scores, n, m)  # heavy-tailed channels: dealing them out helps


def test_global_shuffle_spreads_clustered_important_channels():
    scores = np.ones((16, 3))
    scores[:4] = 10.0  # four important channels in one 2:4 group: identity keeps only two of them
    choice = choose_nm_permutation([scores], 2, 4, "global")
    groups = np.argsort(choice.permutation).reshape(-1) // 4  # group of each old channel
    assert len(set(groups[:4])) == 4
    assert choice.kept_after > choice.kept_before
    assert choose_nm_permutation([np.ones((16, 3))], 2, 4, "local").method == "identity"  # nothing to gain


def test_permutations_stay_inside_heads():
    rng = np.random.default_rng(7)
    choice = choose_nm_permutation([random_scores(rng, 32, 8)], 2, 4, "local", group=8)
    assert (np.sort(choice.permutation.reshape(4, 8), axis=1) == np.arange(32).reshape(4, 8)).all()
    with pytest.raises(ValueError, match="2:4"):
        choose_nm_permutation([random_scores(rng, 32, 8)], 4, 8, "apex")


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(rng, shape, name, scale=1.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def conv_relu_conv():
    rng = np.random.default_rng(4)
    inits = [init(rng, (16, 3, 3, 3), "w1", np.exp(rng.standard_normal((16, 1, 1, 1)))), init(rng, (16,), "b1"),
             init(rng, (8, 16, 3, 3), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    return graphs.make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 8, 8, 8])], inits)


def feeds(model, count=3):
    rng = np.random.default_rng(11)
    return [{i.name: rng.standard_normal([d.dim_value or 4 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input} for _ in range(count)]


def shuffle(model, *more, **options):
    """shape-inference, shuffle-nm (and ``more`` passes) through the manager, which verifies the shuffle."""
    calibration = feeds(model)
    passes = [ShapeInference(symbolic=True), ShuffleNM(**{"score": "wanda", **SMALL, **options}), *more]
    result = PassManager(passes, probe_feeds=calibration).run(model, PassContext(calibration_data=calibration))
    record = next(r for r in result.records if r.name == "shuffle-nm")
    return result.model, record


def assert_same_function(before, after):
    for feed in feeds(before, 2):
        expected = run_session(create_session(before, optimize=False), feed)
        actual = run_session(create_session(after, optimize=False), feed)
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5 * float(np.abs(value).max()))


def by_node(record):
    return {d["node"]: d for d in record.details}


def test_shuffles_are_folded_into_producers_or_gathered_and_lossless():
    model = graphs.transformer_block()
    shuffled, record = shuffle(model)
    assert_same_function(model, shuffled)
    details = by_node(record)
    assert details["down_proj"]["kind"] == "folded"
    assert sorted(details["down_proj"]["producers"]) == ["gate_proj", "up_proj"]
    assert {details[name]["kind"] for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")} == {"gathered"}
    gathers = [node for node in shuffled.graph.node if node.op_type == "Gather"]
    assert len(gathers) == 1  # one Gather of the LayerNorm output serves all five layers reading it
    assert all(d["kept_after"] >= d["kept_before"] for d in record.details)
    assert sum(d["kept_after"] - d["kept_before"] for d in record.details) > 0
    assert record.changes["folded"] == 1 and record.changes["gathered"] == 5


def test_gather_each_gives_every_unfoldable_layer_its_own_permutation():
    model = graphs.transformer_block()
    shared = by_node(shuffle(model)[1])
    each_model, record = shuffle(model, absorb="fold-or-gather-each")
    assert_same_function(model, each_model)
    assert [node.op_type for node in each_model.graph.node].count("Gather") == 5
    each = by_node(record)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert each[name]["kind"] == "gathered" and each[name]["kept_after"] >= shared[name]["kept_after"] - 1e-9
    assert sum(each[n]["kept_after"] for n in each) > sum(shared[n]["kept_after"] for n in shared)


def test_fold_only_leaves_unfoldable_layers_in_place():
    model = graphs.transformer_block()
    shuffled, record = shuffle(model, absorb="fold")
    assert_same_function(model, shuffled)
    assert not [node for node in shuffled.graph.node if node.op_type == "Gather"]
    assert by_node(record)["q_proj"]["kind"] == "unshuffled" and by_node(record)["down_proj"]["kind"] == "folded"


def test_conv_to_conv_shuffle_is_folded():
    model = conv_relu_conv()
    shuffled, record = shuffle(model)
    assert_same_function(model, shuffled)
    assert by_node(record)["conv2"]["kind"] == "folded"
    assert by_node(record)["conv2"]["producers"] == ["conv1"]


@pytest.mark.parametrize("score", ["magnitude", "wanda", "esparse"])
def test_shuffle_then_prune_keeps_at_least_the_unshuffled_score(score):
    """Pruning after the shuffle gives N:M weights whose kept score (measured on the unshuffled layer) is not
    lower than pruning without it."""
    model = graphs.transformer_block()
    pruned, record = shuffle(model, PruneNM(score=score, **SMALL), score=score)
    assert all(d["kept_after"] >= d["kept_before"] for d in record.details)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for node in pruned.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            assert satisfies_nm(weights[node.input[1]], 2, 4, 0), node.name


def test_bad_options():
    for options in ({"shuffle": "random"}, {"absorb": "residual"}, {"n": 4, "m": 8, "shuffle": "apex"},
                    {"block": 6}, {"score": "entropy"}, {"min_channels": 0}):
        with pytest.raises(ValueError):
            ShuffleNM(**options)
    assert ShuffleNM(score="magnitude").needs_calibration is False and ShuffleNM().needs_calibration is True


def test_shuffle_none_changes_nothing():
    model = graphs.transformer_block()
    result = PassManager([ShuffleNM(shuffle="none", **SMALL)]).run(model, PassContext())
    assert not result.records[-1].modified
    assert result.model.graph.SerializeToString() == model.graph.SerializeToString()
