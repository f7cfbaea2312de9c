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


# ---------------------------------------------------------------------------------------------- CNN op parity

XIMG = RNG.standard_normal((2, 3, 7, 6)).astype(np.float32)
"""An NCHW activation with odd / even spatial sizes (7, 6), so pools and resizes hit uneven edges."""


def _op_model(op: str, inputs: list[str], feed: dict[str, np.ndarray], inits: dict[str, np.ndarray],
              out_type: int, opset: int, n_outputs: int, attrs: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y", *[f"y{i}" for i in range(1, n_outputs)]], name="the_node", **attrs)],
        op.lower(),
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feed.items()],
        [helper.make_tensor_value_info("y", out_type, None)],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check_op(op: str, inputs: list[str], feed: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None,
              *, opset: int = 17, out_type: int = TensorProto.FLOAT, atol: float = 1e-5, grad: str | None = "x",
              **attrs) -> np.ndarray:
    """One-node graph ``op(inputs) -> y``: TorchGraph matches onnxruntime (shape and values); with ``grad``, the
    gradient of a random projection of ``y`` w.r.t. that graph input is finite and non-zero. Returns ``y``."""
    model = _op_model(op, inputs, feed, inits or {}, out_type, opset, 1, attrs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["y"], feed)
    graph = TorchGraph(model)
    actual = graph.run(feed)["y"].detach().numpy()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)
    if grad is not None:
        weights = torch.from_numpy(np.random.default_rng(1).standard_normal(expected.shape).astype(np.float32))
        grads = graph.output_gradients(feed, [grad], lambda out: (out["y"] * weights).sum())[grad]
        assert grads.shape == feed[grad].shape and np.isfinite(grads).all() and np.abs(grads).max() > 0
    return expected


_POSITIVE = np.abs(XIMG) + 0.1
_AWAY_FROM_ZERO = np.sign(XIMG) * (np.abs(XIMG) + 0.5)


