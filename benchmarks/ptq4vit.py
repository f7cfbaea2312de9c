"""PTQ4ViT ablation: onnxruntime's static quantizer and onnxsmith's PTQ methods at W8A8, W6A6 and W4A8.

Usage: ``python benchmarks/ptq4vit.py [--models a,b] [--bits W,A ...] [--methods a,b] [--skip-latency]
[--json PATH]``

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
(``_harness.interleaved_latency_ms``). Inputs: 32 test images for vit-digits; batch 1 x 64 and 32 x 64 tokens of
pydoc prose for MiniLM (``w8a8_minilm.latency_feeds``).

Results go to stdout (markdown tables) and to ``--json`` (default ``benchmarks/results/ptq4vit.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantType

from _harness import (
    Feed,
    cpu_session,
    environment,
    interleaved_latency_ms,
    markdown_table,
    one_line,
    ort_static_qdq,
    paired_ratios,
    write_json,
)

if TYPE_CHECKING:
    from onnxsmith.models.base import ZooModel
    from onnxsmith.models.minilm import MiniLM

Bits = tuple[int, int]
"""(weight bits, activation bits)."""
Outputs = dict[str, np.ndarray]

BIT_SETTINGS: tuple[Bits, ...] = ((8, 8), (6, 6), (4, 8))
W8A8: Bits = (8, 8)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ptq4vit.json"
VIT_LATENCY_IMAGES = 32
VIT_LATENCY_ROUNDS = 200
MINILM_LATENCY_ROUNDS = {1: 100, 32: 15}
"""Interleaved timing rounds per MiniLM batch size (each round runs every model once)."""
LATENCY_METHODS = ("onnxsmith-w8a8", "ptq4vit", "ptq4vit-dual-gemm")
"""Methods whose W8A8 models are timed against FP32."""
FORM_CHECK = ("ptq4vit", "ptq4vit-dual-gemm")
"""Two graph forms of one quantization: their figures must be equal."""
FORM_TOLERANCE = 1e-4
"""Largest figure difference (absolute) still counted as equal fidelity for :data:`FORM_CHECK`."""


def bits_label(bits: Bits) -> str:
    """``(4, 8)`` -> ``'W4A8'``."""
    return f"W{bits[0]}A{bits[1]}"


# ----------------------------------------------------------------------------------------------------------------
# Models and their data


class LatencyCase(NamedTuple):
    """One latency input and how many interleaved rounds to time it."""

    feed: Feed
    rounds: int


@dataclass(frozen=True)
class ModelSpec:
    """How one zoo model is benchmarked.

    ``metrics`` are ``(score key, table header)`` pairs, the main figure first: the best onnxruntime calibrator
    is the one with the largest figures compared in this order. ``ort_calibration`` gives onnxruntime's version
    of the calibration feeds (the same samples); ``latency`` the timed inputs by name. Both take the zoo model
    named ``name``.
    """

    name: str
    calibration_count: int
    ort_op_types: tuple[str, ...]
    metrics: tuple[tuple[str, str], ...]
    ort_calibration: Callable[[Any, list[Feed]], list[Feed]]
    latency: Callable[[Any], dict[str, LatencyCase]]


def same_feeds(zoo: ZooModel, feeds: list[Feed]) -> list[Feed]:
    """onnxruntime calibrates on the feeds as they are (fixed shapes)."""
    return feeds


def padded_sentences(zoo: MiniLM, feeds: list[Feed]) -> list[Feed]:
    """MiniLM's calibration sentences padded to the longest one, one per feed, ``attention_mask`` 0 on padding."""
    batch = zoo.encode(zoo.calibration_sentences(len(feeds)))
    return [{name: array[i : i + 1] for name, array in batch.items()} for i in range(len(feeds))]


def vit_latency(zoo: ZooModel) -> dict[str, LatencyCase]:
    """The first :data:`VIT_LATENCY_IMAGES` test images as one batch."""
    images = np.concatenate([feed["pixels"] for feed in zoo.evaluation_feeds()])[:VIT_LATENCY_IMAGES]
    return {f"batch{VIT_LATENCY_IMAGES}": LatencyCase({"pixels": images}, VIT_LATENCY_ROUNDS)}


