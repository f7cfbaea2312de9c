"""``onnxsmith.optimize`` / ``export_and_optimize``: every model form, the exporter fallback, files, errors."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxsmith
from onnxsmith.core.errors import UserError

RNG = np.random.default_rng(0)


def small_model() -> onnx.ModelProto:
    """Y = X @ W + (B1 + B2), W in a Constant node, plus a dead Relu: cleanup leaves MatMul and Add."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    b1 = numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "b1")
    b2 = numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Constant", [], ["W"], value=w),
        helper.make_node("MatMul", ["X", "W"], ["mm"]),
        helper.make_node("Add", ["b1", "b2"], ["b"]),
        helper.make_node("Add", ["mm", "b"], ["Y"]),
        helper.make_node("Relu", ["X"], ["dead"]),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])], [b1, b2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 8)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_path_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, model = tmp_path / "in.onnx", small_model()
    onnx.save(model, path)
    before = path.read_bytes()
    out = onnxsmith.optimize(str(path))
    assert out.path is None and out.report.output_path is None
    assert out.report.input_path == path and out.report.source == str(path)
    assert op_types(out.model) == ["MatMul", "Add"]
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out.model, {"X": x})[0], run(model, {"X": x})[0], rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]  # no IN.opt.onnx beside the input, nothing in the cwd
    assert path.read_bytes() == before
    assert out.report.as_dict()["output"] is None and out.report.as_dict()["exporter"] is None


def test_modelproto_input_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = small_model()
    before = model.SerializeToString()
    out = onnxsmith.optimize(model, "cleanup")
    assert model.SerializeToString() == before
    assert op_types(out.model) == ["MatMul", "Add"] and out.model is not model
    assert out.report.input_path is None and out.report.source == "<onnx.ModelProto>"
    assert [r.name for r in out.report.records][:1] == ["constants-to-initializers"]
    data = out.report.as_dict()
    assert data["input"] is None and data["passes"] and data["verification"].startswith("every lossless pass")
    assert json.loads(json.dumps(data)) == data  # JSON-ready
    assert os.listdir(tmp_path) == []


