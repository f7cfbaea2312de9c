"""MoE and KV cache: moe-tiny perplexity and routing agreement, naive W8A8 against expert-aware, ± int8 KV cache.

Usage: ``python benchmarks/moe.py [--forms dense,dispatch] [--methods a,b] [--out PATH] [--quick]`` (``--quick``:
the dispatch form, rows fp32, ort-static, naive-w8a8 and moe-w8a8)

Claims under test (../shared/METHODS.md, Hunyuan-Large): calibrating each expert on its routed tokens and keeping
the router float keeps the top-1 routing and the perplexity of a MoE decoder closer to FP32 than naive W8A8
(statistics over every token, router quantized); an int8 KV cache quantized at the producing layer costs little
more; GQA + cross-layer attention + int8 shrink the KV cache per token (Hunyuan-Large: GQA 8/80 x CLA 1/2 =
1/20 of MHA).

One run, the same data for every row. Each export form is its own zoo model with the same trained weights:
``dense`` = ``moe-tiny-dense`` (every expert computes every token, masked by a one-hot gate: an exporter's naive
form, whose per-tensor statistics mix tokens routed elsewhere into each expert) and ``dispatch`` = ``moe-tiny``
(real per-token dispatch: NonZero / Gather / ScatterElements). Every row quantizes the cached FP32 zoo model
(``zoo_model_path``, never written), calibrates on ``calibration_feeds()`` (16 windows x 128 bytes) and is scored
on ``evaluation_feeds()`` (32 windows x 128 bytes, prefill with an empty cache) against the FP32 outputs:
``perplexity`` (next-byte, lower is better), ``top1_agreement`` (argmax byte unchanged) and
``routing_agreement`` (fraction of (token, MoE layer) pairs whose top-1 expert is unchanged) and the logits'
SQNR in dB (higher is better; finer than perplexity when the rows are close), as the ``optimize`` report computes
them. Rows (``--methods``):

- ``fp32``: the reference itself;
- ``ort-static``: anchor, onnxruntime ``quantize_static`` (QDQ, MatMul only, per-channel QInt8 weights, QUInt8
  activations, MinMax, no output QDQ on MatMul): statistics over every token, router quantized;
- ``naive-w8a8``: recipe ``w8a8`` (``int8-qdq``, minmax, uint8): the same naive scheme in onnxsmith;
- ``aware-router-int8``: recipe ``moe-w8a8`` with ``quantize_router=True`` (expert-aware statistics only);
- ``moe-w8a8``: recipe ``moe-w8a8`` (expert-aware statistics, router float, fallback for experts under 32 tokens);
- ``moe-w8a8+kv``: ``moe-w8a8`` with ``--kv-cache int8`` (per-tensor scales);
- ``moe-w8a8+kv-head``: the same with per-head scales;
- ``naive-w8a8+kv``: ``w8a8``'s passes with ``kv-cache-qdq`` (per-tensor int8) before ``int8-qdq``;
- ``naive-w8a8@1win``, ``moe-w8a8@1win``, ``moe-w8a8-shared@1win``: calibrated on one window (128 tokens), so
  some experts get fewer than ``min_expert_tokens`` (32) tokens: ``moe-w8a8`` falls back to weight-only for them,
  ``-shared`` to the MoE input's scale for their entry GEMMs.

Per row: status (a failing row is recorded and the run goes on), the three figures, the quantization wall time
(``optimize_file`` without evaluation, or the onnxruntime call) and, for onnxsmith rows, the experts that fell
back and the fewest calibration tokens an expert got.

KV cache bytes per token (second table, ``moe-tiny``'s configuration, 16-bit elements): the MHA equivalent
(every query head stores K and V in every layer), GQA (KV heads only), GQA + CLA (only the layers that own K/V)
and GQA + CLA + int8 (one byte per element; the calibrated scales are constants, not per token). The GQA + CLA
figure is also measured: the elements of the ``present_*`` outputs of the exported model after a 128-byte
prefill, per token. The anchor row is Hunyuan-Large's ratio from its head counts and CLA factor.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxruntime.quantization import CalibrationMethod, QuantType

from harness import Benchmark, Report, fmt, markdown_table, one_line, optimize_model, ort_static_qdq, parse_names
from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.models import moe_tiny
from onnxsmith.models.zoo import get_zoo_model, zoo_model_path
from onnxsmith.optimizer.evaluation import Evaluation, evaluate

FORMS = {"dense": "moe-tiny-dense", "dispatch": "moe-tiny"}
NAIVE_KV = "naive-kv.toml"


@dataclass(frozen=True)
class Method:
    """An onnxsmith row: recipe, pass options and how many calibration windows (None: the zoo's 16)."""

    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    windows: int | None = None


FEW = 1
"""Calibration windows of the few-token rows (128 tokens for 4 experts per layer)."""
METHODS: dict[str, Method | None] = {
    "fp32": None,
    "ort-static": None,
    "naive-w8a8": Method("w8a8"),
    "aware-router-int8": Method("moe-w8a8", {"quantize_router": True}),
    "moe-w8a8": Method("moe-w8a8"),
    "moe-w8a8+kv": Method("moe-w8a8", {"kv_cache": "int8"}),
    "moe-w8a8+kv-head": Method("moe-w8a8", {"kv_cache": "int8", "granularity": "per-head"}),
    "naive-w8a8+kv": Method(NAIVE_KV),
    "naive-w8a8@1win": Method("w8a8", windows=FEW),
    "moe-w8a8@1win": Method("moe-w8a8", windows=FEW),
    "moe-w8a8-shared@1win": Method("moe-w8a8", {"expert_fallback": "shared-scale"}, windows=FEW),
}
HUNYUAN_QUERY_HEADS, HUNYUAN_KV_HEADS, HUNYUAN_CLA = 80, 8, 2
"""Hunyuan-Large's attention (../shared/METHODS.md): 80 query heads, 8 KV heads, CLA share factor 2."""


@dataclass
class Row:
    """One quantized model's figures."""

    form: str
    method: str
    status: str = "ok"
    perplexity: float | None = None
    perplexity_fp: float | None = None
    top1_agreement: float | None = None
    routing_agreement: float | None = None
    logits_sqnr_db: float | None = None
    quant_seconds: float | None = None
    experts_fallback: int | None = None
    expert_tokens_min: int | None = None
    notes: list[str] = field(default_factory=list)


def naive_kv_recipe(folder: Path) -> Path:
    """A recipe file: ``w8a8``'s passes with ``kv-cache-qdq`` (per-tensor int8) before ``int8-qdq``."""
    path = folder / NAIVE_KV
    path.write_text('description = "w8a8 plus an int8 KV cache"\n'
                    'passes = ["constants-to-initializers", "shape-inference", "constant-folding", '
                    '"remove-dead-nodes", "shape-inference", "kv-cache-qdq", "int8-qdq"]\n')
    return path


def fill(row: Row, evaluation: Evaluation) -> None:
    """Copy the evaluation's figures into ``row``."""
    row.perplexity = evaluation.metrics["perplexity"]
    row.perplexity_fp = evaluation.metrics["perplexity_fp"]
    row.top1_agreement = evaluation.metrics["top1_agreement"]
    row.routing_agreement = evaluation.routing_agreement
    row.logits_sqnr_db = evaluation.output_sqnr_db["logits"]


def run_row(form: str, method: str, workdir: Path) -> Row:
    """Quantize and score one (form, method) pair; errors become the row's status."""
    row = Row(form, method)
    zoo = get_zoo_model(FORMS[form])
    source = zoo_model_path(zoo.name)
    output = workdir / f"{form}-{method}.onnx"
    try:
        start = time.perf_counter()
        if method == "fp32":
            output = source
        elif method == "ort-static":  # onnxruntime writes files beside its input: give it a copy
            copy = shutil.copy(source, workdir / f"{form}-fp32.onnx")
            ort_static_qdq(Path(copy), output, zoo.calibration_feeds(), ["MatMul"], CalibrationMethod.MinMax,
                           QuantType.QInt8)
        else:
            spec = METHODS[method]
            recipe = str(naive_kv_recipe(workdir)) if spec.recipe == NAIVE_KV else spec.recipe
            result = optimize_model(f"zoo:{zoo.name}", output, recipe, zoo.calibration_feeds(spec.windows),
                                    spec.options, verify=True)
            moe_records = [r for r in result.records if r.name == "moe-qdq"]
            if moe_records:
                row.experts_fallback = moe_records[0].changes.get("experts_fallback")
                row.expert_tokens_min = moe_records[0].changes.get("expert_tokens_min")
        row.quant_seconds = None if method == "fp32" else time.perf_counter() - start
        fill(row, evaluate(source, output, zoo.evaluation_feeds(), zoo, latency_runs=1, progress=False))
    except Exception as exc:  # noqa: BLE001 - a failing row is recorded, the run goes on
        row.status = f"error: {one_line(exc)}"
    return row


def kv_bytes_table() -> list[dict[str, Any]]:
    """KV-cache bytes per token of moe-tiny's configurations, one measured, with Hunyuan-Large's ratio."""
    layers, heads, kv_heads = moe_tiny.LAYERS, moe_tiny.QUERY_HEADS, moe_tiny.KV_HEADS
    owners = layers // moe_tiny.CLA_SHARE
    per_head = 2 * moe_tiny.HEAD_DIM  # K and V elements of one head, one layer, one token
    measured = measured_cache_elements_per_token()
    rows = [("MHA equivalent", layers * heads * per_head, 2), ("GQA", layers * kv_heads * per_head, 2),
            ("GQA + CLA", owners * kv_heads * per_head, 2), ("GQA + CLA + int8", owners * kv_heads * per_head, 1)]
    mha = rows[0][1] * rows[0][2]
    table = [{"config": name, "elements_per_token": elements, "bytes_per_token": elements * width,
              "fraction_of_mha": elements * width / mha} for name, elements, width in rows]
    table[2]["measured_elements_per_token"] = measured
    ratio = HUNYUAN_KV_HEADS / HUNYUAN_QUERY_HEADS / HUNYUAN_CLA
    table.append({"config": "anchor: Hunyuan-Large GQA + CLA (80 / 8 heads, CLA 2)", "fraction_of_mha": ratio})
    table.append({"config": "anchor: Hunyuan-Large GQA + CLA + 8-bit cache", "fraction_of_mha": ratio / 2})
    return table


def measured_cache_elements_per_token() -> float:
    """Elements of the exported model's ``present_*`` outputs per token after a 128-byte prefill."""
    zoo = get_zoo_model("moe-tiny")
    feed = zoo.evaluation_feeds(1)[0]
    outputs = run_session(create_session(zoo_model_path(zoo.name)), feed)
    tokens = feed["input_ids"].shape[1]
    return sum(value.size for name, value in outputs.items() if name.startswith("present")) / tokens


def _fmt(value: float | None, digits: int) -> str:
    return fmt(value, digits, "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forms", default="dense,dispatch", help="export forms: dense, dispatch")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"rows, from {list(METHODS)}")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.forms = parse_names(parser, args.forms, list(FORMS), "forms")
    args.methods = parse_names(parser, args.methods, list(METHODS), "methods")


