"""Accuracy-driven mixed precision: target parsing, the search, the saved best model and the report."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsmith.core.errors import UserError
from onnxsmith.optimizer import mixed_precision
from onnxsmith.optimizer.cli import main
from onnxsmith.optimizer.mixed_precision import Target, search

LAYERS, WIDTH = 8, 32
OUTLIER_LAYERS = (2, 5)
"""Layers whose output has one channel 40x larger and no squashing activation after it, so the next layer's
per-tensor activation quantization is coarse (fc3 and fc6 are the sensitive layers)."""


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        if i in OUTLIER_LAYERS:
            w[:, 0] *= 40.0
        initializers.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        if i < LAYERS - 1:
            op = "Identity" if i in OUTLIER_LAYERS else "Tanh"
            nodes.append(helper.make_node(op, [f"m{i}"], [f"a{i}"], name=f"act{i}"))
        previous = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info(f"m{LAYERS - 1}", TensorProto.FLOAT, ["n", WIDTH])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def mlp(tmp_path):
    model_path, calib_path = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(_mlp(), model_path)
    np.savez(calib_path, x=np.random.default_rng(1).standard_normal((16, WIDTH)).astype(np.float32))
    return model_path, calib_path


@pytest.mark.parametrize("text, expected", [
    ("cos>=0.995", Target("cosine_mean", ">=", 0.995)),
    ("cosine_mean >= 0.995", Target("cosine_mean", ">=", 0.995)),
    ("ppl<=18", Target("perplexity", "<=", 18.0)),
    ("perplexity<=18.5", Target("perplexity", "<=", 18.5)),
    ("accuracy>=0.98", Target("accuracy", ">=", 0.98)),
    ("top1_agreement>=0.99", Target("top1_agreement", ">=", 0.99)),
    ("SQNR>=30", Target("sqnr", ">=", 30.0)),
    ("cosine_min>9e-1", Target("cosine_min", ">", 0.9)),
])
def test_target_expressions_parse(text, expected):
    assert Target.parse(text) == expected


@pytest.mark.parametrize("text", ["cos", "cos=0.99", "cos>=", "bleu>=30", "cos>=abc", ">=0.9", "cos>=0.9x", ""])
def test_bad_target_expressions_are_user_errors_naming_the_metrics(text):
    with pytest.raises(UserError) as info:
        Target.parse(text)
    message = str(info.value)
    assert "\n" not in message and "cosine_mean" in message and "perplexity" in message and "sqnr" in message


def test_target_direction():
    high, low = Target.parse("cos>=0.99"), Target.parse("ppl<=18")
    assert high.met(0.99) and not high.met(0.989) and high.better(0.995, 0.99)
    assert low.met(18) and not low.met(18.01) and low.better(17.0, 18.0)
    assert not high.met(float("nan")) and high.better(0.5, float("nan"))


def test_cli_bad_target_is_exit_2(mlp, capsys):
    model, calib = mlp
    assert main([str(model), "--recipe", "w8a8", "--calib", str(calib), "--target-metric", "bleu>=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cosine_mean" in err
    assert main([str(model), "--time-budget", "5"]) == 2  # a budget without a target


def test_zoo_metric_on_a_file_and_recipe_without_quantizer_are_user_errors(mlp, tmp_path):
    model, calib = mlp
    with pytest.raises(UserError, match="sqnr"):
        search(str(model), tmp_path / "o.onnx", "w8a8", "cos>=0.99", calib=str(calib))
    with pytest.raises(UserError, match="float"):
        search(str(model), tmp_path / "o.onnx", "cleanup", "sqnr>=30", calib=str(calib))
    assert not (tmp_path / "o.onnx").exists()


def test_sensitivity_ranking_puts_the_outlier_fed_layers_first(mlp, tmp_path):
    from onnxsmith.optimizer.pipeline import optimize_file

    model, calib = mlp
    result = optimize_file(str(model), tmp_path / "o.onnx", recipe="w8a8", calib=str(calib), evaluate_model=True,
                           progress=False)
    ranking = mixed_precision.sensitivity_ranking(result)
    assert {name for name, _ in ranking} == {f"fc{i}" for i in range(LAYERS)}
    assert {name for name, _ in ranking[:2]} == {f"fc{i + 1}" for i in OUTLIER_LAYERS}
    values = [value for _, value in ranking]
    assert values == sorted(values) and all(np.isfinite(values))


def test_search_meets_a_reachable_target_with_few_float_layers(mlp, tmp_path):
    model, calib = mlp
    output = tmp_path / "out.onnx"
    seen = []
    found = search(str(model), output, "w8a8", "sqnr>=40", calib=str(calib), progress=False, on_attempt=seen.append)
    assert found.target_met and found.metric >= 40 and found.stopped == "target met"
    assert 0 < len(found.excluded) < LAYERS
    assert seen == found.attempts and found.attempts[0].k == 0 and not found.attempts[0].met
    # the smallest passing k: one fewer float layer fails
    passing = sorted(a.k for a in found.attempts if a.met)
    assert passing[0] == len(found.excluded) and any(a.k == len(found.excluded) - 1 and not a.met
                                                     for a in found.attempts)
    assert output.exists() and found.result.output_path == output
    written = onnx.load(str(output))
    dequantized = {out for n in written.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    float_layers = {n.name for n in written.graph.node
                    if n.op_type == "MatMul" and not dequantized.intersection(n.input)}
    assert float_layers == set(found.excluded)  # exactly the excluded layers stay float, the others quantized
    assert not list(tmp_path.glob(".onnxsmith-mp-*"))  # the staging folder is gone


def test_unreachable_target_still_saves_the_best_model_and_reports_not_met(tmp_path, capsys):
    """vit-digits' FP32 accuracy is 0.991: accuracy>=0.999 cannot be met even with every layer float."""
    output, report = tmp_path / "vd.onnx", tmp_path / "rep"
    code = main(["zoo:vit-digits", "--recipe", "w8a8", "-o", str(output), "--report", str(report),
                 "--target-metric", "accuracy>=0.999"])
    assert code == 0
    err = capsys.readouterr().err
    assert "target NOT met" in err and f"(saved to {output})" in err and "attempt 2:" in err
    assert output.exists()
    data = json.loads((report / "report.json").read_text())
    mixed = data["mixed_precision"]
    assert mixed["target_met"] is False and mixed["stopped"] == "all layers float"
    assert mixed["value"] == max(a["metric"] for a in mixed["attempts"]) < 0.999
    assert mixed["attempts"][-1]["k"] == mixed["quantized_layers"]
    assert data["output"] == str(output) and "## Mixed precision" in (report / "report.md").read_text()
    # the best (highest accuracy) attempt with the fewest float layers is the saved one
    best_k = min(a["k"] for a in mixed["attempts"] if a["metric"] == mixed["value"])
    assert mixed["float_layers"] == best_k


def test_tiny_time_budget_stops_after_the_first_attempt_and_saves_it(mlp, tmp_path):
    model, calib = mlp
    output = tmp_path / "out.onnx"
    found = search(str(model), output, "w8a8", "sqnr>=40", calib=str(calib), time_budget=1e-3, progress=False)
    assert len(found.attempts) == 1 and found.stopped == "time budget"
    assert not found.target_met and found.excluded == [] and output.exists()
    assert "target NOT met (time budget)" in found.verdict()