@pytest.mark.parametrize(("op", "x", "attrs", "grad"), [
    ("Tanh", XIMG, {}, True),
    ("Exp", XIMG, {}, True),
    ("Log", _POSITIVE, {}, True),
    ("Abs", _AWAY_FROM_ZERO, {}, True),
    ("Reciprocal", _AWAY_FROM_ZERO, {}, True),
    ("Floor", XIMG * 3, {}, False),
    ("Ceil", XIMG * 3, {}, False),
    ("Sign", np.round(XIMG), {}, False),
    ("Identity", XIMG, {}, True),
    ("Softplus", XIMG * 4, {}, True),
    ("Mish", XIMG * 4, {}, True),
    ("HardSwish", XIMG * 4, {}, True),
    ("HardSigmoid", XIMG * 4, {}, True),
    ("HardSigmoid", XIMG * 4, {"alpha": 1 / 6, "beta": 0.4}, True),
    ("LeakyRelu", XIMG, {}, True),
    ("LeakyRelu", XIMG, {"alpha": 0.3}, True),
    ("Elu", XIMG, {"alpha": 0.7}, True),
    ("Selu", XIMG, {}, True),
    ("LogSoftmax", XIMG, {"axis": 1}, True),
    ("Dropout", XIMG, {}, True),
    ("GlobalAveragePool", XIMG, {}, True),
    ("GlobalMaxPool", XIMG, {}, True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unary_ops_match_onnxruntime(op: str, x: np.ndarray, attrs: dict, grad: bool) -> None:
    _check_op(op, ["x"], {"x": x}, opset=18, grad="x" if grad else None, **attrs)


def test_global_pools_keep_spatial_dims_and_accept_1d() -> None:
    assert _check_op("GlobalAveragePool", ["x"], {"x": XIMG[:, :, 0]}).shape == (2, 3, 1)
    assert _check_op("GlobalMaxPool", ["x"], {"x": XIMG}).shape == (2, 3, 1, 1)


@pytest.mark.parametrize("op", ["Min", "Max", "Sum", "Mean"])
def test_variadic_ops_broadcast_like_onnxruntime(op: str) -> None:
    feed = {"x": XIMG[0, :, :, :4], "b": RNG.standard_normal((7, 1)).astype(np.float32)}
    _check_op(op, ["x", "b", "c"], feed, {"c": RNG.standard_normal(4).astype(np.float32)})
    _check_op(op, ["x"], {"x": XIMG})


def test_max_with_scalar_initializer() -> None:
    _check_op("Max", ["lo", "x"], {"x": XIMG}, {"lo": np.array(0.0, np.float32)})


@pytest.mark.parametrize("op", ["Less", "LessOrEqual"])
def test_comparisons_match_onnxruntime(op: str) -> None:
    feed = {"x": np.round(XIMG), "b": np.round(XIMG[:1, :, :1])}
    _check_op(op, ["x", "b"], feed, out_type=TensorProto.BOOL, grad=None)


@pytest.mark.parametrize("op", ["Not", "Or", "Xor"])
def test_logical_ops_match_onnxruntime(op: str) -> None:
    feed = {"x": XIMG > 0} if op == "Not" else {"x": XIMG > 0, "b": XIMG[:1] > 0.5}
    _check_op(op, list(feed), feed, out_type=TensorProto.BOOL, grad=None)


def test_mod_einsum_tile_size_reduce_min_match_onnxruntime() -> None:
    ints = {"a": np.arange(-7, 8, dtype=np.int64), "b": np.array([3, -3, 4] * 5, np.int64)}
    _check_op("Mod", ["a", "b"], ints, out_type=TensorProto.INT64, grad=None)
    _check_op("Mod", ["a", "b"], ints, out_type=TensorProto.INT64, grad=None, fmod=1)
    _check_op("Mod", ["x", "b"], {"x": XIMG * 4, "b": _AWAY_FROM_ZERO[:1] * 2}, fmod=1)
    _check_op("Einsum", ["x", "w"], {"x": XIMG}, {"w": RNG.standard_normal((6, 5)).astype(np.float32)},
              equation="nchw, wk -> nkch")
    _check_op("Tile", ["x", "r"], {"x": XIMG}, {"r": np.array([1, 2, 1, 3], np.int64)})
    _check_op("Size", ["x"], {"x": XIMG}, out_type=TensorProto.INT64, grad=None)
    _check_op("ReduceMin", ["x"], {"x": XIMG}, axes=[1, 2], keepdims=0)
    _check_op("ReduceMin", ["x", "axes"], {"x": XIMG}, {"axes": np.array([-1], np.int64)}, opset=18)


@pytest.mark.parametrize("slope_shape", [(1, 3, 1, 1), (3, 1, 1), (6,), (1,), ()])
def test_prelu_slope_broadcasts_unidirectionally(slope_shape: tuple[int, ...]) -> None:
    slope = RNG.standard_normal(slope_shape).astype(np.float32)
    _check_op("PRelu", ["x", "slope"], {"x": XIMG}, {"slope": slope})


def test_prelu_slope_over_channels_of_a_matrix() -> None:
    slope = RNG.standard_normal(6).astype(np.float32)
    _check_op("PRelu", ["x", "slope"], {"x": XIMG[:, 0, 0]}, {"slope": slope})


@pytest.mark.parametrize(("opset", "attrs"), [(9, {}), (15, {"epsilon": 1e-3, "training_mode": 0}), (7, {})])
def test_batch_normalization_inference(opset: int, attrs: dict) -> None:
    params = {
        "scale": RNG.standard_normal(3).astype(np.float32),
        "bias": RNG.standard_normal(3).astype(np.float32),
        "mean": RNG.standard_normal(3).astype(np.float32),
        "var": (RNG.random(3) + 0.5).astype(np.float32),
    }
    _check_op("BatchNormalization", ["x", *params], {"x": XIMG}, params, opset=opset, **attrs)
    _check_op("BatchNormalization", ["x", *params], {"x": XIMG[:, :, 0]}, params, opset=opset, **attrs)


def test_batch_normalization_training_mode_is_refused() -> None:
    params = {n: np.ones(3, np.float32) for n in ("scale", "bias", "mean", "var")}
    model = _op_model("BatchNormalization", ["x", *params], {"x": XIMG}, params, TensorProto.FLOAT, 15, 1,
                      {"training_mode": 1})
    with pytest.raises(NotImplementedError, match="BatchNormalization node 'the_node'.*training_mode"):
        TorchGraph(model).run({"x": XIMG})


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},
    {"strides": [2, 3], "pads": [1, 0, 0, 2]},
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]},
    {"strides": [3, 2], "output_padding": [2, 1], "dilations": [2, 1]},
    {"group": 3, "strides": [2, 1], "pads": [0, 1, 1, 0]},
    {"auto_pad": "VALID", "strides": [1, 2]},
], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_matches_onnxruntime(attrs: dict, bias: bool) -> None:
    group = attrs.get("group", 1)
    inits = {"w": RNG.standard_normal((3, 4 // group if group == 1 else 2, 3, 2)).astype(np.float32)}
    if bias:
        inits["b"] = RNG.standard_normal(inits["w"].shape[1] * group).astype(np.float32)
    _check_op("ConvTranspose", ["x", *inits], {"x": XIMG}, inits, atol=1e-4, **attrs)


def test_conv_transpose_1d_and_refusals() -> None:
    inits = {"w": RNG.standard_normal((3, 2, 3)).astype(np.float32)}
    _check_op("ConvTranspose", ["x", "w"], {"x": XIMG[:, :, 0]}, inits, atol=1e-4, strides=[2], pads=[1, 0])
    for attrs, match in [({"output_shape": [14, 12]}, "output_shape"), ({"auto_pad": "SAME_UPPER"}, "auto_pad")]:
        model = _op_model("ConvTranspose", ["x", "w"], {"x": XIMG[:, :, 0]}, inits, TensorProto.FLOAT, 17, 1, attrs)
        with pytest.raises(NotImplementedError, match=f"ConvTranspose node 'the_node'.*{match}"):
            TorchGraph(model).run({"x": XIMG[:, :, 0]})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("strides", [[1, 1], [2, 3]])
def test_conv_auto_pad_matches_onnxruntime(auto_pad: str, strides: list[int]) -> None:
    inits = {"w": RNG.standard_normal((4, 3, 3, 2)).astype(np.float32)}
    _check_op("Conv", ["x", "w"], {"x": XIMG}, inits, atol=1e-4, auto_pad=auto_pad, strides=strides)


_POOL_SETTINGS = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [3, 2]},
    {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1]},
    {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 2], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"},
]


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("attrs", _POOL_SETTINGS, ids=str)
def test_average_pool_matches_onnxruntime(attrs: dict, count_include_pad: int) -> None:
    _check_op("AveragePool", ["x"], {"x": XIMG}, count_include_pad=count_include_pad, **attrs)


