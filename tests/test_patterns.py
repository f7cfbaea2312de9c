from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.models.zoo import zoo_model_path
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.core.graph import import_graph
from onnxsmith.analysis.activation_patterns import find_activation_sites


def kinds(model: onnx.ModelProto) -> dict[str, str]:
    return {site.tensor.name: site.kind for site in find_activation_sites(import_graph(model))}


def test_hand_made_gelu_and_attention():
    assert kinds(graphs.matmul_add_gelu()) == {"g": "gelu"}
    assert kinds(graphs.attention_block()) == {"p": "softmax"}


def test_opset20_gelu_op_and_pass_through_nodes():
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    model = graphs.make_model(
        [
            helper.make_node("Gelu", ["x"], ["g"], name="gelu"),
            helper.make_node("Dropout", ["g"], ["d"], name="dropout"),
            helper.make_node("MatMul", ["d", "w"], ["y"], name="fc"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
        opset=20,
    )
    sites = find_activation_sites(import_graph(model))
    assert [(s.tensor.name, s.kind, [c.name for c, _ in s.consumers]) for s in sites] == [("d", "gelu", ["fc"])]


def test_softmax_as_second_matmul_input_and_unclosed_erf_chains_are_not_sites():
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["x", "p"], ["a"], name="x_at_p"),  # probabilities as the right operand
        helper.make_node("Erf", ["x"], ["e"], name="erf"),  # Erf of x itself: no x/√2 scaling, not a GELU
        helper.make_node("MatMul", ["e", "a"], ["y"], name="mm"),
    ]
    model = graphs.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
    )
    assert kinds(model) == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit-digits", {"softmax": 2, "gelu": 2}),
        ("minilm", {"softmax": 6, "gelu": 6}),  # softmax behind the SDPA NaN guard
        ("moe-tiny", {"softmax": 4, "silu-gated": 20}),
        ("smollm2", {"softmax": 30, "silu-gated": 30}),
    ],
)
def test_zoo_models_before_and_after_cleanup(name, expected):
    model = onnx.load(str(zoo_model_path(name)))
    assert Counter(kinds(model).values()) == expected
    if name != "smollm2":  # cleanup of SmolLM2 is covered by test_zoo_cleanup
        cleaned = PassManager(load_recipe("cleanup").build(), verify=False).run(model).model
        assert Counter(kinds(cleaned).values()) == expected
