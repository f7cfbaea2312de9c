"""The one harness every benchmark script stands on; a benchmark imports this module and onnxsmith, nothing else
of the repository (no other benchmark, nothing under ``tests/``).

- the command line and the report (:class:`Benchmark`, :class:`Report`): a benchmark's ``main`` is
  ``Benchmark(name, __doc__, run, ...).main``, which adds the shared flags (``--out/--json PATH``, default
  ``benchmarks/results/<name>.json``; ``--quick``, the benchmark's small configuration), starts the JSON document
  with :func:`environment`, times the run, prints the total, writes the JSON and says where;
- the zoo models' data and scoring (:class:`ModelSpec`, :data:`MODEL_SPECS`, :class:`ModelData`,
  :func:`prepare_model`, :func:`evaluation_outputs`);
- quantization calls, run and scored the same way for every tool (:class:`Variant`, :func:`run_variant`,
  :func:`run_in_folder`, :func:`onnxsmith_variant`, :func:`optimize_model`) and the onnxruntime anchors in the
  configurations the comparisons share (:func:`ort_static_qdq`, :func:`ort_matmul_nbits`);
- timing: one session configuration (:func:`cpu_session`), interleaved latency (:func:`interleaved_latency`),
  child processes and their peak RSS (:func:`run_child`, :func:`peak_rss_mib`);
- feeds on disk (:func:`save_feeds`, :func:`load_feeds`) and the output helpers (:func:`markdown_table`,
  :func:`fmt`, :func:`write_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

if TYPE_CHECKING:
    from onnxsmith.models.base import ZooModel
    from onnxsmith.models.minilm import MiniLM
    from onnxsmith.optimizer.pipeline import OptimizeResult

Feed = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Bits = tuple[int, int]
"""(weight bits, activation bits)."""

RESULTS = Path(__file__).resolve().parent / "results"
"""Where the JSON files go by default (not committed: results are machine-specific)."""
WARM_IMPORTS = ("onnxsmith.optimizer.pipeline",)
"""Imported before the clock of a run starts."""


# ----------------------------------------------------------------------------------------------------------------
# The command line and the report


class Report:
    """The JSON document of one run, where it goes and when the run started.

    The document starts as ``{"benchmark", "environment", "quick", "complete": False}``; the benchmark adds its
    settings and results (dataclasses are written as dictionaries) and calls :meth:`save` whenever a part is done.
    """

    def __init__(self, name: str, path: Path, quick: bool = False) -> None:
        self.path = path
        self.start = time.perf_counter()
        self.document: dict[str, Any] = {"benchmark": name, "environment": environment(), "quick": quick,
                                         "complete": False}

    @property
    def seconds(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def save(self) -> None:
        """(Re)write the JSON file."""
        write_json(self.path, self.document)

    def finish(self, legend: str | None = None) -> None:
        """Print ``legend`` (if any) and the total run time, and mark the document complete."""
        if legend:
            print(f"\n- {legend}")
        seconds = self.seconds
        print(f"- total run time {seconds:.0f} s")
        self.document.update(total_seconds=seconds, complete=True)


Run = Callable[[argparse.Namespace, Report], "int | None"]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's command line and run.

    ``run(args, report)`` does the work: it prints its tables, fills ``report.document`` and returns the exit code
    (None: 0). ``arguments(parser)`` adds the benchmark's own flags, ``check(parser, args)`` validates and converts
    them (``parser.error`` refuses). ``quick``: argument values (as ``args`` attributes, before ``check``) of the
    small configuration ``--quick`` selects; flags given explicitly still win. ``child(args)``: a benchmark that
    measures in child processes of its own script returns the child's exit code, or None in the parent.
    """

    name: str
    doc: str
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None
    quick: Mapping[str, Any] = field(default_factory=dict)
    child: Callable[[argparse.Namespace], int | None] | None = None

    def parser(self) -> argparse.ArgumentParser:
        """The benchmark's flags, then ``--out/--json`` and ``--quick``."""
        parser = argparse.ArgumentParser(description=self.doc.strip().split("\n\n")[0])
        if self.arguments is not None:
            self.arguments(parser)
        parser.add_argument("--out", "--json", dest="out", type=Path, default=RESULTS / f"{self.name}.json",
                            metavar="PATH", help=f"where the JSON goes (default benchmarks/results/{self.name}.json)")
        quick = ", ".join(f"{key}={value!r}" for key, value in self.quick.items())
        parser.add_argument("--quick", action="store_true",
                            help=f"a small, fast configuration ({quick or 'the defaults'}); explicit flags win")
        return parser

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (``--quick``: with the quick values as defaults), then :attr:`check` it."""
        parser = self.parser()
        args = parser.parse_args(argv)
        if args.quick and self.quick:
            parser.set_defaults(**self.quick)
            args = parser.parse_args(argv)
        args.out = args.out.resolve()
        if self.check is not None:
            self.check(parser, args)
        return args

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse, run, finish the report and write the JSON; the run's exit code."""
        args = self.parse_args(argv)
        if self.child is not None:
            code = self.child(args)
            if code is not None:
                return code
        for module in WARM_IMPORTS:
            importlib.import_module(module)
        report = Report(self.name, args.out, args.quick)
        code = self.run(args, report)
        if not report.document["complete"]:
            report.finish()
        report.save()
        print(f"- JSON written to {report.path}")
        return code or 0