def minilm_latency(zoo: MiniLM) -> dict[str, LatencyCase]:
    """``w8a8_minilm``'s latency inputs: batch 1 and 32 rows of exactly 64 tokens of pydoc prose."""
    from w8a8_minilm import LATENCY_TOKENS, latency_feeds

    return {f"batch{size}x{LATENCY_TOKENS}": LatencyCase(feed, MINILM_LATENCY_ROUNDS[size])
            for size, feed in latency_feeds(zoo).items()}


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("vit-digits", 4, ("Conv", "Gemm", "MatMul"), (("top1_agreement", "agree"), ("accuracy", "acc")),
                  same_feeds, vit_latency),
        ModelSpec("minilm", 32, ("MatMul",), (("cosine_mean", "cos mean"), ("cosine_min", "cos min")),
                  padded_sentences, minilm_latency),
    ]
}


@dataclass(frozen=True)
class ModelData:
    """One model's FP32 file (in the working folder), its feeds and its FP32 reference outputs."""

    spec: ModelSpec
    zoo: ZooModel
    fp32: Path
    calibration: list[Feed]
    ort_calibration: list[Feed]
    evaluation: list[Feed]
    reference: list[Outputs]

    def outputs(self, path: Path, optimized: bool = True) -> list[Outputs]:
        """The model at ``path`` on every evaluation feed, reduced as the zoo model's ``score`` expects.

        ``optimized``: in :func:`cpu_session` (as deployed), else with onnxruntime's graph optimizations off
        (the graph's own semantics, no fused kernels).
        """
        session = cpu_session(path) if optimized else unoptimized_session(path)
        return evaluation_outputs(self.zoo, session, self.evaluation)

    def score(self, path: Path) -> dict[str, float]:
        """The zoo model's ``score`` of the model at ``path`` against FP32."""
        return self.zoo.score(self.reference, self.outputs(path))

    def rank(self, scores: dict[str, float]) -> tuple[float, ...]:
        """The figures that order methods, main figure first (larger is better)."""
        return tuple(scores[key] for key, _ in self.spec.metrics)


def evaluation_outputs(zoo: ZooModel, session: ort.InferenceSession, feeds: list[Feed]) -> list[Outputs]:
    """``session`` on every evaluation feed, each result reduced by ``zoo.reduce_outputs``."""
    names = [output.name for output in session.get_outputs()]
    return [zoo.reduce_outputs(index, dict(zip(names, session.run(None, feed)))) for index, feed in enumerate(feeds)]


def unoptimized_session(path: Path) -> ort.InferenceSession:
    """A CPU session that runs the graph as written: all graph optimizations off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prepare_model(spec: ModelSpec, workdir: Path) -> ModelData:
    """Copy the cached FP32 model into ``workdir`` (onnxruntime writes files beside it) and build its feeds."""
    from onnxsmith.models.zoo import get_zoo_model, zoo_model_path

    zoo = get_zoo_model(spec.name)
    fp32 = workdir / "fp32.onnx"
    shutil.copyfile(zoo_model_path(spec.name), fp32)
    calibration = zoo.calibration_feeds(spec.calibration_count)
    evaluation = zoo.evaluation_feeds()
    return ModelData(spec, zoo, fp32, calibration, spec.ort_calibration(zoo, calibration), evaluation,
                     evaluation_outputs(zoo, cpu_session(fp32), evaluation))


# ----------------------------------------------------------------------------------------------------------------
# Methods

Quantizer = Callable[[ModelData, Path], None]
"""``quantize(model_data, output)``: writes the quantized model of ``model_data.fp32`` to ``output``."""


class NotApplicable(Exception):
    """A method has no form at a bit setting; the message says why."""


@dataclass(frozen=True)
class Variant:
    """One quantization call of a method: a label, its settings (kept in the JSON) and the call."""

    label: str
    settings: dict[str, Any]
    quantize: Quantizer


@dataclass(frozen=True)
class Method:
    """One row of the comparison: ``variants(bits)`` lists its quantization calls (the best one makes the row)
    or raises :class:`NotApplicable`."""

    name: str
    description: str
    variants: Callable[[Bits], list[Variant]]


ORT_CALIBRATORS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ORT_WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
ORT_ACTIVATION_TYPES = {8: QuantType.QUInt8}


def ort_static(calibrator: CalibrationMethod, weight_type: QuantType) -> Quantizer:
    """onnxruntime ``quantize_static``: QDQ, per-channel ``weight_type`` weights, QUInt8 activations, the model's
    op types, no Q/DQ on MatMul outputs."""

    def quantize(data: ModelData, output: Path) -> None:
        ort_static_qdq(data.fp32, output, data.ort_calibration, data.spec.ort_op_types, calibrator, weight_type)

    return quantize


def ort_variants(bits: Bits) -> list[Variant]:
    """One ``quantize_static`` call per calibrator in :data:`ORT_CALIBRATORS`."""
    weight_bits, activation_bits = bits
    for kind, count, types in (("weight", weight_bits, ORT_WEIGHT_TYPES),
                               ("activation", activation_bits, ORT_ACTIVATION_TYPES)):
        if count not in types:
            raise NotApplicable(f"onnxruntime has no {count}-bit {kind} type")
    weight_type = ORT_WEIGHT_TYPES[weight_bits]
    return [Variant(label, {"calibrate_method": calibrator.name, "weight_type": weight_type.name,
                            "activation_type": "QUInt8"}, ort_static(calibrator, weight_type))
            for label, calibrator in ORT_CALIBRATORS.items()]


def onnxsmith_quantizer(recipe: str, pass_options: dict[str, Any]) -> Quantizer:
    """onnxsmith's ``optimize_file`` with ``recipe`` and ``pass_options``; no verification, no evaluation."""

    def quantize(data: ModelData, output: Path) -> None:
        from onnxsmith.optimizer.pipeline import optimize_file

        optimize_file(str(data.fp32), output, recipe=recipe, calib=data.calibration, pass_options=pass_options,
                      verify=False, evaluate_model=False, progress=False)

    return quantize


