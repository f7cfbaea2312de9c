"""W8A8 on all-MiniLM-L6-v2: onnxruntime's quantizers against onnxsmith's ``w8a8`` recipe, on the same data.

Usage: ``python benchmarks/w8a8_minilm.py [--methods a,b] [--skip-rss] [--calib-large N] [--json PATH] [--quick]``
(``--quick``: ``ort-dynamic`` and ``onnxsmith-minmax`` in this process, no large-calibration runs)

Every method quantizes the cached FP32 zoo model (``zoo_model_path("minilm")``, copied into a temporary folder)
with the 32 calibration sentences of ``MiniLM().calibration_feeds(32)``; ``--calib-large`` sentences (512 by
default) are used for a second run of the methods marked ``large``. Reported per method:

- fidelity: mean and min cosine between FP32 and quantized sentence embeddings on the 100 sentences of
  ``MiniLM().evaluation_feeds()`` (``MiniLM().score``), for the 32-sentence model and for the large one;
- latency: median over interleaved rounds of (model time / FP32 time in the same round), at batch 1 x 64 and
  batch 32 x 64 tokens of pydoc text, onnxruntime CPU, all graph optimizations on, identical session options;
- cost: wall time of the quantization call (imports excluded) and the peak RSS of a fresh child process that
  ran only that quantization (its RSS before the call is kept in the JSON as ``baseline_rss_mib``).

Calibration inputs. onnxruntime's histogram calibrators (Entropy, Percentile) crash on feeds of varying sequence
length, so every ``ort-static-*`` method except ``ort-static-minmax-varlen`` calibrates on the sentences padded
to the longest one in the set (``attention_mask`` 0 on padding), one sentence per batch. Padding positions are
still computed, so their activations enter onnxruntime's statistics; ``ort-static-minmax-varlen`` (MinMax on the
unpadded feeds) shows what that costs. onnxsmith gets the unpadded batch-1 feeds.

onnxruntime's quantizer runs with its working directory and ``TMPDIR`` inside the temporary folder (it writes
~90 MB of intermediate files there), which is removed at the end. Results go to stdout (a markdown table) and
to ``--json`` (default ``benchmarks/results/w8a8_minilm.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from harness import (
    MINILM_LATENCY_BATCHES,
    MINILM_LATENCY_ROUNDS,
    MINILM_LATENCY_TOKENS,
    Benchmark,
    Feed,
    LatencyCase,
    Report,
    cpu_session,
    fmt,
    interleaved_latency,
    load_feeds,
    markdown_table,
    minilm_latency_feeds,
    optimize_model,
    ort_static_qdq,
    padded_sentences,
    parse_names,
    peak_rss_mib,
    run_child,
    save_feeds,
)

CALIBRATION_COUNT = 32
DEFAULT_LARGE_CALIBRATION_COUNT = 512
ONNXSMITH_CALIBRATORS = ("minmax", "percentile", "entropy", "mse")

Quantizer = Callable[[Path, Path, list[Feed]], None]
"""``quantize(fp32_model, output_model, calibration_feeds)``: writes the quantized model to ``output_model``."""


@dataclass(frozen=True)
class Method:
    """One quantization setting in the comparison.

    ``calibration`` names the feed set the quantizer gets: ``"padded"`` (every sentence padded to the longest),
    ``"varlen"`` (each sentence at its own length) or ``None`` (no calibration data). ``large`` methods are also
    run with ``--calib-large`` sentences. ``imports`` are imported before the clock starts.
    """

    name: str
    description: str
    calibration: str | None
    large: bool
    quantize: Quantizer
    imports: tuple[str, ...] = ()


def ort_static(
    calibrate_method: CalibrationMethod, exclude_matmul_outputs: bool, pre_process: bool = False
) -> Quantizer:
    """onnxruntime ``quantize_static``: QDQ, per-channel QInt8 weights, QUInt8 activations, MatMul only.

    ``exclude_matmul_outputs`` adds ``OpTypesToExcludeOutputQuantization=['MatMul']`` (no Q/DQ on MatMul
    outputs). ``pre_process`` first runs ``quant_pre_process(skip_symbolic_shape=True)`` into the working folder.
    """
    def quantize(model: Path, output: Path, feeds: list[Feed]) -> None:
        source = model
        if pre_process:
            source = Path.cwd() / "preprocessed.onnx"
            quant_pre_process(str(model), str(source), skip_symbolic_shape=True)
        ort_static_qdq(source, output, feeds, ["MatMul"], calibrate_method, QuantType.QInt8,
                       exclude_matmul_outputs=exclude_matmul_outputs)

    return quantize


def ort_dynamic(model: Path, output: Path, feeds: list[Feed]) -> None:
    """onnxruntime ``quantize_dynamic``: per-channel QInt8 weights, MatMul only (``feeds`` unused)."""
    quantize_dynamic(
        str(model), str(output), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
    )


def onnxsmith_w8a8(calibrator: str) -> Quantizer:
    """onnxsmith's ``w8a8`` recipe with ``calibrator`` and uint8 activations, verification on."""

    def quantize(model: Path, output: Path, feeds: list[Feed]) -> None:
        optimize_model(model, output, "w8a8", feeds, {"calibrator": calibrator, "act_dtype": "uint8"}, verify=True)

    return quantize