def parse_names(parser: argparse.ArgumentParser, text: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``known`` in the given order, duplicates dropped (``None``: all of them);
    ``parser.error`` for an unknown name or none."""
    if text is None:
        return list(known)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"unknown or no {what} {unknown}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def missing_recipes(recipes: Sequence[str | None]) -> list[str]:
    """The recipes among ``recipes`` this onnxsmith does not have, with a warning on stderr when there are any
    (their rows will be errors)."""
    from onnxsmith.optimizer.recipes import builtin_recipes

    missing = sorted({recipe for recipe in recipes if recipe and recipe not in builtin_recipes()})
    if missing:
        print(f"warning: recipe(s) {missing} not available in this onnxsmith: their rows will be errors",
              file=sys.stderr)
    return missing


def add_data_arguments(parser: argparse.ArgumentParser, calibration: int, windows: int) -> None:
    """``--calib N`` (calibration feeds per model) and ``--windows N`` (SmolLM2 evaluation windows)."""
    parser.add_argument("--calib", type=int, default=calibration, metavar="N",
                        help=f"calibration feeds per model (default {calibration})")
    parser.add_argument("--windows", type=int, default=windows, metavar="N",
                        help=f"SmolLM2 evaluation windows of 256 tokens (default {windows}, at most 80)")


def run_models(report: Report, names: Sequence[str], run: Callable[[str, Path], None]) -> None:
    """``run(name, workdir)`` for every model name, each in a fresh temporary folder (removed after). A model
    whose run raises is recorded under ``model_errors``, printed and saved; the loop goes on."""
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"{report.document['benchmark']}.{name}.") as tmp:
            try:
                run(name, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a model whose data cannot be prepared must not stop the run
                print(f"\n- {name}: error: {one_line(exc)}")
                report.document.setdefault("model_errors", {})[name] = one_line(exc)
                report.save()


# ----------------------------------------------------------------------------------------------------------------
# Output


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating parent folders; dataclasses become dictionaries, non-finite
    floats ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2) + "\n")


def json_safe(value: Any, infinities: bool = False) -> Any:
    """``value`` with dataclasses as dictionaries and non-finite floats as ``None`` (``infinities``: as the
    strings ``"inf"`` / ``"-inf"``, NaN still ``None``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ("inf" if value > 0 else "-inf") if infinities and not math.isnan(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item, infinities) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item, infinities) for item in value]
    return value


def environment() -> dict[str, Any]:
    """Machine and library facts worth keeping beside the numbers (versions, CPU count, platform)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table, columns padded to equal width; a ``|`` inside a cell is escaped."""
    cells = [[re.sub(r"(?<!\\)\|", r"\\|", str(cell)) for cell in row] for row in [headers, *rows]]
    widths = [max(len(cell) for cell in column) for column in zip(*cells)]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (width + 2) for width in widths) + "|",
                      *(line(row) for row in cells[1:])])


def fmt(value: float | None, digits: int, missing: str = "—") -> str:
    """``value`` with ``digits`` decimals, ``missing`` for None."""
    return missing if value is None else f"{value:.{digits}f}"


def figures(scores: Mapping[str, float], metrics: Sequence[tuple[str, str]], digits: int = 4) -> list[str]:
    """The cells of ``metrics`` (``(score key, header)`` pairs) from ``scores``: perplexity with 2 decimals,
    the others with ``digits``."""
    return [fmt(scores.get(key), 2 if key == "perplexity" else digits) for key, _ in metrics]


