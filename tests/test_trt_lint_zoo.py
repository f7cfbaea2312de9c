"""The TensorRT lint stays silent on the zoo models' TensorRT-form outputs (w8a8 int8, INT4, 2:4 sparse, MoE)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxsmith.analysis.trt_lint import lint_model
from onnxsmith.optimizer.pipeline import optimize_file


@pytest.mark.parametrize("model, recipe, options", [
    ("vit-digits", "w8a8", {"act_dtype": "int8"}),
    ("minilm", "w8a8", {"act_dtype": "int8"}),
    ("vit-digits", "sparse24", {}),
    ("vit-digits", "esparse24-w8a8", {}),
    ("minilm", "int4-wo", {"block_size": 64}),
    ("moe-tiny", "moe-w8a8", {"act_dtype": "int8", "kv_cache": "int8"}),
])
def test_lint_is_silent_on_tensorrt_outputs(model: str, recipe: str, options: dict, tmp_path: Path) -> None:
    result = optimize_file(f"zoo:{model}", tmp_path / "out.onnx", recipe=recipe, pass_options=options,
                           evaluate_model=False, progress=False)
    findings = [f for f in lint_model(onnx.load(result.output_path)) if f.severity != "info"]
    assert findings == []
    if result.trt_lint is not None:  # the run linted its own output the same way
        assert [f for f in result.trt_lint if f.severity != "info"] == []


def test_optimize_lints_tensorrt_recipes_only(tmp_path: Path) -> None:
    int8 = optimize_file("zoo:vit-digits", tmp_path / "a.onnx", recipe="w8a8", pass_options={"act_dtype": "int8"},
                         evaluate_model=False, progress=False)
    uint8 = optimize_file("zoo:vit-digits", tmp_path / "b.onnx", recipe="w8a8", evaluate_model=False, progress=False)
    assert int8.trt_lint == [] and uint8.trt_lint is None
    w4a8 = optimize_file("zoo:vit-digits", tmp_path / "c.onnx", recipe="w4a8", pass_options={"act_dtype": "int8"},
                         evaluate_model=False, progress=False)
    assert {f.rule for f in w4a8.trt_lint} >= {"qdq-blocked"}  # block 32 is not a TensorRT INT4 block
