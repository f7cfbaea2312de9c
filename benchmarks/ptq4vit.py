"""PTQ4ViT ablation: onnxruntime's static quantizer and onnxsmith's PTQ methods at W8A8, W6A6 and W4A8.

Usage: ``python benchmarks/ptq4vit.py [--models a,b] [--bits W,A ...] [--methods a,b] [--skip-latency]
[--json PATH] [--quick]`` (``--quick``: vit-digits at W8A8, no latency)

For each zoo model (``vit-digits``, ``minilm``), each bit setting (weight bits, activation bits) and each method,
the cached FP32 model (``zoo_model_path(name)``, copied into a temporary folder) is quantized in this process with
the same 32 calibration samples and scored on the same evaluation set:

- ``vit-digits``: calibration ``VitDigits().calibration_feeds(4)`` (4 batches x 8 training images); evaluation the
  450 test images of ``evaluation_feeds()``; figures top-1 accuracy and top-1 agreement with FP32 (``score``);
- ``minilm``: calibration ``MiniLM().calibration_feeds(32)`` (32 batch-1 sentences); evaluation the 100 sentences
  of ``evaluation_feeds()``; figures mean and min cosine of the sentence embeddings vs FP32 (``score``).

The methods (``METHODS``; a method that has no form at a bit setting gives an ``n/a`` row with the reason, one
that raises gives an ``error`` row with the exception's first line, and the run goes on):

- ``ort-static-best``: onnxruntime ``quantize_static``, QDQ, per-channel weights (QInt8 at 8 bits, QInt4 at 4),
  QUInt8 activations, no Q/DQ on MatMul outputs, MatMul only (MiniLM) or Conv/Gemm/MatMul (vit-digits), once per
  calibrator MinMax, Entropy and Percentile; the row is the best by the model's main figure and names the winner
  (all three are in the JSON). MiniLM's sentences are padded to the longest one for onnxruntime (its histogram
  calibrators crash on varying lengths; ``attention_mask`` 0 on padding), as in ``w8a8_minilm.py``;
- ``onnxsmith-w8a8``: the ``w8a8`` recipe, calibrator ``minmax`` (W8A8 only);
- ``onnxsmith-minmax-k``: ``base-ptq`` with ``rounds=0``: max-based steps at k bits, no search;
- ``base-ptq``: ``base-ptq`` (cosine search metric, no twin-uniform);
- ``hessian-only``: ``ptq4vit`` with ``twin=False``;
- ``twin-only``: ``base-ptq`` with ``twin=True``;
- ``ptq4vit``: ``ptq4vit`` (Hessian-guided metric + twin-uniform, fake-quant form);
- ``ptq4vit-dual-gemm``: ``ptq4vit`` with ``twin_form="dual-gemm"`` (W8A8 only), the same quantization in
  another graph form: its figures must equal ``ptq4vit``'s. The script reports their differences and the largest
  output difference, as deployed and with onnxruntime's graph optimizations off (``form_check`` in the JSON).

The quantization time is the wall time of the quantization call alone (imports and data preparation excluded).
Latency (skipped with ``--skip-latency``) compares FP32, ``onnxsmith-w8a8``, ``ptq4vit`` and
``ptq4vit-dual-gemm`` at W8A8 on onnxruntime CPU, all graph optimizations on, one session configuration: the
models run interleaved round by round and the ratio is the median of per-round model / FP32 times
(``harness.interleaved_latency``). Inputs: 32 test images for vit-digits; batch 1 x 64 and 32 x 64 tokens of
pydoc prose for MiniLM (``harness.minilm_latency_feeds``, as ``w8a8_minilm.py``).

Results go to stdout (markdown tables) and to ``--json`` / ``--out`` (default ``benchmarks/results/ptq4vit.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import (
    MODEL_SPECS,
    ORT_ACTIVATION_TYPES,
    ORT_CALIBRATORS,
    ORT_WEIGHT_TYPES,
    Attempt,
    Benchmark,
    Bits,
    ModelData,
    ModelSpec,
    NotApplicable,
    Quantizer,
    Report,
    Variant,
    bits_label,
    fmt,
    interleaved_latency,
    markdown_table,
    note_of,
    onnxsmith_variant,
    ort_static_qdq,
    parse_names,
    prepare_model,
    run_in_folder,
)
from onnxruntime.quantization import CalibrationMethod, QuantType

BIT_SETTINGS: tuple[Bits, ...] = ((8, 8), (6, 6), (4, 8))
W8A8: Bits = (8, 8)
LATENCY_METHODS = ("onnxsmith-w8a8", "ptq4vit", "ptq4vit-dual-gemm")
"""Methods whose W8A8 models are timed against FP32."""
FORM_CHECK = ("ptq4vit", "ptq4vit-dual-gemm")
"""Two graph forms of one quantization: their figures must be equal."""
FORM_TOLERANCE = 1e-4
"""Largest figure difference (absolute) still counted as equal fidelity for :data:`FORM_CHECK`."""
MODELS: dict[str, ModelSpec] = {name: MODEL_SPECS[name] for name in ("vit-digits", "minilm")}


# ----------------------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    """One row of the comparison: ``variants(bits)`` lists its quantization calls (the best one makes the row)
    or raises :class:`NotApplicable`."""

    name: str
    description: str
    variants: Callable[[Bits], list[Variant]]


def ort_static(calibrator: CalibrationMethod, weight_type: QuantType) -> Quantizer:
    """onnxruntime ``quantize_static``: QDQ, per-channel ``weight_type`` weights, QUInt8 activations, the model's
    op types, no Q/DQ on MatMul outputs."""

    def quantize(data: ModelData, output: Path) -> None:
        ort_static_qdq(data.fp32, output, data.ort_calibration, data.spec.ort_op_types, calibrator, weight_type)

    return quantize


def ort_variants(bits: Bits) -> list[Variant]:
    """One ``quantize_static`` call per calibrator in ``ORT_CALIBRATORS``."""
    weight_bits, activation_bits = bits
    for kind, count, types in (("weight", weight_bits, ORT_WEIGHT_TYPES),
                               ("activation", activation_bits, ORT_ACTIVATION_TYPES)):
        if count not in types:
            raise NotApplicable(f"onnxruntime has no {count}-bit {kind} type")
    weight_type = ORT_WEIGHT_TYPES[weight_bits]
    return [Variant(label, {"calibrate_method": calibrator.name, "weight_type": weight_type.name,
                            "activation_type": "QUInt8"}, ort_static(calibrator, weight_type))
            for label, calibrator in ORT_CALIBRATORS.items()]


def onnxsmith_variants(recipe: str, only: Bits | None = None, **options: Any) -> Callable[[Bits], list[Variant]]:
    """One onnxsmith call with ``wbits``/``abits`` set from the bit setting plus ``options`` (``ptq-qdq``'s own
    options; the alias names ``twin`` and ``twin_form`` too).

    ``only`` restricts the method to one setting (the other settings are not applicable).
    """

    def variants(bits: Bits) -> list[Variant]:
        if only is not None and bits != only:
            raise NotApplicable(f"{bits_label(only)} only")
        pass_options: dict[str, Any] = {"wbits": bits[0], "abits": bits[1]}
        if options:
            pass_options["ptq-qdq"] = dict(options)
        return [onnxsmith_variant(recipe, pass_options)]

    return variants


def onnxsmith_w8a8_variants(bits: Bits) -> list[Variant]:
    """The ``w8a8`` recipe with the ``minmax`` calibrator; 8-bit only."""
    if bits != W8A8:
        raise NotApplicable("the w8a8 recipe is 8-bit only")
    return [onnxsmith_variant("w8a8", {"calibrator": "minmax"})]


METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("ort-static-best", "onnxruntime quantize_static QDQ, per-channel weights, QUInt8 activations; best "
               "of MinMax, Entropy, Percentile", ort_variants),
        Method("onnxsmith-w8a8", "onnxsmith recipe w8a8, calibrator minmax", onnxsmith_w8a8_variants),
        Method("onnxsmith-minmax-k", "onnxsmith base-ptq, rounds=0: max-based steps, no search",
               onnxsmith_variants("base-ptq", rounds=0)),
        Method("base-ptq", "onnxsmith base-ptq: cosine search metric, no twin-uniform",
               onnxsmith_variants("base-ptq")),
        Method("hessian-only", "onnxsmith ptq4vit, twin=False: Hessian-guided metric only",
               onnxsmith_variants("ptq4vit", twin=False)),
        Method("twin-only", "onnxsmith base-ptq, twin=True: twin-uniform only",
               onnxsmith_variants("base-ptq", twin=True)),
        Method("ptq4vit", "onnxsmith ptq4vit: Hessian-guided metric + twin-uniform (fake-quant form)",
               onnxsmith_variants("ptq4vit")),
        Method("ptq4vit-dual-gemm", "onnxsmith ptq4vit, twin_form=dual-gemm (must equal ptq4vit)",
               onnxsmith_variants("ptq4vit", only=W8A8, twin_form="dual-gemm")),
    ]
}


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Row:
    """One (model, bits, method) result: ``status`` ``ok``, ``n/a`` or ``error``.

    For ``ok`` the row's ``scores`` and ``seconds`` are those of its best attempt (``best``); ``attempts`` holds
    every variant that was run.
    """

    model: str
    bits: str
    method: str
    status: str = "ok"
    note: str = ""
    best: str | None = None
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)


def measure(method: Method, bits: Bits, data: ModelData, workdir: Path) -> tuple[Row, Path | None]:
    """Run every variant of ``method`` at ``bits`` and keep the best; returns the row and the best model's file.

    Only the best variant's model is kept on disk (``None`` when no variant succeeded or none applies).
    """
    row = Row(data.spec.name, bits_label(bits), method.name)
    try:
        variants = method.variants(bits)
    except NotApplicable as reason:
        row.status, row.note = "n/a", str(reason)
        return row, None
    outputs: dict[str, Path] = {}
    for variant in variants:
        print(f"  {row.model} {row.bits} {method.name} {variant.label}", file=sys.stderr, flush=True)
        attempt, outputs[variant.label] = run_in_folder(variant, data, workdir,
                                                        f"{row.bits}-{method.name}-{variant.label}")
        row.attempts.append(attempt)
    choose_best(row, data)
    for label, path in outputs.items():
        if label != row.best:
            path.unlink(missing_ok=True)
    return row, outputs.get(row.best) if row.best else None


def choose_best(row: Row, data: ModelData) -> None:
    """Fill ``row`` from its best ``ok`` attempt (ties go to the first); with none, the row is an error.

    With several variants the note names the winner (and those tied with it) and any failed variants.
    """
    succeeded = [attempt for attempt in row.attempts if attempt.status == "ok"]
    failed = [attempt for attempt in row.attempts if attempt.status != "ok"]
    if not succeeded:
        row.status, row.note = "error", failed[0].note
        return
    best = max(succeeded, key=lambda attempt: data.rank(attempt.scores))
    row.best, row.seconds, row.scores = best.label, best.seconds, best.scores
    if len(row.attempts) > 1:
        tied = [a.label for a in succeeded if a is not best and data.rank(a.scores) == data.rank(best.scores)]
        row.note = f"best: {' = '.join([best.label, *tied])}"
        row.note += "".join(f"; {attempt.label} error: {attempt.note}" for attempt in failed)


def check_forms(rows: dict[str, Row], models: dict[str, Path], data: ModelData) -> dict[str, Any] | None:
    """Compare the two :data:`FORM_CHECK` models of one quantization and note the verdict on the second's row.

    The verdict is on the figures (equal when no figure differs by more than :data:`FORM_TOLERANCE`). Also
    reported: the largest output difference on the evaluation feeds as deployed (``cpu_session``) and with
    graph optimizations off, where only the graph forms differ (float summation order can still flip a rounding
    in a later quantizer). Returns ``None`` when either model is missing.
    """
    first, second = FORM_CHECK
    if first not in models or second not in models:
        return None
    max_diff = {}
    for label, optimized in (("deployed", True), ("unoptimized", False)):
        outputs = [data.outputs(models[name], optimized) for name in FORM_CHECK]
        max_diff[label] = max(float(np.max(np.abs(a[key] - b[key]))) for a, b in zip(*outputs) for key in a)
    score_diff = {key: rows[second].scores[key] - rows[first].scores[key] for key in rows[first].scores}
    equal = all(abs(diff) <= FORM_TOLERANCE for diff in score_diff.values())
    verdict = (f"{'figures equal' if equal else 'FIGURES DIFFER FROM'} {first}; largest output difference "
               f"{max_diff['deployed']:.2g} ({max_diff['unoptimized']:.2g} unoptimized)")
    rows[second].note = "; ".join(filter(None, [rows[second].note, verdict]))
    print(f"  form check ({data.spec.name}): {second} {verdict}, Δ figures {score_diff}", file=sys.stderr)
    return {"compared": list(FORM_CHECK), "score_diff": score_diff, "equal": equal, "tolerance": FORM_TOLERANCE,
            "max_abs_output_diff": max_diff}


@dataclass
class ModelResult(harness.ModelResult):
    """Everything measured on one model.

    ``latency`` is ``{input: {model: {"ms": median, "ratio": median per-round ratio to fp32, "ratio_quartiles":
    [q1, q3]}}}`` (empty when skipped or when no W8A8 latency model was produced); ``form_check`` is
    :func:`check_forms`'s result.
    """

    ort_calibration_feeds: int
    rows: list[Row]
    form_check: dict[str, Any] | None
    latency: dict[str, dict[str, Any]]


def run_model(spec: ModelSpec, bits_settings: Sequence[Bits], methods: Sequence[Method], latency: bool,
              workdir: Path) -> ModelResult:
    """Every method at every bit setting on one model, then the form check and the latency comparison."""
    data = prepare_model(spec, workdir)
    rows: list[Row] = []
    w8a8_rows: dict[str, Row] = {}
    kept: dict[str, Path] = {"fp32": data.fp32}
    for bits in bits_settings:
        for method in methods:
            row, path = measure(method, bits, data, workdir)
            rows.append(row)
            if bits == W8A8:
                w8a8_rows[method.name] = row
            if path is not None and bits == W8A8 and method.name in LATENCY_METHODS:
                kept[method.name] = path
            elif path is not None:
                path.unlink()
    form_check = check_forms(w8a8_rows, kept, data)
    timed = latency and len(kept) > 1
    return ModelResult.of(data, ort_calibration_feeds=len(data.ort_calibration), rows=rows, form_check=form_check,
                          latency=interleaved_latency(kept, spec.latency(data.zoo)) if timed else {})


# ----------------------------------------------------------------------------------------------------------------
# Output


def results_table(spec: ModelSpec, rows: Sequence[Row]) -> str:
    """One model's rows: bits, method, its figures, quantization seconds and notes."""
    headers = ["model", "bits", "method", *(header for _, header in spec.metrics), "quant s", "notes"]
    lines = [[row.model, row.bits, row.method, *(fmt(row.scores.get(key), 4) for key, _ in spec.metrics),
              fmt(row.seconds, 1), note_of(row.status, row.note)] for row in rows]
    return markdown_table(headers, lines)