_ORT = ("onnxruntime.quantization",)
_ONNXSMITH = ("onnxsmith.optimizer.pipeline",)
METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("ort-static-minmax", "ORT static QDQ, MinMax", "padded", True,
               ort_static(CalibrationMethod.MinMax, False), _ORT),
        Method("ort-static-entropy", "ORT static QDQ, Entropy (quantize_static keeps the calibrator's defaults "
               "num_bins = num_quantized_bins = 128, so the KL search has one candidate: MinMax's range)",
               "padded", True, ort_static(CalibrationMethod.Entropy, False), _ORT),
        Method("ort-static-minmax-varlen", "ORT static QDQ, MinMax, unpadded calibration feeds", "varlen", False,
               ort_static(CalibrationMethod.MinMax, False), _ORT),
        Method("ort-static-minmax-xout", "ORT static QDQ, MinMax, no Q/DQ on MatMul outputs", "padded", True,
               ort_static(CalibrationMethod.MinMax, True), _ORT),
        Method("ort-static-percentile-xout", "ORT static QDQ, Percentile, no Q/DQ on MatMul outputs", "padded",
               True, ort_static(CalibrationMethod.Percentile, True), _ORT),
        Method("ort-static-minmax-xout-prep", "as ort-static-minmax-xout after quant_pre_process"
               "(skip_symbolic_shape=True)", "padded", False, ort_static(CalibrationMethod.MinMax, True, True), _ORT),
        Method("ort-dynamic", "ORT quantize_dynamic, per-channel QInt8 weights", None, False, ort_dynamic, _ORT),
        *(
            Method(f"onnxsmith-{name}", f"onnxsmith w8a8, calibrator {name}, uint8 activations", "varlen", True,
                   onnxsmith_w8a8(name), _ONNXSMITH)
            for name in ONNXSMITH_CALIBRATORS
        ),
    ]
}


@dataclass
class QuantRun:
    """One quantization of a method with ``calibration_count`` sentences and the fidelity of its model.

    ``seconds`` is the quantization call alone; ``peak_rss_mib`` / ``baseline_rss_mib`` are the child's peak RSS
    overall and just before the call (both ``None`` when run in-process with ``--skip-rss``).
    """

    calibration_count: int
    seconds: float
    peak_rss_mib: float | None = None
    baseline_rss_mib: float | None = None
    child_wall_seconds: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None


@dataclass
class MethodResult:
    """Everything measured for one method; ``status`` is ``ok`` or ``failed`` (see ``note``).

    Latency per batch key: ``latency_ms`` the median time, ``latency_ratio`` the median of per-round
    model/FP32 ratios and ``latency_ratio_quartiles`` their first and third quartiles (a noise gauge).
    """

    name: str
    description: str
    status: str = "ok"
    note: str = ""
    runs: list[QuantRun] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_ratio: dict[str, float] = field(default_factory=dict)
    latency_ratio_quartiles: dict[str, list[float]] = field(default_factory=dict)
    size_bytes: int | None = None


