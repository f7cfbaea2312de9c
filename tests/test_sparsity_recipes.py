"""The N:M recipes end to end on a small transformer block: every decoder GEMM ends 2:4 on its input axis, the
E-Sparse recipe shuffles (folded and gathered), and the INT8 recipe has the 1x1 Conv form with Q/DQ on both sides."""

import numpy as np
import pytest
from onnx import numpy_helper

import graphs
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.analysis.sparsity import inspect_sparsity
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.optimizer.recipes import load_recipe

GEMMS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}


def calibration(count=3):
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(count)]


def run_recipe(name, **overrides):
    model = graphs.transformer_block(hidden=64, inner=128)
    feeds = calibration()
    result = PassManager(load_recipe(name).build(overrides), probe_feeds=feeds[:1]).run(
        model, PassContext(calibration_data=feeds))
    return model, result


@pytest.mark.parametrize("recipe", ["sparse24", "wanda24", "esparse24"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_sparsity_recipes_leave_every_gemm_n_of_m_on_its_input_axis(recipe, n, m):
    model, result = run_recipe(recipe, nm=(n, m))
    rows = {row.node: row for row in inspect_sparsity(result.model)}
    assert set(rows) == GEMMS
    assert all(row.pattern == f"{n}:{m}" and row.axis == 0 for row in rows.values())
    prune = next(r for r in result.records if r.name == "prune-nm")
    assert prune.changes["pruned"] == 6
    feed = calibration(1)[0]
    dense = run_session(create_session(model), feed)["y"]
    sparse = run_session(create_session(result.model), feed)["y"]
    cosine = float((dense * sparse).sum() / np.linalg.norm(dense) / np.linalg.norm(sparse))
    assert 0.5 < cosine < 0.9999  # pruned (not the same function) but still close to it


def test_esparse24_shuffles_fold_and_gather_before_pruning():
    _, result = run_recipe("esparse24")
    shuffle = next(r for r in result.records if r.name == "shuffle-nm")
    assert shuffle.verification["within_tolerance"]  # verified lossless before pruning
    assert shuffle.changes["folded"] == 1 and shuffle.changes["gathered"] == 5
    assert [node.op_type for node in result.model.graph.node].count("Gather") == 1


def test_esparse24_w8a8_has_sparse_int8_convs_with_qdq_in_and_out():
    _, result = run_recipe("esparse24-w8a8")
    graph = result.model.graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 6 and not [node for node in graph.node if node.op_type == "MatMul"]
    for conv in convs:
        weight_dq, input_dq = producers[conv.input[1]], producers[conv.input[0]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight = initializers[weight_dq.input[0]]
        assert weight.dtype == np.int8 and weight.shape[2:] == (1, 1)
        assert (np.count_nonzero(weight.reshape(weight.shape[0], -1, 4), axis=2) <= 2).all()  # 2:4 along axis 1
        if input_dq.op_type == "Reshape":  # Q/DQ on the GEMM input, before the Reshape to NCHW
            input_dq = producers[input_dq.input[0]]
        assert input_dq.op_type == "DequantizeLinear" and producers[input_dq.input[0]].op_type == "QuantizeLinear"
        assert [node.op_type for node in consumers[conv.output[0]]] == ["QuantizeLinear"]
    assert np.isfinite(run_session(create_session(result.model), calibration(1)[0])["y"]).all()