@pytest.mark.parametrize("attrs", [*_POOL_SETTINGS, {"kernel_shape": [2, 2], "dilations": [2, 1], "pads": [1, 0, 1, 1]},
                                   {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 1], "ceil_mode": 1}],
                         ids=str)
def test_max_pool_matches_onnxruntime(attrs: dict) -> None:
    _check_op("MaxPool", ["x"], {"x": XIMG}, **attrs)


@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 2], "dilations": [2, 1], "pads": [1, 0, 1, 1]},
                                   {"kernel_shape": [2, 2], "dilations": [2, 2], "ceil_mode": 1,
                                    "count_include_pad": 1}], ids=str)
def test_dilated_average_pool_matches_onnxruntime(attrs: dict) -> None:
    _check_op("AveragePool", ["x"], {"x": XIMG}, opset=19, **attrs)


def test_pools_1d() -> None:
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}
    _check_op("MaxPool", ["x"], {"x": XIMG[:, :, 0]}, **attrs)
    _check_op("AveragePool", ["x"], {"x": XIMG[:, :, 0]}, count_include_pad=1, **attrs)


def test_max_pool_indices_output_is_refused_only_when_used() -> None:
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y", "idx"], name="mp", kernel_shape=[2, 2])],
        "mp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, XIMG.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert TorchGraph(model).run({"x": XIMG})["y"].shape == (2, 3, 6, 5)
    model.graph.output.append(helper.make_tensor_value_info("idx", TensorProto.INT64, None))
    with pytest.raises(NotImplementedError, match=r"MaxPool node 'mp': output 1 \('idx'\) is not supported"):
        TorchGraph(model).run({"x": XIMG})


_NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
_COORDINATES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric",
                "tf_half_pixel_for_nn"]
_SCALES = [[1, 1, 2, 2], [1, 1, 1.7, 0.6], [1, 1, 0.5, 3], [1, 1, 1.5, 1.5]]


@pytest.mark.parametrize("scales", _SCALES, ids=str)
@pytest.mark.parametrize("coordinate", _COORDINATES)
@pytest.mark.parametrize("nearest", _NEAREST)
def test_resize_nearest_from_scales_matches_onnxruntime(nearest: str, coordinate: str, scales: list[float]) -> None:
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array(scales, np.float32)}
    _check_op("Resize", ["x", "roi", "scales"], {"x": XIMG}, inits, opset=19, atol=0, mode="nearest",
              nearest_mode=nearest, coordinate_transformation_mode=coordinate)


_SIZES = [[2, 3, 14, 12], [2, 3, 5, 4], [2, 3, 1, 9], [2, 3, 10, 6]]


@pytest.mark.parametrize("sizes", _SIZES, ids=str)
@pytest.mark.parametrize("coordinate", _COORDINATES[:4])
@pytest.mark.parametrize("nearest", _NEAREST)
def test_resize_nearest_from_sizes_matches_onnxruntime(nearest: str, coordinate: str, sizes: list[int]) -> None:
    inits = {"sizes": np.array(sizes, np.int64)}
    _check_op("Resize", ["x", "", "", "sizes"], {"x": XIMG}, inits, opset=13, atol=0, mode="nearest",
              nearest_mode=nearest, coordinate_transformation_mode=coordinate)