@dataclass(frozen=True)
class BenchmarkData:
    """The inputs shared by every method: calibration files per count and kind, evaluation and latency feeds."""

    calibration_files: dict[int, dict[str, Path]]
    padded_length: dict[int, int]
    evaluation: list[Feed]
    latency: dict[int, Feed]


# ----------------------------------------------------------------------------------------------------------------
# Child process: one quantization, measured


def timed_quantize(method: Method, model: Path, output: Path, feeds_path: Path | None, workdir: Path) -> dict:
    """Run ``method`` once with ``workdir`` as the working directory.

    Returns ``{"seconds": wall time of the quantization call, "baseline_rss_mib": peak RSS before the call,
    "peak_rss_mib": peak RSS after it}`` (RSS: :func:`peak_rss_mib`, meaningful in a fresh process). The
    method's imports and the calibration feeds are loaded before the clock starts.
    """
    for module in method.imports:
        importlib.import_module(module)
    feeds = load_feeds(feeds_path) if feeds_path is not None else []
    baseline = peak_rss_mib()
    with contextlib.chdir(workdir):
        start = time.perf_counter()
        method.quantize(model, output, feeds)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": peak_rss_mib()}


def child_main(args: argparse.Namespace) -> int:
    """Entry point of a measurement child: quantize, then print the result as one JSON line."""
    feeds = Path(args.feeds) if args.feeds else None
    result = timed_quantize(METHODS[args.child], Path(args.model), Path(args.output), feeds, Path.cwd())
    print(json.dumps(result))
    return 0