def onnxsmith_variants(recipe: str, only: Bits | None = None, **options: Any) -> Callable[[Bits], list[Variant]]:
    """One onnxsmith call with ``wbits``/``abits`` set from the bit setting plus ``options``.

    ``only`` restricts the method to one setting (the other settings are not applicable).
    """

    def variants(bits: Bits) -> list[Variant]:
        if only is not None and bits != only:
            raise NotApplicable(f"{bits_label(only)} only")
        pass_options = {"wbits": bits[0], "abits": bits[1], **options}
        return [Variant(recipe, {"recipe": recipe, "pass_options": pass_options},
                        onnxsmith_quantizer(recipe, pass_options))]

    return variants


def onnxsmith_w8a8_variants(bits: Bits) -> list[Variant]:
    """The ``w8a8`` recipe with the ``minmax`` calibrator; 8-bit only."""
    if bits != W8A8:
        raise NotApplicable("the w8a8 recipe is 8-bit only")
    pass_options = {"calibrator": "minmax"}
    return [Variant("w8a8", {"recipe": "w8a8", "pass_options": pass_options},
                    onnxsmith_quantizer("w8a8", pass_options))]


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
class Attempt:
    """One variant's run: ``status`` ``ok`` or ``error`` (``note`` holds the error's first line)."""

    label: str
    settings: dict[str, Any]
    status: str = "ok"
    note: str = ""
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


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


def run_variant(variant: Variant, data: ModelData, output: Path, workdir: Path) -> Attempt:
    """Quantize with ``variant`` in ``workdir`` (the working directory for the call) and score the model.

    Never raises: a failure is an ``error`` attempt. The quantized model stays at ``output`` when it exists.
    What the quantizer prints (onnxruntime's calibrators do) goes to stderr, keeping stdout for the report.
    """
    attempt = Attempt(variant.label, variant.settings)
    try:
        with contextlib.chdir(workdir), contextlib.redirect_stdout(sys.stderr):
            start = time.perf_counter()
            variant.quantize(data, output)
            attempt.seconds = time.perf_counter() - start
        attempt.scores = data.score(output)
    except Exception as exc:  # noqa: BLE001 - one broken method must not stop the comparison
        attempt.status, attempt.note = "error", one_line(exc)
    return attempt


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
        rundir = workdir / f"run-{row.bits}-{method.name}-{variant.label}"
        rundir.mkdir()
        outputs[variant.label] = workdir / f"{row.bits}-{method.name}-{variant.label}.onnx"
        row.attempts.append(run_variant(variant, data, outputs[variant.label], rundir))
        shutil.rmtree(rundir, ignore_errors=True)
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
    reported: the largest output difference on the evaluation feeds as deployed (:func:`cpu_session`) and with
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