def joined(*values: int | None) -> str:
    """Counts as ``a/b/c`` (``—`` for a missing one, ``—`` alone when all are missing)."""
    return "—" if all(value is None for value in values) else "/".join("—" if v is None else str(v) for v in values)


def note_of(status: str, note: str) -> str:
    """A row's notes cell: the note, prefixed by the status unless it is ``ok``."""
    return note if status == "ok" else f"{status}: {note}"


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, for an error row."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def log_result(row: Any) -> None:
    """One stderr line for a finished row: status, scores, seconds of the call, note."""
    print(f"    {row.status} {row.scores} {row.seconds and round(row.seconds, 1)} s {row.note}", file=sys.stderr,
          flush=True)


def earlier_anchors(figures: str, counts: tuple[int, int], anchor_counts: tuple[int, int]) -> str:
    """The line naming earlier figures measured on this machine, for context, and whether this run's
    ``(evaluation windows, calibration windows)`` are theirs."""
    differ = "" if counts == anchor_counts else (f"; this run: {counts[0]} windows, {counts[1]} calibration "
                                                 "windows, not comparable")
    return (f"- earlier anchors (context only; this machine, same data, {anchor_counts[0]} windows, "
            f"{anchor_counts[1]} calibration windows): {figures}{differ}")


# ----------------------------------------------------------------------------------------------------------------
# Sessions and timing


def bits_label(bits: Bits) -> str:
    """``(4, 8)`` -> ``'W4A8'``."""
    return f"W{bits[0]}A{bits[1]}"


def cpu_session(path: Path) -> ort.InferenceSession:
    """The session every benchmark uses for every model: CPU, all graph optimizations on, default threads, and
    ``DequantizeLinear(INT4) -> MatMul`` fused into ``MatMulNBits`` with float activations (accuracy level 0, as
    :func:`onnxsmith.backends.onnxruntime.create_session`; onnxruntime's default 4 quantizes them to int8)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def unoptimized_session(path: Path) -> ort.InferenceSession:
    """A CPU session that runs the graph as written: all graph optimizations off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class LatencyCase(NamedTuple):
    """One latency input and how many interleaved rounds to time it."""

    feed: Feed
    rounds: int


def interleaved_latency_ms(
    sessions: Mapping[str, ort.InferenceSession], feed: Feed, rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Per-round wall times (ms) of one ``feed`` on every session, the sessions interleaved.

    After ``warmup`` untimed runs of each session, every round runs each session once; the starting session
    rotates from round to round so no model always follows the same neighbour. Returns ``rounds`` times per name.
    """
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def torch_median_ms(torch: Any, fn: Callable[[], Any], runs: int, reps: int, warmup: int, cuda: bool = True) -> float:
    """Median over ``runs`` samples of ``fn``'s time per call (ms): CUDA events (``cuda``; else ``perf_counter``
    on the CPU) around ``reps`` back-to-back calls, after ``warmup`` calls and a synchronize."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / reps)
        else:
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - begin) * 1e3 / reps)
    return statistics.median(samples)


def paired_ratios(times: Sequence[float], reference_times: Sequence[float]) -> list[float]:
    """``time / reference time`` of each round (same round, so slow drifts of machine load cancel out)."""
    if len(times) != len(reference_times) or not times:
        raise ValueError("need equally many, non-zero timings")
    return [t / r for t, r in zip(times, reference_times)]


def interleaved_latency(models: Mapping[str, Path], cases: Mapping[str, LatencyCase],
                        reference: str = "fp32") -> dict[str, dict[str, dict[str, Any]]]:
    """Interleaved latency (:func:`interleaved_latency_ms`) of every model, in :func:`cpu_session`, per case.

    Returns ``{case: {model: {"ms": median, "ratio": median per-round ratio to the ``reference`` model,
    "ratio_quartiles": [q1, q3]}}}``.
    """
    sessions = {name: cpu_session(path) for name, path in models.items()}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for case, (feed, rounds) in cases.items():
        print(f"  latency {case}: {rounds} interleaved rounds of {len(sessions)} models", file=sys.stderr,
              flush=True)
        times = interleaved_latency_ms(sessions, feed, rounds)
        results[case] = {}
        for name, model_times in times.items():
            ratios = paired_ratios(model_times, times[reference])
            quartiles = statistics.quantiles(ratios, n=4)
            results[case][name] = {"ms": statistics.median(model_times), "ratio": statistics.median(ratios),
                                   "ratio_quartiles": [quartiles[0], quartiles[2]]}
    return results