def latency_table(results: Sequence[ModelResult]) -> str:
    """Median latency (ms) and median ratio to FP32 of every timed model, per model and input."""
    lines = [[result.model, case, name, fmt(timing["ms"], 2), fmt(timing["ratio"], 2)]
             for result in results for case, timings in result.latency.items()
             for name, timing in timings.items()]
    return markdown_table(["model", "input", "method (W8A8)", "ms", "×FP32"], lines)


def print_report(results: Sequence[ModelResult], methods: Sequence[Method]) -> None:
    """The markdown tables and the lines under them."""
    for result in results:
        print(results_table(MODELS[result.model], result.rows))
        fp32 = ", ".join(f"{key} {value:.4f}" for key, value in result.fp32_scores.items())
        print(f"\n- {result.model}: FP32 scored against itself: {fp32}; quant s: wall time of the quantization call\n")
    if any(result.latency for result in results):
        print(latency_table(results))
        print("\n- ×FP32: median of per-round model/FP32 times, models interleaved; ms: median, this run only\n")
    for method in methods:
        print(f"- {method.name}: {method.description}")


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_bits(text: str) -> Bits:
    """``'4,8'`` -> ``(4, 8)``; only the settings in :data:`BIT_SETTINGS`."""
    try:
        bits = tuple(int(part) for part in text.split(","))
    except ValueError:
        bits = ()
    if bits not in BIT_SETTINGS:
        known = " ".join(f"{w},{a}" for w, a in BIT_SETTINGS)
        raise argparse.ArgumentTypeError(f"bit setting {text!r} is not one of: {known}")
    return bits  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--bits", nargs="+", type=parse_bits, metavar="W,A",
                        help="bit settings to run, e.g. '--bits 8,8 4,8' (default: 8,8 6,6 4,8)")
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--skip-latency", action="store_true", help="no latency comparison")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.models = parse_names(parser, args.models, list(MODELS), "models")
    args.methods = parse_names(parser, args.methods, list(METHODS), "methods")
    args.bits = args.bits or list(BIT_SETTINGS)


def run(args: argparse.Namespace, report: Report) -> None:
    """The whole comparison; prints the tables and fills the JSON document."""
    methods = [METHODS[name] for name in args.methods]
    report.document["settings"] = {
        "bits": [bits_label(bits) for bits in args.bits],
        "methods": {method.name: method.description for method in methods},
        "latency_methods": list(LATENCY_METHODS),
    }
    results = report.document["models"] = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"ptq4vit.{name}.") as tmp:
            results.append(run_model(MODELS[name], args.bits, methods, not args.skip_latency, Path(tmp)))
    print_report(results, methods)


main = Benchmark("ptq4vit", __doc__, run, add_arguments, check_arguments,
                 quick={"models": "vit-digits", "bits": [W8A8], "skip_latency": True}).main

if __name__ == "__main__":
    sys.exit(main())