def run(args: argparse.Namespace, report: Report) -> None:
    document = report.document
    rows: list[Row] = []
    document["rows"] = rows
    with tempfile.TemporaryDirectory(prefix="onnxsmith-moe.") as tmp, contextlib.chdir(tmp):
        # onnxruntime's quantizer also writes into the working directory
        for form in args.forms:
            for method in args.methods:
                row = run_row(form, method, Path(tmp))
                rows.append(row)
                print(f"{form:8} {method:18} {row.status:8} ppl {_fmt(row.perplexity, 3)} "
                      f"routing {_fmt(row.routing_agreement, 4)}", file=sys.stderr, flush=True)
                report.save()
    headers = ["form", "method", "status", "perplexity", "Δ vs FP32", "top-1 agr.", "routing agr.", "logits SQNR dB",
               "quant s", "fallback experts", "min expert tokens"]
    table = [[r.form, r.method, r.status, _fmt(r.perplexity, 3),
              _fmt(None if r.perplexity is None else r.perplexity - r.perplexity_fp, 3),
              _fmt(r.top1_agreement, 4), _fmt(r.routing_agreement, 4), _fmt(r.logits_sqnr_db, 1),
              _fmt(r.quant_seconds, 1),
              "-" if r.experts_fallback is None else str(r.experts_fallback),
              "-" if r.expert_tokens_min is None else str(r.expert_tokens_min)] for r in rows]
    print(markdown_table(headers, table))
    kv = kv_bytes_table()
    document["kv_cache"] = kv
    print()
    print(markdown_table(["KV cache", "elements / token", "bytes / token", "fraction of MHA", "measured"],
                         [[r["config"], str(r.get("elements_per_token", "-")), str(r.get("bytes_per_token", "-")),
                           f"{r['fraction_of_mha']:.4f} (1/{1 / r['fraction_of_mha']:.0f})",
                           str(r.get("measured_elements_per_token", "-"))] for r in kv]))
    report.finish("perplexity: next-byte, 32 x 128 pydoc bytes; agreements vs FP32 on the same windows")


main = Benchmark("moe", __doc__, run, add_arguments, check_arguments,
                 quick={"forms": "dispatch", "methods": "fp32,ort-static,naive-w8a8,moe-w8a8"}).main

if __name__ == "__main__":
    sys.exit(main())