# ----------------------------------------------------------------------------------------------------------------
# Child processes


@dataclass(frozen=True)
class ChildRun:
    """How one child process ended: exit code, wall seconds (start to exit) and its output."""

    returncode: int
    wall_seconds: float
    stdout: str
    stderr: str

    def last_json_line(self) -> dict[str, Any]:
        """The last stdout line parsed as JSON (the protocol the benchmark children follow)."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            raise ValueError("the child printed nothing on stdout")
        return json.loads(lines[-1])

    def error_summary(self, lines: int = 3) -> str:
        """The last few non-empty stderr lines, for a failure message."""
        tail = [line for line in self.stderr.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or f"exit code {self.returncode}"


def run_child(argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> ChildRun:
    """Run ``argv`` in ``cwd`` to completion, capturing its output, and time it."""
    start = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=cwd, env=dict(env) if env else None, capture_output=True, text=True)
    return ChildRun(proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far in MiB: ``VmHWM`` of ``/proc/self/status`` (Linux only).

    Not ``ru_maxrss``: Linux carries the parent's RSS high-water mark over fork and exec into the child's
    ``ru_maxrss`` (and so into ``wait4`` / ``RUSAGE_CHILDREN``), so a child started by a 450 MiB parent reports
    at least 450 MiB. ``VmHWM`` belongs to the address space created by exec and starts from zero.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM line (peak RSS needs Linux)")


# ----------------------------------------------------------------------------------------------------------------
# Feeds on disk and for onnxruntime

_FEED_KEY_SEPARATOR = "/"


def save_feeds(path: Path, feeds: Sequence[Feed]) -> None:
    """Write feeds of any shapes to one ``.npz`` (keys ``INDEX/INPUT``); :func:`load_feeds` restores them."""
    arrays = {f"{index}{_FEED_KEY_SEPARATOR}{name}": array for index, feed in enumerate(feeds)
              for name, array in feed.items()}
    np.savez(path, **arrays)


def load_feeds(path: Path) -> list[Feed]:
    """The feeds written by :func:`save_feeds`, in their original order."""
    feeds: dict[int, Feed] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            index, name = key.split(_FEED_KEY_SEPARATOR, 1)
            feeds.setdefault(int(index), {})[name] = archive[key]
    return [feeds[index] for index in sorted(feeds)]


class FeedReader(CalibrationDataReader):
    """onnxruntime calibration reader over a list of feeds, in order; plain attributes, so a ``deepcopy`` (GPTQ
    makes one) starts again from the first feed."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds, self.index = list(feeds), 0

    def get_next(self) -> Feed | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


# ----------------------------------------------------------------------------------------------------------------
# onnxruntime's quantizers, as the comparisons run them

ORT_CALIBRATORS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ORT_WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
ORT_ACTIVATION_TYPES = {8: QuantType.QUInt8}


def ort_static_qdq(
    model: Path,
    output: Path,
    feeds: Sequence[Feed],
    op_types: Sequence[str],
    calibrator: CalibrationMethod,
    weight_type: QuantType,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    exclude_matmul_outputs: bool = True,
) -> None:
    """onnxruntime ``quantize_static`` of ``model`` into ``output``, calibrated on ``feeds`` in order: QDQ,
    ``weight_type`` weights (per channel or per tensor), QUInt8 activations, only ``op_types``, no Q/DQ on MatMul
    outputs (``OpTypesToExcludeOutputQuantization``; off with ``exclude_matmul_outputs=False``); the nodes named in
    ``nodes_to_exclude`` stay float.

    onnxruntime writes intermediate files beside ``model`` and into the working directory.
    """
    quantize_static(
        str(model),
        str(output),
        FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        calibrate_method=calibrator,
        nodes_to_exclude=list(nodes_to_exclude),
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]} if exclude_matmul_outputs else {},
    )


