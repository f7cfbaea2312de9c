"""Real-world robustness: the kinds of graphs exporters write go through the recipes without crashing.

Each recipe either applies or reports, per node, what it skipped and why; lossless recipes keep the outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxsmith.core import model_io
from onnxsmith.core.model_io import load_model
from onnxsmith.optimizer.pipeline import optimize_file
from onnxsmith.core.feeds import generated_probe_feeds

RECIPES = ["cleanup", "w8a8", "sparse24"]


def rng():
    return np.random.default_rng(0)


def weights(shape, name):
    return numpy_helper.from_array(rng().standard_normal(shape).astype(np.float32) * 0.3, name)


def build(nodes, inputs, outputs, inits=(), opset=17, ir_version=None):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or {11: 6, 13: 7, 17: 8, 21: 10}.get(opset, model.ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model_or_path, feed):
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_model(model_or_path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def optimize(model, tmp_path, recipe, name="m", feeds=None, **kwargs):
    """Save ``model``, run ``recipe`` on it with generated calibration feeds; returns (result, feeds)."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    feeds = feeds if feeds is not None else generated_probe_feeds(model, count=4)
    result = optimize_file(str(path), tmp_path / f"{name}.{recipe}.onnx", recipe=recipe, calib=feeds,
                           progress=False, **kwargs)
    assert result.unverified_reason is None, result.unverified_reason
    return result, feeds


def check_outputs(model, result, feeds, recipe, lossy_tolerance=None):
    """The optimized model runs; lossless recipes match the input model's outputs."""
    for feed in feeds[:2]:
        expected = run(model, feed)
        actual = run(result.output_path, feed)
        assert [a.shape for a in actual] == [e.shape for e in expected]
        if recipe == "cleanup":
            for a, e in zip(actual, expected):
                np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
        elif lossy_tolerance is not None:
            for a, e in zip(actual, expected):
                assert np.abs(a - e).max() <= lossy_tolerance * (np.abs(e).max() + 1e-6)


def last_record(result):
    return result.records[-1]


def applied_or_explained(record) -> None:
    """A lossy pass changed the model, or every node it left alone has a reason."""
    skipped = [d for d in record.details if d.get("kind") == "skipped"]
    assert all(d.get("reason") for d in skipped)
    assert record.modified or skipped, (record.name, record.changes)


# --- opsets ----------------------------------------------------------------------------------------------------


def conv_matmul(opset: int) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv(8, 4x3x3) -> Relu -> GlobalAveragePool -> Flatten -> MatMul[8,8] -> Relu -> MatMul -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc1"),
        helper.make_node("Relu", ["m"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="head"),
    ]
    inits = [weights((8, 4, 3, 3), "w1"), weights((8,), "b1"), weights((8, 8), "w2"), weights((8, 4), "w3")]
    return build(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits, opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("recipe", RECIPES)
def test_conv_matmul_at_each_opset(tmp_path, opset, recipe):
    model = conv_matmul(opset)
    options = {"prune-nm": {"min_channels": 4}} if recipe == "sparse24" else None  # the default 64 would skip every layer
    result, feeds = optimize(model, tmp_path, recipe, pass_options=options)
    check_outputs(model, result, feeds, recipe)
    out = onnx.load(result.output_path)
    assert max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= opset
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 3
        assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    if recipe == "sparse24":
        record = last_record(result)
        applied_or_explained(record)
        assert record.changes["pruned"] >= 2  # conv (4 input channels) and fc1; the head is kept dense
        reasons = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
        assert "head" in reasons and "graph output" in reasons["head"]


# --- weights in Constant nodes ---------------------------------------------------------------------------------


def constant_weights() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["w"], name="w_const", value=weights((16, 8), "w")),
        helper.make_node("Constant", [], ["b"], name="b_const", value=weights((8,), "b")),
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    return build(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])


@pytest.mark.parametrize("recipe", ["cleanup", "w8a8"])
def test_weights_held_in_constant_nodes(tmp_path, recipe):
    model = constant_weights()
    result, feeds = optimize(model, tmp_path, recipe)
    check_outputs(model, result, feeds, recipe, lossy_tolerance=0.05)
    out = onnx.load(result.output_path)
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    assert result.records[0].changes["converted"] == 2
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 1


