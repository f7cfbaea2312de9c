"""TorchGraph: onnxruntime parity on the cleaned zoo graphs, intermediate gradients, ``replace``, unsupported ops."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxsmith.calibration.torch_graph import TorchGraph, distillation_mse, pseudo_label_cross_entropy
from onnxsmith.models.zoo import get_zoo_model, zoo_model_path
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.optimizer.recipes import load_recipe

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 16)).astype(np.float32)
W2 = RNG.standard_normal((16, 5)).astype(np.float32)
X = RNG.standard_normal((4, 8)).astype(np.float32)


@cache
def _cleaned(name: str) -> onnx.ModelProto:
    """The cleaned zoo graph (cached: callers must not mutate it)."""
    return PassManager(load_recipe("cleanup").build(), verify=False).run(onnx.load(zoo_model_path(name))).model


def _mlp() -> onnx.ModelProto:
    """x -> MatMul W1 -> h -> Gelu (Erf form) -> MatMul W2 -> logits."""
    c = numpy_helper.from_array
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Div", ["h", "sqrt2"], ["h_s"], name="div"),
        helper.make_node("Erf", ["h_s"], ["erf"], name="erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="add"),
        helper.make_node("Mul", ["h", "erf1"], ["hm"], name="mul"),
        helper.make_node("Mul", ["hm", "half"], ["g"], name="mul_half"),
        helper.make_node("MatMul", ["g", "w2"], ["logits"], name="mm2"),
    ]
    inits = [
        c(W1, "w1"),
        c(W2, "w2"),
        c(np.array(math.sqrt(2), np.float32), "sqrt2"),
        c(np.array(1, np.float32), "one"),
        c(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _torch_mlp_logits(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(h) @ torch.from_numpy(W2)


@pytest.mark.parametrize("name", ["vit-digits", "minilm", "moe-tiny"])
def test_zoo_outputs_match_onnxruntime(name: str) -> None:
    model = _cleaned(name)
    graph = TorchGraph(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in get_zoo_model(name).calibration_feeds(2):
        expected = session.run(graph.output_names, feed)
        actual = graph.run(feed)
        for out_name, ref in zip(graph.output_names, expected, strict=True):
            np.testing.assert_allclose(actual[out_name].detach().numpy(), ref, atol=1e-4, rtol=0)


def test_zoo_vit_intermediate_gradient_is_nonzero() -> None:
    model = _cleaned("vit-digits")
    matmul_out = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    graph = TorchGraph(model)
    feed = get_zoo_model("vit-digits").calibration_feeds(1)[0]
    grads = graph.output_gradients(feed, [matmul_out], pseudo_label_cross_entropy("logits"))
    assert grads[matmul_out].shape == tuple(graph.run(feed, capture=[matmul_out])[matmul_out].shape)
    assert np.abs(grads[matmul_out]).max() > 0


def test_gradient_matches_torch_autograd() -> None:
    graph = TorchGraph(_mlp())
    grads = graph.output_gradients({"x": X}, ["h"], pseudo_label_cross_entropy("logits"))

    h = (torch.from_numpy(X) @ torch.from_numpy(W1)).requires_grad_(True)
    logits = _torch_mlp_logits(h)
    torch.nn.functional.cross_entropy(logits, logits.detach().argmax(-1)).backward()
    np.testing.assert_allclose(grads["h"], h.grad.numpy(), atol=1e-6)
    assert np.abs(grads["h"]).max() > 1e-3


def test_gradient_matches_finite_differences() -> None:
    graph = TorchGraph(_mlp())
    target = RNG.standard_normal((4, 5)).astype(np.float32)
    loss_fn = distillation_mse("logits", target)
    grad = graph.output_gradients({"x": X}, ["h"], loss_fn)["h"]

    h = graph.run({"x": X}, capture=["h"])["h"].detach().double()
    direction = torch.from_numpy(RNG.standard_normal(h.shape))
    eps = 1e-3

    def loss_at(shift: float) -> float:
        shifted = (h + shift * direction).float()
        return float(loss_fn(graph.run({"x": X}, replace={"h": shifted})))

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = float((torch.from_numpy(grad).double() * direction).sum())
    assert numeric == pytest.approx(analytic, rel=1e-2)


def test_capture_returns_autograd_tensors() -> None:
    out = TorchGraph(_mlp()).run({"x": X}, capture=["h", "g"])
    assert out["h"].requires_grad and out["g"].requires_grad
    out["logits"].sum().backward()
    assert out["h"].grad is not None and out["g"].grad is not None


def test_replace_substitutes_intermediate() -> None:
    graph = TorchGraph(_mlp())
    assert torch.count_nonzero(graph.run({"x": X}, replace={"h": torch.zeros(4, 8 * 2)})["logits"]) == 0

    h = torch.from_numpy(X) @ torch.from_numpy(W1)
    doubled = graph.run({"x": X}, replace={"h": 2 * h}, capture=["h"])
    np.testing.assert_allclose(doubled["logits"].detach(), _torch_mlp_logits(2 * h), atol=1e-5)
    np.testing.assert_allclose(doubled["h"].detach(), 2 * h, atol=0)


def test_unknown_tensor_names_raise() -> None:
    graph = TorchGraph(_mlp())
    with pytest.raises(KeyError, match="nope"):
        graph.run({"x": X}, capture=["nope"])
    with pytest.raises(KeyError, match="nope"):
        graph.run({"x": X}, replace={"nope": torch.zeros(1)})


def test_unsupported_op_raises_naming_op_and_node() -> None:
    model = _mlp()
    model.graph.node.append(helper.make_node("Hardmax", ["logits"], ["hard"], name="the_hardmax"))
    with pytest.raises(NotImplementedError, match="Hardmax.*the_hardmax"):
        TorchGraph(model)
