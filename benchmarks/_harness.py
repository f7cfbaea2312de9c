"""Shared helpers for the benchmark scripts: child processes, peak RSS, interleaved latency, feeds on disk, output.

Nothing here knows about a particular model. The one quantizer call here is onnxruntime's ``quantize_static`` in
the configuration the comparisons share (:func:`ort_static_qdq`). To measure a step's peak memory, run it in a
fresh child process (:func:`run_child`) that reports :func:`peak_rss_mib` itself.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

Feed = dict[str, np.ndarray]

_FEED_KEY_SEPARATOR = "/"


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


def cpu_session(path: Path) -> ort.InferenceSession:
    """The session every benchmark uses for every model: CPU, all graph optimizations on, default threads, and
    ``DequantizeLinear(INT4) -> MatMul`` fused into ``MatMulNBits`` with float activations (accuracy level 0, as
    :func:`onnxsmith.backends.onnxruntime.create_session`; onnxruntime's default 4 quantizes them to int8)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _FeedReader(CalibrationDataReader):
    """onnxruntime calibration reader over a list of feeds, in order."""

    def __init__(self, feeds: list[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def ort_static_qdq(
    model: Path,
    output: Path,
    feeds: list[Feed],
    op_types: Sequence[str],
    calibrator: CalibrationMethod,
    weight_type: QuantType,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
) -> None:
    """onnxruntime ``quantize_static`` of ``model`` into ``output``, calibrated on ``feeds`` in order: QDQ,
    ``weight_type`` weights (per channel or per tensor), QUInt8 activations, only ``op_types``, no Q/DQ on MatMul
    outputs (``OpTypesToExcludeOutputQuantization``); the nodes named in ``nodes_to_exclude`` stay float.

    onnxruntime writes intermediate files beside ``model`` and into the working directory.
    """
    quantize_static(
        str(model),
        str(output),
        _FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        calibrate_method=calibrator,
        nodes_to_exclude=list(nodes_to_exclude),
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )


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


def paired_ratios(times: Sequence[float], reference_times: Sequence[float]) -> list[float]:
    """``time / reference time`` of each round (same round, so slow drifts of machine load cancel out)."""
    if len(times) != len(reference_times) or not times:
        raise ValueError("need equally many, non-zero timings")
    return [t / r for t, r in zip(times, reference_times)]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; cells are used as given, columns padded to equal width."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (width + 2) for width in widths) + "|",
                      *(line(row) for row in rows)])


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, for an error row."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_models(names: Sequence[str], run: Callable[[str, Path], None], document: dict[str, Any],
               save: Callable[[], None], prefix: str) -> None:
    """``run(name, workdir)`` for every model name, each in a fresh temporary folder (removed after). A model
    whose run raises is recorded under ``document["model_errors"]``, printed, and ``save()`` called; the loop
    goes on."""
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"{prefix}.{name}.") as tmp:
            try:
                run(name, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a model whose data cannot be prepared must not stop the run
                print(f"\n- {name}: error: {one_line(exc)}")
                document.setdefault("model_errors", {})[name] = one_line(exc)
                save()


def finish(document: dict[str, Any], legend: str, start: float) -> None:
    """Print the legend and the total run time since ``start`` (``time.perf_counter``), and mark ``document``
    complete."""
    print(f"\n- {legend}")
    seconds = time.perf_counter() - start
    print(f"- total run time {seconds:.0f} s")
    document.update(total_seconds=seconds, complete=True)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating parent folders; non-finite floats become ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
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