# --- control flow ----------------------------------------------------------------------------------------------


def if_and_loop() -> onnx.ModelProto:
    """y = If(flag, x @ Wa, x @ Wb) then a Loop of ``n`` steps h = relu(h @ Wl); the bodies hold Constants."""
    def branch(name, weight_name):
        return helper.make_graph(
            [helper.make_node("Constant", [], [weight_name], value=weights((8, 8), weight_name)),
             helper.make_node("MatMul", ["x", weight_name], [f"{name}_out"], name=f"{name}_mm")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 8])])

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "wl"], ["h_mm"], name="loop_mm"),
         helper.make_node("Relu", ["h_mm"], ["h_out"], name="loop_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 8])])
    nodes = [
        helper.make_node("If", ["flag"], ["branch"], name="if", then_branch=branch("then", "wa"),
                         else_branch=branch("else", "wb")),
        helper.make_node("MatMul", ["branch", "w0"], ["pre"], name="outer_mm"),
        helper.make_node("Constant", [], ["true"], name="true_const",
                         value=numpy_helper.from_array(np.array(True), "true")),
        helper.make_node("Loop", ["n", "true", "pre"], ["y"], name="loop", body=body),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("n", TensorProto.INT64, [])]
    return build(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                 [weights((8, 8), "w0"), weights((8, 8), "wl")])


def control_flow_feeds(count=4):
    r = rng()
    return [{"x": r.standard_normal((2, 8)).astype(np.float32), "flag": np.array(i % 2 == 0),
             "n": np.array(2, np.int64)} for i in range(count)]


@pytest.mark.parametrize("recipe", [*RECIPES, "int4-wo"])
def test_if_and_loop_subgraphs(tmp_path, recipe):
    model = if_and_loop()
    result, feeds = optimize(model, tmp_path, recipe, feeds=control_flow_feeds())
    check_outputs(model, result, feeds, recipe)  # both branches are taken among the feeds
    out = onnx.load(result.output_path)
    assert [n.op_type for n in out.graph.node if n.op_type in ("If", "Loop")] == ["If", "Loop"]
    if recipe != "cleanup":
        record = last_record(result)
        applied_or_explained(record)
        names = {d.get("node", d.get("tensor")) for d in record.details}
        assert {"outer_mm", "w0"} & names  # the main graph's MatMul was handled (quantized, pruned or skipped)
        subgraph_nodes = {"then_mm", "else_mm", "loop_mm"}
        reasons = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
        assert subgraph_nodes <= set(reasons), reasons
        assert all("subgraph" in reasons[name] for name in subgraph_nodes)


# --- integer, boolean and string inputs ------------------------------------------------------------------------


def typed_inputs() -> onnx.ModelProto:
    """ids (int64) -> Gather(embedding) -> MatMul -> Where(mask, ., 0) -> y; count (int32) -> Cast -> Mul."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
        helper.make_node("MatMul", ["e", "w"], ["m"], name="mm"),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask3"], name="unsq"),
        helper.make_node("Where", ["mask3", "m", "zero"], ["masked"], name="where"),
        helper.make_node("Cast", ["count"], ["count_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["masked", "count_f"], ["y"], name="scale"),
        helper.make_node("MatMul", ["ids", "int_w"], ["int_y"], name="int_mm"),
    ]
    inits = [weights((10, 8), "emb"), weights((8, 8), "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.arange(12, dtype=np.int64).reshape(3, 4), "int_w")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 3]),
              helper.make_tensor_value_info("count", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8]),
               helper.make_tensor_value_info("int_y", TensorProto.INT64, ["batch", 4])]
    return build(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("recipe", RECIPES)
def test_integer_and_boolean_inputs(tmp_path, recipe):
    model = typed_inputs()
    result, feeds = optimize(model, tmp_path, recipe)
    check_outputs(model, result, feeds, recipe)
    if recipe == "w8a8":
        record = last_record(result)
        assert record.changes["weights_quantized"] == 1
        reasons = {d["node"]: d["reason"] for d in record.details if d["kind"] == "skipped"}
        assert "int_mm" in reasons  # an integer MatMul is never quantized, and says so
    np.testing.assert_array_equal(run(result.output_path, feeds[0])[1], run(model, feeds[0])[1])


def string_input() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Identity", ["text"], ["norm"], name="pass_text"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    inputs = [helper.make_tensor_value_info("text", TensorProto.STRING, [3]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])]
    outputs = [helper.make_tensor_value_info("norm", TensorProto.STRING, [3]),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    return build(nodes, inputs, outputs, [weights((8, 8), "w")])


@pytest.mark.parametrize("recipe", ["cleanup", "w8a8"])
def test_string_inputs_do_not_crash(tmp_path, recipe):
    model = string_input()
    path = tmp_path / "s.onnx"
    onnx.save(model, path)
    # onnxruntime runs this model, so the recipe must too: probes and random calibration include string feeds
    result = optimize_file(str(path), tmp_path / "s.opt.onnx", recipe=recipe, progress=False)
    feed = {"text": np.array(["A", "b", "C"], dtype=object), "x": np.ones((2, 8), np.float32)}
    assert list(run(result.output_path, feed)[0]) == ["A", "b", "C"]
    assert result.unverified_reason is None  # lossless passes were verified, string input included
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 1


# --- dynamic and symbolic shapes -------------------------------------------------------------------------------


def dynamic_shapes() -> onnx.ModelProto:
    """x[batch, seq, 16] (symbolic) and z[?, 16] (unknown dim) -> MatMul, Reshape with -1, Softmax."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["m", "flat"], ["m2"], name="flatten"),
        helper.make_node("MatMul", ["m2", "w2"], ["m3"], name="proj2"),
        helper.make_node("Reshape", ["m3", "shape"], ["m4"], name="restore"),
        helper.make_node("Softmax", ["m4"], ["y"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["z", "w"], ["z_out"], name="z_proj"),
    ]
    inits = [weights((16, 16), "w"), weights((16, 16), "w2"),
             numpy_helper.from_array(np.array([-1, 16], np.int64), "flat")]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 16])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]), z]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16]),
               helper.make_tensor_value_info("z_out", TensorProto.FLOAT, [None, 16])]
    return build(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dynamic_and_symbolic_shapes(tmp_path, recipe):
    model = dynamic_shapes()
    result, _ = optimize(model, tmp_path, recipe)
    r = rng()
    other_shapes = [{"x": r.standard_normal((b, s, 16)).astype(np.float32),
                     "z": r.standard_normal((z, 16)).astype(np.float32)} for b, s, z in ((1, 7, 3), (3, 1, 5))]
    check_outputs(model, result, other_shapes, recipe, lossy_tolerance=0.1)
    out = onnx.load(result.output_path)
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 2  # w is shared by proj and z_proj


# --- torch exporters -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    module = Tiny().eval()
    example = torch.randn(2, 4, 8, 8)
    folder = tmp_path_factory.mktemp("torch")
    paths = {}
    paths["torchscript"] = folder / "torchscript.onnx"
    torch.onnx.export(module, (example,), str(paths["torchscript"]), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["x"], output_names=["y"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18,
                                verbose=False)
    paths["dynamo"] = folder / "dynamo.onnx"
    program.save(str(paths["dynamo"]))
    return paths, module, example


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("recipe", ["cleanup", "w8a8"])
def test_torch_exporters(tmp_path, torch_exports, exporter, recipe):
    paths, module, example = torch_exports
    model = load_model(paths[exporter])
    result, feeds = optimize(model, tmp_path, recipe, name=exporter)
    out = onnx.load(result.output_path)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    import torch

    expected = module(example).detach().numpy()
    actual = run(result.output_path, {"x": example.numpy()})[0]
    tolerance = 1e-4 if recipe == "cleanup" else 0.1 * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, atol=tolerance)
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 2
    assert torch.is_tensor(example)


# --- tf2onnx-style graphs --------------------------------------------------------------------------------------


def tf2onnx_style() -> onnx.ModelProto:
    """NHWC input, Transpose -> Conv -> Transpose pairs, Identity chains, Casts, ':0' tensor names."""
    nodes = [
        helper.make_node("Identity", ["input_1:0"], ["model/input_identity:0"], name="model/input_identity"),
        helper.make_node("Transpose", ["model/input_identity:0"], ["model/conv1/Conv2D__6:0"],
                         name="model/conv1/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["model/conv1/Conv2D__6:0", "model/conv1/kernel:0", "model/conv1/bias:0"],
                         ["model/conv1/BiasAdd:0"], name="model/conv1/BiasAdd", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["model/conv1/BiasAdd:0"], ["model/conv1/BiasAdd__8:0"],
                         name="model/conv1/BiasAdd__8", perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["model/conv1/BiasAdd__8:0"], ["model/conv1/Relu:0"], name="model/conv1/Relu"),
        helper.make_node("Transpose", ["model/conv1/Relu:0"], ["model/conv2/Conv2D__10:0"],
                         name="model/conv2/Conv2D__10", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["model/conv2/Conv2D__10:0", "model/conv2/kernel:0"], ["model/conv2/Conv2D:0"],
                         name="model/conv2/Conv2D"),
        helper.make_node("Transpose", ["model/conv2/Conv2D:0"], ["model/conv2/Conv2D__12:0"],
                         name="model/conv2/Conv2D__12", perm=[0, 2, 3, 1]),
        helper.make_node("Identity", ["model/conv2/Conv2D__12:0"], ["model/id1:0"], name="model/id1"),
        helper.make_node("Identity", ["model/id1:0"], ["model/id2:0"], name="model/id2"),
        helper.make_node("Cast", ["model/id2:0"], ["model/cast:0"], name="model/cast", to=TensorProto.FLOAT),
        helper.make_node("Shape", ["model/cast:0"], ["model/shape:0"], name="model/shape"),
        helper.make_node("Cast", ["model/shape:0"], ["model/shape_i32:0"], name="model/shape_cast",
                         to=TensorProto.INT32),
        helper.make_node("Cast", ["model/shape_i32:0"], ["model/shape_i64:0"], name="model/shape_back",
                         to=TensorProto.INT64),
        helper.make_node("Reshape", ["model/cast:0", "model/shape_i64:0"], ["Identity:0"], name="model/reshape"),
    ]
    inits = [weights((8, 4, 3, 3), "model/conv1/kernel:0"), weights((8,), "model/conv1/bias:0"),
             weights((8, 8, 1, 1), "model/conv2/kernel:0")]
    return build(nodes, [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__1", 8, 8, 4])],
                 [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__1", 8, 8, 8])], inits, 13)


@pytest.mark.parametrize("recipe", RECIPES)
def test_tf2onnx_style_graph(tmp_path, recipe):
    model = tf2onnx_style()
    result, feeds = optimize(model, tmp_path, recipe, name="tf")
    check_outputs(model, result, feeds, recipe)
    out = onnx.load(result.output_path)
    assert out.graph.input[0].name == "input_1:0" and out.graph.output[0].name == "Identity:0"
    if recipe == "w8a8":
        assert last_record(result).changes["weights_quantized"] == 2
    if recipe == "sparse24":
        applied_or_explained(last_record(result))


# --- external data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["cleanup", "w8a8"])
def test_external_data_model_round_trip(tmp_path, monkeypatch, recipe):
    """The >2 GB path with a small threshold: external data in, external data out, loads back equal."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 256)
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 64)
    model = conv_matmul(17)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source = tmp_path / "in" / "m.onnx"
    onnx.save_model(model_io._copy(model), str(source), save_as_external_data=True, location="m.weights",
                    size_threshold=64)
    feeds = generated_probe_feeds(model, count=4)
    output = tmp_path / "out" / "m.opt.onnx"
    result = optimize_file(str(source), output, recipe=recipe, calib=feeds, progress=False)
    assert result.unverified_reason is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.opt.onnx", "m.opt.onnx.data"]
    stored = onnx.load(str(output), load_external_data=False)
    external = [t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(e.value == "m.opt.onnx.data" for t in stored.graph.initializer
                            for e in t.external_data if e.key == "location")
    reloaded = load_model(output)
    again = tmp_path / "out" / "again.onnx"
    model_io.save_model(reloaded, again)
    assert load_model(again) == reloaded  # loads back equal after another save
    check_outputs(model, result, feeds, recipe, lossy_tolerance=0.1)