def quantize_in_child(
    method: Method, count: int, model: Path, output: Path, feeds: Path | None, workdir: Path
) -> QuantRun:
    """Quantize in a fresh Python process (cwd and TMPDIR = ``workdir``); raise RuntimeError if it fails."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", method.name, "--model", str(model),
            "--output", str(output)]
    if feeds is not None:
        argv += ["--feeds", str(feeds)]
    child = run_child(argv, workdir, env={**os.environ, "TMPDIR": str(workdir)})
    if child.returncode != 0:
        raise RuntimeError(child.error_summary())
    reported = child.last_json_line()
    return QuantRun(count, reported["seconds"], reported["peak_rss_mib"], reported["baseline_rss_mib"],
                    child.wall_seconds)


# ----------------------------------------------------------------------------------------------------------------
# Data


def build_data(workdir: Path, large_count: int | None) -> BenchmarkData:
    """Tokenize calibration (32 and ``large_count``), evaluation and latency inputs; write calibration files.

    Calibration files: ``calib-N-varlen.npz`` (``MiniLM().calibration_feeds(N)``) and ``calib-N-padded.npz``
    (the same sentences padded to the longest, one sentence per feed, attention_mask 0 on padding).
    """
    from onnxsmith.models.minilm import MiniLM

    minilm = MiniLM()
    counts = [CALIBRATION_COUNT] + ([large_count] if large_count else [])
    files: dict[int, dict[str, Path]] = {}
    padded_length: dict[int, int] = {}
    for count in counts:
        varlen = minilm.calibration_feeds(count)
        padded = padded_sentences(minilm, varlen)
        files[count] = {kind: workdir / f"calib-{count}-{kind}.npz" for kind in ("varlen", "padded")}
        save_feeds(files[count]["varlen"], varlen)
        save_feeds(files[count]["padded"], padded)
        padded_length[count] = int(padded[0]["input_ids"].shape[1])
    return BenchmarkData(files, padded_length, minilm.evaluation_feeds(), minilm_latency_feeds(minilm))


# ----------------------------------------------------------------------------------------------------------------
# Measurements in the parent


def embeddings(session: ort.InferenceSession, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """``sentence_embedding`` of every feed, as the outputs list ``MiniLM.score`` takes."""
    return [{"sentence_embedding": session.run(["sentence_embedding"], feed)[0]} for feed in feeds]


def fidelity(path: Path, reference: list[dict[str, np.ndarray]], data: BenchmarkData) -> tuple[float, float]:
    """(mean, min) cosine of the model at ``path`` against the FP32 reference embeddings (``MiniLM().score``)."""
    from onnxsmith.models.minilm import MiniLM

    score = MiniLM().score(reference, embeddings(cpu_session(path), data.evaluation))
    return score["cosine_mean"], score["cosine_min"]


def quantize_method(
    method: Method, count: int, model: Path, data: BenchmarkData, workdir: Path, in_process: bool
) -> tuple[Path, QuantRun]:
    """Quantize ``model`` with ``count`` calibration sentences into ``workdir``; returns the model and its run."""
    rundir = workdir / f"run-{method.name}-{count}"
    rundir.mkdir()
    output = workdir / f"{method.name}-{count}.onnx"
    feeds = data.calibration_files[count][method.calibration] if method.calibration else None
    try:
        if in_process:
            run = QuantRun(count, timed_quantize(method, model, output, feeds, rundir)["seconds"])
        else:
            run = quantize_in_child(method, count, model, output, feeds, rundir)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return output, run


def measure_method(
    method: Method, large_count: int | None, model: Path, data: BenchmarkData, workdir: Path,
    reference: list[dict[str, np.ndarray]], in_process: bool,
) -> tuple[MethodResult, Path | None]:
    """Quantize with 32 sentences (and ``large_count`` for ``large`` methods) and score each model.

    Returns the result and the 32-sentence model (kept for latency; ``None`` when that run failed). Failures are recorded in the result, never raised: a failed 32-sentence run makes the
    status ``failed``; a failed large run only adds a note.
    """
    result = MethodResult(method.name, method.description)
    kept: Path | None = None
    counts = [CALIBRATION_COUNT] + ([large_count] if large_count and method.large else [])
    for count in counts:
        print(f"  {method.name}: quantizing with {count} calibration sentences", file=sys.stderr, flush=True)
        try:
            output, run = quantize_method(method, count, model, data, workdir, in_process)
            run.cosine_mean, run.cosine_min = fidelity(output, reference, data)
        except Exception as exc:  # noqa: BLE001 - one broken method must not stop the comparison
            result.note = f"{count} sentences: {type(exc).__name__}: {exc}"
            if kept is None:
                result.status = "failed"
            break
        result.runs.append(run)
        if kept is None:
            kept, result.size_bytes = output, output.stat().st_size
        else:
            output.unlink()
    return result, kept


def measure_latency(models: dict[str, Path], data: BenchmarkData, results: dict[str, MethodResult]) -> dict:
    """Interleaved latency of every model per batch size; fills each result's ``latency_*``; returns FP32's."""
    cases = {f"batch{size}x{MINILM_LATENCY_TOKENS}": LatencyCase(data.latency[size], MINILM_LATENCY_ROUNDS[size])
             for size in MINILM_LATENCY_BATCHES}
    fp32: dict[str, float] = {}
    for key, timings in interleaved_latency(models, cases).items():
        fp32[key] = timings["fp32"]["ms"]
        for name, result in results.items():
            if name in timings:
                result.latency_ms[key] = timings[name]["ms"]
                result.latency_ratio[key] = timings[name]["ratio"]
                result.latency_ratio_quartiles[key] = timings[name]["ratio_quartiles"]
    return fp32


# ----------------------------------------------------------------------------------------------------------------
# Output


def table(results: Sequence[MethodResult], large_count: int | None) -> str:
    """The markdown table: one row per method, fidelity, latency ratios and quantization cost."""
    batch_keys = [f"batch{size}x{MINILM_LATENCY_TOKENS}" for size in MINILM_LATENCY_BATCHES]
    headers = ["method", "cos mean", "cos min", *(f"latency ×FP32 b{size}" for size in MINILM_LATENCY_BATCHES),
               f"time s @{CALIBRATION_COUNT}", f"peak RSS MiB @{CALIBRATION_COUNT}"]
    if large_count:
        headers += [f"time s @{large_count}", f"peak RSS MiB @{large_count}", f"cos mean @{large_count}"]
    rows = []
    for result in results:
        if result.status != "ok":
            rows.append([result.name, f"{result.status}: {result.note}", *[""] * (len(headers) - 2)])
            continue
        first = result.runs[0]
        row = [result.name, fmt(first.cosine_mean, 4), fmt(first.cosine_min, 4),
               *(fmt(result.latency_ratio.get(key), 2) for key in batch_keys),
               fmt(first.seconds, 1), fmt(first.peak_rss_mib, 0)]
        if large_count:
            large = next((run for run in result.runs if run.calibration_count == large_count), None)
            row += ([fmt(large.seconds, 1), fmt(large.peak_rss_mib, 0), fmt(large.cosine_mean, 4)]
                    if large else ["—"] * 3)
        rows.append(row)
    return markdown_table(headers, rows)


def notes(data: BenchmarkData, fp32_latency: dict[str, float], results: Sequence[MethodResult]) -> list[str]:
    """Plain-text lines printed under the table: data, FP32 latency, method legend."""
    lines = [
        "Calibration: MiniLM().calibration_feeds(N); evaluation: the 100 MiniLM().evaluation_feeds() sentences.",
        "ORT static methods (except *-varlen) calibrate on sentences padded to the longest in the set "
        f"({', '.join(f'{n} sentences: {length} tokens' for n, length in data.padded_length.items())}), "
        "attention_mask 0 on padding; onnxsmith and *-varlen get each sentence at its own length.",
        "FP32 median latency: " + ", ".join(f"{key} {ms:.1f} ms" for key, ms in fp32_latency.items())
        + " (ratios: median of per-round model/FP32 times, models interleaved).",
    ]
    lines += [f"{result.name}: {result.description}" for result in results]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--skip-rss", action="store_true",
                        help="quantize in this process (no peak RSS) and skip the large-calibration runs")
    parser.add_argument("--calib-large", type=int, default=DEFAULT_LARGE_CALIBRATION_COUNT, metavar="N",
                        help="calibration sentences of the second run of 'large' methods (0 skips it)")
    for hidden in ("--child", "--model", "--output", "--feeds"):  # the measurement child's protocol
        parser.add_argument(hidden, help=argparse.SUPPRESS)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.methods = parse_names(parser, args.methods, list(METHODS), "methods")


def run(args: argparse.Namespace, report: Report) -> None:
    """The whole comparison; prints the table and fills the JSON document."""
    from onnxsmith.models.zoo import zoo_model_path

    large_count = None if args.skip_rss or args.calib_large <= 0 else args.calib_large
    methods = [METHODS[name] for name in args.methods]
    counts = [CALIBRATION_COUNT] + ([large_count] if large_count else [])
    with tempfile.TemporaryDirectory(prefix="w8a8_minilm.") as tmp:
        workdir = Path(tmp)
        model = workdir / "fp32.onnx"
        shutil.copyfile(zoo_model_path("minilm"), model)  # ORT writes '<model>-inferred.onnx' beside its input
        print("preparing data", file=sys.stderr, flush=True)
        data = build_data(workdir, large_count)
        reference = embeddings(cpu_session(model), data.evaluation)
        results: dict[str, MethodResult] = {}
        models = {"fp32": model}
        for method in methods:
            result, kept = measure_method(method, large_count, model, data, workdir, reference, args.skip_rss)
            results[method.name] = result
            if kept is not None:
                models[method.name] = kept
        fp32_latency = measure_latency(models, data, results)
        fp32_size = model.stat().st_size
    print(table(list(results.values()), large_count))
    print()
    for line in notes(data, fp32_latency, list(results.values())):
        print(f"- {line}")
    report.document.update({
        "settings": {
            "calibration_counts": counts,
            "evaluation_sentences": len(data.evaluation),
            "ort_padded_calibration_length": data.padded_length,
            "latency_tokens": MINILM_LATENCY_TOKENS,
            "latency_rounds": MINILM_LATENCY_ROUNDS,
            "quantized_in_child_processes": not args.skip_rss,
        },
        "fp32": {"latency_ms": fp32_latency, "size_bytes": fp32_size},
        "methods": list(results.values()),
    })


main = Benchmark("w8a8_minilm", __doc__, run, add_arguments, check_arguments,
                 quick={"methods": "ort-dynamic,onnxsmith-minmax", "skip_rss": True},
                 child=lambda args: child_main(args) if args.child else None).main

if __name__ == "__main__":
    sys.exit(main())