def measure_latency(models: dict[str, Path], cases: dict[str, LatencyCase]) -> dict[str, dict[str, Any]]:
    """Interleaved latency of every model (``fp32`` first) per case.

    Returns ``{case: {model: {"ms": median, "ratio": median per-round ratio to fp32, "ratio_quartiles": [q1,
    q3]}}}``.
    """
    sessions = {name: cpu_session(path) for name, path in models.items()}
    results: dict[str, dict[str, Any]] = {}
    for case, (feed, rounds) in cases.items():
        print(f"  latency {case}: {rounds} interleaved rounds of {len(sessions)} models", file=sys.stderr,
              flush=True)
        times = interleaved_latency_ms(sessions, feed, rounds)
        results[case] = {}
        for name, model_times in times.items():
            ratios = paired_ratios(model_times, times["fp32"])
            quartiles = statistics.quantiles(ratios, n=4)
            results[case][name] = {"ms": statistics.median(model_times), "ratio": statistics.median(ratios),
                                   "ratio_quartiles": [quartiles[0], quartiles[2]]}
    return results


@dataclass
class ModelResult:
    """Everything measured on one model.

    ``latency`` is ``{input: {model: {"ms": median, "ratio": median per-round ratio to fp32, "ratio_quartiles":
    [q1, q3]}}}`` (empty when skipped or when no W8A8 latency model was produced); ``form_check`` is
    :func:`check_forms`'s result.
    """

    model: str
    calibration_feeds: int
    ort_calibration_feeds: int
    evaluation_feeds: int
    fp32_scores: dict[str, float]
    rows: list[Row]
    form_check: dict[str, Any] | None
    latency: dict[str, dict[str, Any]]


def run_model(spec: ModelSpec, bits_settings: Sequence[Bits], methods: Sequence[Method], latency: bool,
              workdir: Path) -> ModelResult:
    """Every method at every bit setting on one model, then the form check and the latency comparison."""
    print(f"{spec.name}: preparing data", file=sys.stderr, flush=True)
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
    return ModelResult(spec.name, len(data.calibration), len(data.ort_calibration), len(data.evaluation),
                       data.zoo.score(data.reference, data.reference), rows, form_check,
                       measure_latency(kept, spec.latency(data.zoo)) if timed else {})


# ----------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(spec: ModelSpec, rows: Sequence[Row]) -> str:
    """One model's rows: bits, method, its figures, quantization seconds and notes."""
    headers = ["model", "bits", "method", *(header for _, header in spec.metrics), "quant s", "notes"]
    lines = []
    for row in rows:
        figures = [_fmt(row.scores.get(key), 4) for key, _ in spec.metrics]
        note = row.note if row.status == "ok" else f"{row.status}: {row.note}"
        lines.append([row.model, row.bits, row.method, *figures, _fmt(row.seconds, 1), note.replace("|", r"\|")])
    return markdown_table(headers, lines)


def latency_table(results: Sequence[ModelResult]) -> str:
    """Median latency (ms) and median ratio to FP32 of every timed model, per model and input."""
    lines = [[result.model, case, name, _fmt(timing["ms"], 2), _fmt(timing["ratio"], 2)]
             for result in results for case, timings in result.latency.items()
             for name, timing in timings.items()]
    return markdown_table(["model", "input", "method (W8A8)", "ms", "×FP32"], lines)


def print_report(results: Sequence[ModelResult], methods: Sequence[Method], seconds: float) -> None:
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
    print(f"- total run time {seconds:.0f} s")


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


def parse_names(parser: argparse.ArgumentParser, text: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``known`` (all when ``text`` is empty), in the given order."""
    names = text.split(",") if text else list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--bits", nargs="+", type=parse_bits, metavar="W,A",
                        help="bit settings to run, e.g. '--bits 8,8 4,8' (default: 8,8 6,6 4,8)")
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--skip-latency", action="store_true", help="no latency comparison")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="where to write the JSON")
    args = parser.parse_args(argv)
    args.models = parse_names(parser, args.models, list(MODELS), "models")
    args.methods = parse_names(parser, args.methods, list(METHODS), "methods")
    args.bits = args.bits or list(BIT_SETTINGS)
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; prints the tables and returns the JSON document."""
    import onnxsmith.optimizer.pipeline  # noqa: F401 - imported before any clock starts

    start = time.perf_counter()
    methods = [METHODS[name] for name in args.methods]
    results = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"ptq4vit.{name}.") as tmp:
            results.append(run_model(MODELS[name], args.bits, methods, not args.skip_latency, Path(tmp)))
    seconds = time.perf_counter() - start
    print_report(results, methods, seconds)
    return {
        "benchmark": "ptq4vit",
        "environment": environment(),
        "settings": {
            "bits": [bits_label(bits) for bits in args.bits],
            "methods": {method.name: method.description for method in methods},
            "latency_methods": list(LATENCY_METHODS),
        },
        "models": [asdict(result) for result in results],
        "total_seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    document = run_benchmark(args)
    write_json(args.json, document)
    print(f"- JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