def test_torch_module_cleanup_matches_torch(tmp_path, monkeypatch, mlp):
    monkeypatch.chdir(tmp_path)
    module, x = mlp
    out = onnxsmith.optimize(module, example_inputs=x, input_names=["x"])
    assert out.report.exporter in ("dynamo", "torchscript")
    assert out.report.as_dict()["exporter"] == out.report.exporter
    assert out.report.source == "<torch module MLP>" and out.report.input_path is None
    expected = module(x).detach().numpy()
    np.testing.assert_allclose(run(out.model, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path) == []


def test_torch_module_w8a8_with_calibration_feeds(tmp_path, monkeypatch, mlp):
    monkeypatch.chdir(tmp_path)
    module, x = mlp
    feeds = [{"x": torch.randn(4, 8)} for _ in range(8)]  # torch tensors in feeds are accepted
    out = onnxsmith.export_and_optimize(module, (x,), "w8a8", feeds, input_names=["x"])
    assert out.model.graph.node and "QuantizeLinear" in op_types(out.model)
    assert out.report.records[-1].name == "int8-qdq"
    assert out.report.records[-1].changes["weights_quantized"] == 2
    expected = module(x).detach().numpy()
    actual = run(out.model, {"x": x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=0.1 * np.abs(expected).max())
    assert not np.array_equal(actual, expected)  # quantized: not bit-exact
    assert os.listdir(tmp_path) == []


def test_torch_default_calibration_is_the_example_inputs(tmp_path, monkeypatch, mlp, caplog):
    monkeypatch.chdir(tmp_path)
    module, x = mlp
    with caplog.at_level(logging.WARNING):
        out = onnxsmith.optimize(module, "w8a8", example_inputs=x, input_names=["x"])
    assert "QuantizeLinear" in op_types(out.model)
    assert "example inputs only" in caplog.text
    assert "NO CALIBRATION DATA" not in caplog.text  # not the random-input fallback


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, monkeypatch, mlp, caplog):
    monkeypatch.chdir(tmp_path)
    module, x = mlp
    real_export = torch.onnx.export
    calls = []

    def export(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        if dynamo:
            raise RuntimeError("dynamo cannot trace this\nsecond line of the trace")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    with caplog.at_level(logging.INFO, logger="onnxsmith.api"):
        out = onnxsmith.optimize(module, example_inputs=x, input_names=["x"])
    assert calls == [True, False]
    assert out.report.exporter == "torchscript" and out.report.as_dict()["exporter"] == "torchscript"
    fallback = [r for r in caplog.records if "falling back to the TorchScript exporter" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].levelno == logging.INFO
    assert "dynamo cannot trace this" in fallback[0].getMessage()
    assert "second line" not in fallback[0].getMessage()
    np.testing.assert_allclose(run(out.model, {"x": x.numpy()})[0], module(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path) == []


def test_both_exporters_failing_is_a_user_error(monkeypatch, mlp):
    module, x = mlp

    def export(*args, dynamo=True, **kwargs):
        raise RuntimeError(f"{'dynamo' if dynamo else 'torchscript'} broke\ndetails")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(UserError, match="dynamo exporter: dynamo broke; TorchScript exporter: torchscript broke") as info:
        onnxsmith.optimize(module, example_inputs=x)
    assert "\n" not in str(info.value)


def test_output_is_written_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "small.opt.onnx"
    real_replace = os.replace
    replaced = []

    def replace(src, dst, *args, **kwargs):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    out = onnxsmith.optimize(small_model(), output=target)
    assert out.path == target and out.report.output_path == target
    assert out.report.as_dict()["output"] == str(target)
    # staged in a temporary folder beside the target, then renamed into place
    assert any(dst == target and src.parent.parent == folder and src != target for src, dst in replaced)
    assert sorted(os.listdir(folder)) == ["small.opt.onnx"]
    assert onnx.load(target).SerializeToString() == out.model.SerializeToString()
    assert os.listdir(tmp_path) == ["out"]


def test_zoo_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = onnxsmith.optimize("zoo:vit-digits", "cleanup")
    assert out.path is None and out.report.source == "zoo:vit-digits"
    assert out.report.input_path is not None and out.report.input_path.exists()  # the zoo's cached export
    assert out.report.evaluation is not None and out.report.evaluation.metrics["top1_agreement"] == 1.0
    assert len(out.model.graph.node) > 0
    assert os.listdir(tmp_path) == []  # no ./vit-digits.opt.onnx


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x: onnxsmith.optimize(m), "needs example_inputs"),
        (lambda m, x: onnxsmith.optimize(m, example_inputs=[1, 2]), "must be a tensor or a tuple of tensors"),
        (lambda m, x: onnxsmith.optimize(m, "no-such-recipe", example_inputs=x), "unknown recipe 'no-such-recipe'"),
        (lambda m, x: onnxsmith.optimize({"not": "a model"}), "cannot optimize a dict"),
        (lambda m, x: onnxsmith.optimize(42), "cannot optimize a int"),
        (lambda m, x: onnxsmith.optimize(small_model(), example_inputs=x), "apply to torch modules only"),
        (lambda m, x: onnxsmith.optimize(small_model(), calibration=3), "calibration must be a path or an iterable"),
        (lambda m, x: onnxsmith.export_and_optimize(small_model(), x), "needs a torch.nn.Module"),
        (lambda m, x: onnxsmith.optimize("missing.onnx"), "model file not found"),
        (lambda m, x: onnxsmith.optimize(m, example_inputs=x, output="no/such/folder/m.onnx"), "output folder does not"),
    ],
)
def test_bad_inputs_raise_user_error(tmp_path, monkeypatch, mlp, call, message):
    monkeypatch.chdir(tmp_path)
    module, x = mlp
    with pytest.raises(UserError, match=message) as info:
        call(module, x)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_import_is_lazy():
    code = ("import sys, onnxsmith; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'onnxsmith.api' not in sys.modules, 'api'; "
            "assert {'optimize', 'export_and_optimize'} <= set(onnxsmith.__all__); "
            "assert callable(onnxsmith.optimize) and 'onnxsmith.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    with pytest.raises(AttributeError):
        onnxsmith.no_such_name  # noqa: B018