def ort_matmul_nbits(model: Path, output: Path, algorithm: str, block: int, calibration: Sequence[Feed] = (),
                     nodes_to_exclude: Sequence[str] = ()) -> None:
    """onnxruntime ``MatMulNBitsQuantizer`` of ``model`` into ``output``: 4 bits, ``block`` along K, QOperator
    ``MatMulNBits``, MatMul only; ``algorithm`` ``rtn`` (its DEFAULT config, round to nearest, symmetric), ``hqq``
    (asymmetric by nature) or ``gptq`` (symmetric, calibrated on ``calibration``). The nodes named in
    ``nodes_to_exclude`` stay float (rtn only).

    ``RTNWeightOnlyQuantConfig`` is not used: onnxruntime runs it through neural-compressor, which is not installed.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # it logs every node at INFO
    loaded = onnx.load(str(model))
    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=4,
                                              quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(loaded, nodes_to_exclude=list(nodes_to_exclude), algo_config=config)
    elif algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block, bits=4, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(loaded, algo_config=config)
    elif algorithm == "gptq":  # the group size comes from the quantizer's block_size, GPTQ's own is its column batch
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(calibration), block_size=block,
                                           op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(loaded, bits=4, block_size=block, is_symmetric=True, algo_config=config)
    else:
        raise ValueError(f"unknown MatMulNBits algorithm {algorithm!r}")
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=False)


# ----------------------------------------------------------------------------------------------------------------
# The zoo models: specs, data, scoring

VIT_LATENCY_IMAGES = 32
VIT_LATENCY_ROUNDS = 200
MINILM_LATENCY_TOKENS = 64
MINILM_LATENCY_BATCHES = (1, 32)
MINILM_LATENCY_ROUNDS = {1: 100, 32: 15}
"""Interleaved timing rounds per MiniLM batch size (each round runs every model once)."""
SENTENCES_PER_LATENCY_ROW = 8
"""Consecutive pydoc sentences joined per MiniLM latency row: always more than 64 tokens, so no row is padded."""


@dataclass(frozen=True)
class ModelSpec:
    """How one zoo model is benchmarked.

    ``metrics`` are ``(score key, table header)`` pairs, the main figure first (``lower_is_better`` says its
    direction): the best of several variants is the one with the largest figures compared in this order.
    ``ort_calibration`` gives onnxruntime's version of the calibration feeds (the same samples); ``latency`` the
    timed inputs by name. Both take the zoo model named ``name``.
    """

    name: str
    calibration_count: int
    ort_op_types: tuple[str, ...]
    metrics: tuple[tuple[str, str], ...]
    ort_calibration: Callable[[Any, list[Feed]], list[Feed]]
    latency: Callable[[Any], dict[str, LatencyCase]]
    lower_is_better: bool = False


def same_feeds(zoo: ZooModel, feeds: list[Feed]) -> list[Feed]:
    """onnxruntime calibrates on the feeds as they are (fixed shapes)."""
    return feeds


def padded_sentences(zoo: MiniLM, feeds: list[Feed]) -> list[Feed]:
    """MiniLM's calibration sentences padded to the longest one, one per feed, ``attention_mask`` 0 on padding
    (onnxruntime's histogram calibrators crash on feeds of varying lengths)."""
    batch = zoo.encode(zoo.calibration_sentences(len(feeds)))
    return [{name: array[i : i + 1] for name, array in batch.items()} for i in range(len(feeds))]


def minilm_latency_feeds(minilm: MiniLM) -> dict[int, Feed]:
    """One feed per batch size in :data:`MINILM_LATENCY_BATCHES`: rows of exactly 64 tokens of pydoc prose, no
    padding. Row ``i`` is sentences ``8i .. 8i+7`` of ``pydoc_sentences()`` joined and truncated to 64 tokens."""
    from onnxsmith.models.text_data import pydoc_sentences

    sentences = pydoc_sentences()
    rows = max(MINILM_LATENCY_BATCHES)
    texts = [" ".join(sentences[i * SENTENCES_PER_LATENCY_ROW : (i + 1) * SENTENCES_PER_LATENCY_ROW])
             for i in range(rows)]
    batch = minilm.tokenizer()(texts, padding="max_length", truncation=True, max_length=MINILM_LATENCY_TOKENS,
                               return_tensors="np")
    feed = {name: np.asarray(batch[name], dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    if not feed["attention_mask"].all():
        raise RuntimeError("a latency row is shorter than 64 tokens; join more sentences per row")
    return {size: {name: array[:size] for name, array in feed.items()} for size in MINILM_LATENCY_BATCHES}


def vit_latency(zoo: ZooModel) -> dict[str, LatencyCase]:
    """The first :data:`VIT_LATENCY_IMAGES` test images as one batch."""
    images = np.concatenate([feed["pixels"] for feed in zoo.evaluation_feeds()])[:VIT_LATENCY_IMAGES]
    return {f"batch{VIT_LATENCY_IMAGES}": LatencyCase({"pixels": images}, VIT_LATENCY_ROUNDS)}


def minilm_latency(zoo: MiniLM) -> dict[str, LatencyCase]:
    """:func:`minilm_latency_feeds` with :data:`MINILM_LATENCY_ROUNDS` rounds each."""
    return {f"batch{size}x{MINILM_LATENCY_TOKENS}": LatencyCase(feed, MINILM_LATENCY_ROUNDS[size])
            for size, feed in minilm_latency_feeds(zoo).items()}


def no_latency(zoo: Any) -> dict[str, LatencyCase]:
    """No latency inputs."""
    return {}


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("vit-digits", 4, ("Conv", "Gemm", "MatMul"), (("top1_agreement", "agree"), ("accuracy", "acc")),
                  same_feeds, vit_latency),
        ModelSpec("minilm", 32, ("MatMul",), (("cosine_mean", "cos mean"), ("cosine_min", "cos min")),
                  padded_sentences, minilm_latency),
        ModelSpec("smollm2", 4, ("MatMul",), (("perplexity", "ppl"), ("top1_agreement", "top1")),
                  same_feeds, no_latency, lower_is_better=True),
    ]
}
"""The zoo models the comparisons score: vit-digits (top-1 agreement with FP32, accuracy), all-MiniLM-L6-v2
(embedding cosine vs FP32) and SmolLM2-135M (perplexity, top-1 agreement)."""


@dataclass(frozen=True)
class ModelData:
    """One model's FP32 file, its feeds and its FP32 reference outputs."""

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

    def fp32_scores(self) -> dict[str, float]:
        """FP32 scored against itself."""
        return self.zoo.score(self.reference, self.reference)

    def rank(self, scores: dict[str, float]) -> tuple[float, ...]:
        """The figures that order methods, main figure first (larger is better)."""
        return tuple(scores[key] for key, _ in self.spec.metrics)


@dataclass
class ModelResult:
    """What every benchmark records of one model (a result dataclass extends it with its own fields): the model,
    its calibration and evaluation feed counts and FP32's scores against itself."""

    model: str
    calibration_feeds: int
    evaluation_feeds: int
    fp32_scores: dict[str, float]

    @classmethod
    def of(cls, data: ModelData, **fields: Any) -> Any:
        """The result of ``data``'s model, with the subclass's ``fields``."""
        return cls(data.spec.name, len(data.calibration), len(data.evaluation), data.fp32_scores(), **fields)

    def heading(self, what: str = "", details: str = "") -> str:
        """A markdown heading: ``### model<what> (N calibration feeds, M evaluation feeds<details>)``."""
        return (f"\n### {self.model}{what} ({self.calibration_feeds} calibration feeds, {self.evaluation_feeds} "
                f"evaluation feeds{details})\n")


def evaluation_outputs(zoo: ZooModel, session: ort.InferenceSession, feeds: list[Feed]) -> list[Outputs]:
    """``session`` on every evaluation feed, each result reduced by ``zoo.reduce_outputs``."""
    names = [output.name for output in session.get_outputs()]
    return [zoo.reduce_outputs(index, dict(zip(names, session.run(None, feed)))) for index, feed in enumerate(feeds)]


def prepare_model(spec: ModelSpec, workdir: Path | None = None, calibration: int | None = None,
                  evaluation: int | None = None) -> ModelData:
    """The zoo model's FP32 file, its feeds and FP32 reference outputs.

    ``workdir``: the cached model is copied there as ``fp32.onnx`` (onnxruntime's quantizers write files beside
    their input); None: the cached file itself, never written. ``calibration``: calibration feeds (default
    ``spec.calibration_count``); ``evaluation``: evaluation feeds (None: all).
    """
    from onnxsmith.models.zoo import get_zoo_model, zoo_model_path

    print(f"{spec.name}: preparing data", file=sys.stderr, flush=True)
    if calibration is not None:
        spec = replace(spec, calibration_count=calibration)
    zoo = get_zoo_model(spec.name)
    fp32 = Path(zoo_model_path(spec.name))
    if workdir is not None:
        fp32 = Path(shutil.copyfile(fp32, workdir / "fp32.onnx"))
    feeds = zoo.calibration_feeds(spec.calibration_count)
    evaluation_feeds = zoo.evaluation_feeds(evaluation)
    return ModelData(spec, zoo, fp32, feeds, spec.ort_calibration(zoo, feeds), evaluation_feeds,
                     evaluation_outputs(zoo, cpu_session(fp32), evaluation_feeds))


# ----------------------------------------------------------------------------------------------------------------
# Quantization calls, run and scored the same way

Quantizer = Callable[[ModelData, Path], None]
"""``quantize(model_data, output)``: writes the quantized model of ``model_data.fp32`` to ``output``."""


class NotApplicable(Exception):
    """A method has no form at a setting; the message says why."""


@dataclass(frozen=True)
class Variant:
    """One quantization call of a method: a label, its settings (kept in the JSON) and the call."""

    label: str
    settings: dict[str, Any]
    quantize: Quantizer


@dataclass
class Attempt:
    """One variant's run: ``status`` ``ok`` or ``error`` (``note`` holds the error's first line)."""

    label: str
    settings: dict[str, Any]
    status: str = "ok"
    note: str = ""
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class ScoredRow:
    """What every benchmark row of one scored quantization holds (a row dataclass extends it with its own fields):
    ``status`` (``ok``, ``error``, ``n/a``, ``skipped``) and ``note``, the variant's ``settings``, the ``scores``,
    ``seconds`` of the quantization call, the passes' ``calibration_seconds`` and ``pass_seconds`` (the passes
    named in :meth:`take_records`), and ``wall_seconds`` (quantization, scoring and counting together)."""

    status: str = "ok"
    note: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    calibration_seconds: float | None = None
    pass_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float | None = None

    def take_attempt(self, attempt: Attempt) -> None:
        """Status, note, seconds and scores of ``attempt``."""
        self.status, self.note, self.seconds, self.scores = attempt.status, attempt.note, attempt.seconds, attempt.scores

    def take_records(self, records: Sequence[Any], passes: Sequence[str]) -> None:
        """The calibration seconds of all ``records`` (onnxsmith's pass records) and the run seconds of
        ``passes``."""
        self.calibration_seconds = sum(record.calibration_seconds for record in records)
        self.pass_seconds.update({record.name: record.seconds for record in records if record.name in passes})


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


def run_in_folder(variant: Variant, data: ModelData, workdir: Path, tag: str) -> tuple[Attempt, Path]:
    """:func:`run_variant` writing ``workdir/<tag>.onnx``, with a fresh working folder ``workdir/run-<tag>``
    (removed after, with what onnxruntime left there). The model file stays; the caller deletes it."""
    tag = re.sub(r"[^\w.-]+", "_", tag)
    output, rundir = workdir / f"{tag}.onnx", workdir / f"run-{tag}"
    rundir.mkdir()
    try:
        return run_variant(variant, data, output, rundir), output
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def optimize_model(model: str | Path, output: Path, recipe: str, calib: Any = None,
                   pass_options: dict[str, Any] | None = None, verify: bool = False, **kwargs: Any) -> OptimizeResult:
    """onnxsmith's ``optimize_file`` as the benchmarks call it: no evaluation, no progress bars, verification
    only when asked."""
    from onnxsmith.optimizer.pipeline import optimize_file

    return optimize_file(str(model), output, recipe=recipe, calib=calib, pass_options=pass_options, verify=verify,
                         evaluate_model=False, progress=False, **kwargs)


def onnxsmith_variant(recipe: str, pass_options: dict[str, Any], results: list[Any] | None = None) -> Variant:
    """:func:`optimize_model` of ``data.fp32`` with ``recipe``, ``pass_options`` and the calibration feeds; the
    call's result (its pass records) is appended to ``results`` when given."""

    def quantize(data: ModelData, output: Path) -> None:
        result = optimize_model(data.fp32, output, recipe, data.calibration, pass_options)
        if results is not None:
            results.append(result)

    return Variant(recipe, {"recipe": recipe, "pass_options": pass_options}, quantize)