@pytest.mark.parametrize("target", [*_SCALES, *_SIZES], ids=str)
@pytest.mark.parametrize("coordinate", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel",
                                        "half_pixel_symmetric"])
def test_resize_linear_matches_onnxruntime(coordinate: str, target: list[float]) -> None:
    sizes = target[0] == 2
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array(target, np.float32)}
    if sizes:
        inits = {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32), "sizes": np.array(target, np.int64)}
    _check_op("Resize", ["x", *inits], {"x": XIMG}, inits, opset=19, atol=1e-5, mode="linear",
              coordinate_transformation_mode=coordinate)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 0.5, 0.6], [1, 1, 1.7, 2.5]], ids=str)
def test_legacy_resize_and_upsample_match_onnxruntime(mode: str, scales: list[float]) -> None:
    inits = {"scales": np.array(scales, np.float32)}
    _check_op("Resize", ["x", "scales"], {"x": XIMG}, inits, opset=10, mode=mode)
    if min(scales) >= 1:
        _check_op("Upsample", ["x", "scales"], {"x": XIMG}, inits, opset=9, mode=mode)
        _check_op("Upsample", ["x"], {"x": XIMG}, opset=7, mode=mode, scales=[float(s) for s in scales])


def test_resize_defaults_dynamic_scales_and_axes() -> None:
    scales = np.array([1, 1, 2, 1.5], np.float32)
    _check_op("Resize", ["x", "roi", "scales"], {"x": XIMG, "scales": scales}, {"roi": np.zeros(0, np.float32)},
              opset=11)
    _check_op("Resize", ["x", "", "scales"], {"x": XIMG}, {"scales": np.array([0.5, 3], np.float32)}, opset=18,
              axes=[3, 2], mode="linear")
    _check_op("Resize", ["x", "", "", "sizes"], {"x": XIMG}, {"sizes": np.array([9, 4], np.int64)}, opset=18,
              axes=[-2, -1])


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_keep_aspect_ratio_policy_matches_onnxruntime(policy: str, mode: str) -> None:
    _check_op("Resize", ["x", "", "", "sizes"], {"x": XIMG}, {"sizes": np.array([9, 20], np.int64)}, opset=18,
              axes=[2, 3], mode=mode, keep_aspect_ratio_policy=policy)
    if mode == "nearest":  # without axes the common scale also resizes N and C, which linear refuses
        _check_op("Resize", ["x", "", "", "sizes"], {"x": XIMG}, {"sizes": np.array([2, 3, 4, 5], np.int64)},
                  opset=18, mode=mode, keep_aspect_ratio_policy=policy)


@pytest.mark.parametrize(("attrs", "match"), [
    ({"mode": "cubic"}, "mode='cubic'"),
    ({"coordinate_transformation_mode": "tf_crop_and_resize"}, "coordinate_transformation_mode='tf_crop_and_resize'"),
    ({"antialias": 1, "mode": "linear"}, "antialias"),
])
def test_resize_refuses_unsupported_attributes(attrs: dict, match: str) -> None:
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    model = _op_model("Resize", ["x", "roi", "scales"], {"x": XIMG}, inits, TensorProto.FLOAT, 19, 1, attrs)
    graph = TorchGraph(model)
    with pytest.raises(NotImplementedError, match=f"Resize node 'the_node': {match}"):
        graph.run({"x": XIMG})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 3, 0], [0, 1, 2, 0, 1, 0, 0, 3], [0, 0, -1, 2, 0, 0, 1, -2]],
                         ids=str)
def test_pad_from_input_matches_onnxruntime(mode: str, pads: list[int]) -> None:
    inits = {"pads": np.array(pads, np.int64), "value": np.array(0.5, np.float32)}
    if mode == "constant":
        _check_op("Pad", ["x", "pads", "value"], {"x": XIMG}, inits, opset=19, mode=mode)
    _check_op("Pad", ["x", "pads"], {"x": XIMG}, inits, opset=19, mode=mode)


def test_pad_attribute_form_axes_and_dynamic_pads() -> None:
    _check_op("Pad", ["x"], {"x": XIMG}, opset=10, pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect")
    _check_op("Pad", ["x"], {"x": XIMG}, opset=10, pads=[0, 1, 0, 0, 0, 1, 0, 0], value=-2.0)
    _check_op("Pad", ["x", "pads", "", "axes"], {"x": XIMG}, {"pads": np.array([2, 1, 3, 0], np.int64),
              "axes": np.array([-1, 2], np.int64)}, opset=18, mode="edge")
    _check_op("Pad", ["x", "pads"], {"x": XIMG[:, 0], "pads": np.array([0, 0, 5, 0, 0, 5], np.int64)}, opset=13,
              mode="reflect")
