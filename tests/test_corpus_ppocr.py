"""The PaddleOCR text detector (PP-OCRv4 det, shipped in rapidocr-onnxruntime) through ``ptq-sl``, as a user runs
it: no calibration data, so verification and calibration use generated inputs whose 2 x 2 images make the
detector's top-down Adds broadcast, which symbolic shape inference denies. The run must finish and the output
must detect on real-sized images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from onnxsmith.models import corpus
from onnxsmith.optimizer.cli import main


def test_ptq_sl_on_ppocr_v4_det_without_calibration_completes_and_runs(tmp_path, capsys):
    source = corpus.fetch("ppocr-v4-det")
    out = tmp_path / "det.opt.onnx"
    report = tmp_path / "report"
    report.mkdir()
    assert main([str(source), "--recipe", "ptq-sl", "-o", str(out), "--report", str(report), "-q"]) == 0
    records = {r["name"]: r for r in json.loads((report / "report.json").read_text())["passes"]}
    shapes = records["shape-inference"]
    assert shapes["skipped"] is None
    assert shapes["fallback"] == "onnx shapes" or shapes["changes"].get("value_info_relaxed")
    assert records["ptq-qdq"]["changes"]["layers_quantized"] > 50
    model = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 50
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feed in corpus.evaluation_feeds("ppocr-v4-det", 2):
        (expected,), (actual,) = reference.run(None, feed), candidate.run(None, feed)
        assert actual.shape == expected.shape == (1, 1, 320, 320) and np.isfinite(actual).all()
        assert 0 <= actual.min() and actual.max() <= 1  # a probability map
