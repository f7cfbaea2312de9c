"""The real-model matrix: every built-in recipe on every corpus model (``onnxsmith.models.corpus``).

Usage: ``python benchmarks/corpus.py [--models a,b] [--recipes a,b] [--timeout S] [--recipe-timeout R=S,...]
[--calib N] [--eval N] [--json PATH] [--resume] [--quick]`` (``--quick``: mtcnn-pnet with the anchor, cleanup and
w8a8, 2 calibration and 2 evaluation feeds)

Each cell (model x recipe) runs in a fresh child process under a wall-clock limit, so a crash, a hang or a memory
blow-up becomes a cell and the run goes on. The child runs the project's pipeline on the cached FP32 model:
``optimize_file(model, out, recipe=R, calib=<--calib calibration feeds>, evaluate_model=False)`` with the
verification of lossless passes on (its probes are the first two calibration feeds), then loads the written model
in onnxruntime (CPU, all graph optimizations on, as deployed; when that session cannot be created, with them off,
and the cell says so) and runs it and the FP32 model on ``--eval`` evaluation feeds, disjoint from the
calibration feeds. A cell is:

- ``ok``: the model was written, loads, and its outputs on every evaluation feed are finite with the FP32 shapes;
  the figure is the minimum over float outputs of the output SQNR in dB vs FP32 (signal and noise energies summed
  over the evaluation feeds; ``=`` when every output is identical, ``no-op`` when no lossy pass changed anything);
  the counts of nodes the passes reported as skipped (``details`` of kind ``skipped``) and their distinct reasons
  (numbers replaced by N) are recorded;
- ``refused``: onnxsmith stopped with a clean one-line error (:class:`UserError`, or a pass precondition); the
  message is recorded;
- ``failed``: anything else: a pass that raised or broke the model (:class:`PassError`, with the pass named and the
  innermost onnxsmith frame of the cause), another exception, a child that died, a timeout (with the pass that was
  running), or non-finite / mis-shaped outputs; the first line of the error is recorded.

The feeds are written once per model (``harness.save_feeds``) and read by every child. Output: a markdown table
model x recipe, the skip reasons per cell, every refusal and failure in full, and the JSON
(``benchmarks/results/corpus.json`` by default, rewritten after every cell; ``--resume`` keeps the cells of an
earlier, interrupted run of the same file). ``--recipe-timeout`` sets per-recipe limits (e.g. for the searched
recipes on the big models); a cell that hits its limit is a ``timeout`` cell, never dropped.

Measured (2 shared CPU cores, 20 models x 15 recipes, ``--recipe-timeout base-ptq=60,ptq4vit=60,ptq-sl=60,w4a4-kd=60``):
about 56 min in all, 2-5 s per cell for the small models (most of it the child's imports), up to 40 s for the
unsearched recipes on the big ones; the searched recipes (``base-ptq``, ``ptq4vit``, ``ptq-sl``) exceed 60 s on the
detectors, the OCR recognizers and Smart Turn (one ``base-ptq`` cell exceeded 240 s too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from harness import Benchmark, Report, json_safe, load_feeds, markdown_table, ort_static_qdq, save_feeds

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 240
CHILD_MARK = "@@corpus-cell@@ "
PROGRESS_MARK = "@@corpus-pass@@ "


# --------------------------------------------------------------------------------------------------------------
# The child: one cell
# --------------------------------------------------------------------------------------------------------------

def normalise_reason(reason: str) -> str:
    """A skip reason with its numbers replaced by N, so reasons that differ only in shapes group together."""
    return re.sub(r"\d+(\.\d+)?", "N", str(reason))


def skip_summary(records: list[Any]) -> dict[str, Any]:
    """Nodes the passes reported as skipped (``details`` of kind ``skipped``): count, and count per pass and
    normalised reason."""
    reasons: Counter[str] = Counter()
    for record in records:
        for detail in record.details:
            if detail.get("kind") == "skipped":
                reasons[f"{record.name}: {normalise_reason(detail.get('reason', '?'))}"] += 1
    return {"count": sum(reasons.values()), "reasons": dict(reasons.most_common())}


def innermost_frames(exc: BaseException) -> dict[str, str]:
    """Where an exception came from: the innermost frame inside onnxsmith and the innermost frame overall."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/onnxsmith/" in f.filename.replace(os.sep, "/")]

    def where(frame: traceback.FrameSummary) -> str:
        path = frame.filename.replace(os.sep, "/")
        short = path.split("/onnxsmith/", 1)[-1] if "/onnxsmith/" in path else "/".join(path.split("/")[-2:])
        return f"{short}:{frame.lineno} in {frame.name}"

    result = {}
    if ours:
        result["onnxsmith_frame"] = "onnxsmith/" + where(ours[-1])
    if frames:
        result["innermost_frame"] = where(frames[-1])
    return result


def error_fields(exc: BaseException) -> dict[str, Any]:
    """Type, first line and origin of an exception and of its cause (a PassError wraps the pass's exception)."""
    from onnxsmith.core.errors import first_line

    fields: dict[str, Any] = {"error_type": type(exc).__name__, "error": first_line(exc)}
    cause = exc.__cause__
    if cause is not None:
        fields.update(cause_type=type(cause).__name__, cause=first_line(cause), **innermost_frames(cause))
    else:
        fields.update(innermost_frames(exc))
    match = re.match(r"(?:lossless )?pass '([^']+)'|calibration for pass '([^']+)'", fields["error"])
    if match:
        fields["error_pass"] = match.group(1) or match.group(2)
    return fields


def classify_exception(exc: BaseException) -> str:
    """``refused`` for a clean user error or a pass precondition, ``failed`` for everything else."""
    from onnxsmith.core.errors import PassError, UserError
    from onnxsmith.core.pass_base import PreconditionError

    if isinstance(exc, UserError) or (isinstance(exc, PassError) and isinstance(exc.__cause__, PreconditionError)):
        return "refused"
    return "failed"


def compare_on_feeds(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Run both models on ``feeds``; check the candidate's outputs (finite floats, FP32 shapes) and measure the
    SQNR of every float output over all feeds."""
    from onnxsmith.backends.onnxruntime import create_session
    from onnxsmith.calibration.metrics import sqnr_db

    result: dict[str, Any] = {}
    ref_session = create_session(reference)
    try:
        cand_session = create_session(candidate)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's rewrites reject some valid QDQ graphs
        from onnxsmith.core.errors import first_line

        result["ort_optimized_error"] = first_line(exc)
        cand_session = create_session(candidate, optimize=False)
    names = [o.name for o in ref_session.get_outputs()]
    signal_energy: dict[str, float] = {}
    noise_energy: dict[str, float] = {}
    mismatched: dict[str, int] = {}
    ranges: dict[str, list[float]] = {}
    problems: list[str] = []
    for index, feed in enumerate(feeds):
        ref_out = dict(zip(names, ref_session.run(names, feed)))
        cand_out = dict(zip(names, cand_session.run(names, feed)))
        for name, ref in ref_out.items():
            cand = np.asarray(cand_out[name])
            if cand.shape != ref.shape:
                problems.append(f"output {name!r} has shape {list(cand.shape)}, FP32 {list(ref.shape)} (feed {index})")
                continue
            if np.issubdtype(ref.dtype, np.floating):
                if not np.isfinite(cand).all():
                    problems.append(f"output {name!r} is not finite on feed {index} "
                                    f"({int((~np.isfinite(cand)).sum())} values)")
                    continue
                ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
                _widen(ranges.setdefault(name, [np.inf, -np.inf, np.inf, -np.inf]), ref64, cand64)
                signal_energy[name] = signal_energy.get(name, 0.0) + float(np.sum(ref64**2))
                noise_energy[name] = noise_energy.get(name, 0.0) + float(np.sum((ref64 - cand64) ** 2))
            else:
                mismatched[name] = mismatched.get(name, 0) + int(np.sum(ref != cand))
    result["output_sqnr_db"] = {name: sqnr_db(signal_energy[name], noise_energy[name]) for name in signal_energy}
    result["non_float_mismatches"] = mismatched
    result["constant_outputs"] = [name for name, (r_lo, r_hi, c_lo, c_hi) in ranges.items()
                                  if c_hi == c_lo and r_hi > r_lo]
    result["problems"] = problems
    return result


def _widen(bounds: list[float], reference: np.ndarray, candidate: np.ndarray) -> None:
    """Grow ``[ref min, ref max, candidate min, candidate max]`` by one feed's outputs."""
    if reference.size:
        bounds[:] = [min(bounds[0], reference.min()), max(bounds[1], reference.max()),
                     min(bounds[2], candidate.min()), max(bounds[3], candidate.max())]


def run_cell(model_name: str, recipe: str, feeds_dir: Path, work: Path) -> dict[str, Any]:
    """Optimize corpus model ``model_name`` with ``recipe`` and check the written model (the child's job)."""
    from onnxsmith.models.corpus import get_corpus_model
    from onnxsmith.optimizer.pipeline import plan, optimize_file

    source = get_corpus_model(model_name).cache_path()
    calibration = load_feeds(feeds_dir / "calibration.npz")
    evaluation = load_feeds(feeds_dir / "evaluation.npz")
    output = work / "out.onnx"
    cell: dict[str, Any] = {"model": model_name, "recipe": recipe}
    start = time.perf_counter()
    if recipe == ANCHOR:
        return _run_anchor(cell, source, calibration, evaluation, work, start)
    try:
        planned = [p.name for p in plan(str(source), recipe)]
        print(PROGRESS_MARK + json.dumps({"plan": planned}), file=sys.stderr, flush=True)
        result = optimize_file(str(source), output, recipe=recipe, calib=calibration, evaluate_model=False,
                               progress=False, on_record=_print_progress)
    except Exception as exc:  # noqa: BLE001 - every exception becomes the cell's status
        cell.update(status=classify_exception(exc), seconds=time.perf_counter() - start, **error_fields(exc))
        return cell
    cell["optimize_seconds"] = result.seconds
    cell["timings"] = result.timings()
    cell["unverified_reason"] = result.unverified_reason
    cell["passes"] = [{"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 3),
                       "nodes": [r.nodes_before, r.nodes_after],
                       "changes": {k: v for k, v in r.changes.items() if _small(v)}} for r in result.records]
    cell["lossy_modified"] = any(not r.lossless and r.modified for r in result.records)
    cell["has_lossy_pass"] = any(not r.lossless for r in result.records)
    cell["skipped"] = skip_summary(result.records)
    cell["output_bytes"] = output.stat().st_size
    try:
        cell.update(compare_on_feeds(source, output, evaluation))
    except Exception as exc:  # noqa: BLE001 - the written model does not load or run
        cell.update(status="failed", stage="onnxruntime on the written model", **error_fields(exc))
        return cell
    finite = [v for v in cell["output_sqnr_db"].values() if v is not None]
    cell["min_sqnr_db"] = min(finite) if finite else None
    if cell["problems"]:
        cell.update(status="failed", error_type="OutputCheck", error=cell["problems"][0])
    else:
        cell["status"] = "ok"
    cell["seconds"] = time.perf_counter() - start
    return cell


ANCHOR = "ort-static"
"""The anchor column: onnxruntime's ``quantize_static`` in the strongest configuration found for it (QDQ,
per-channel int8 weights, uint8 activations, MinMax, Conv/MatMul/Gemm, no Q/DQ on MatMul outputs), on the model
converted to opset 13 where it is older."""


def _run_anchor(cell: dict[str, Any], source: Path, calibration: list, evaluation: list, work: Path,
                start: float) -> dict[str, Any]:
    """The anchor cell: quantize a copy of ``source`` (onnxruntime writes files beside it) and compare as above."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType

    copy = work / "fp32.onnx"
    model = onnx.load(str(source))
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        model = onnx.version_converter.convert_version(model, 13)  # per-channel QDQ needs opset 13
    onnx.save(model, str(copy))
    os.chdir(work)  # and into the working directory
    output = work / "out.onnx"
    try:
        ort_static_qdq(copy, output, calibration, ["Conv", "MatMul", "Gemm"], CalibrationMethod.MinMax,
                       QuantType.QInt8)
        cell.update(compare_on_feeds(source, output, evaluation))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer or its output failing is the cell
        cell.update(status="failed", seconds=time.perf_counter() - start, **error_fields(exc))
        return cell
    finite = [v for v in cell["output_sqnr_db"].values() if v is not None]
    cell.update(min_sqnr_db=min(finite) if finite else None, lossy_modified=True, has_lossy_pass=True,
                skipped={}, seconds=time.perf_counter() - start)
    cell["status"] = "failed" if cell["problems"] else "ok"
    if cell["problems"]:
        cell.update(error_type="OutputCheck", error=cell["problems"][0])
    return cell


def _small(value: Any) -> bool:
    """Whether a pass ``changes`` value is small enough for the JSON (numbers, short strings, short lists)."""
    if isinstance(value, (int, float, bool)) or value is None:
        return True
    if isinstance(value, str):
        return len(value) < 200
    if isinstance(value, (list, tuple, dict)):
        return len(json.dumps(value, default=str)) < 400
    return False


def _print_progress(record: Any) -> None:
    print(PROGRESS_MARK + json.dumps({"done": record.name, "seconds": round(record.seconds, 2)}), file=sys.stderr,
          flush=True)


def child_main(model_name: str, recipe: str, feeds_dir: Path) -> None:
    """Run one cell and print its JSON on one stdout line (after :data:`CHILD_MARK`)."""
    with tempfile.TemporaryDirectory(prefix="corpus-cell-") as work:
        cell = run_cell(model_name, recipe, feeds_dir, Path(work))
    print(CHILD_MARK + json.dumps(json_safe(cell, infinities=True), default=str), flush=True)


# --------------------------------------------------------------------------------------------------------------
# The parent: the matrix
# --------------------------------------------------------------------------------------------------------------

def spawn_cell(model_name: str, recipe: str, feeds_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one cell in a child process (its own process group, killed whole on timeout) and parse its result."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, recipe, str(feeds_dir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - start
    for line in reversed(stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            cell = json.loads(line[len(CHILD_MARK):])
            cell["wall_seconds"] = wall
            return cell
    cell = {"model": model_name, "recipe": recipe, "status": "failed", "wall_seconds": wall,
            "running_pass": _running_pass(stderr)}
    if timed_out:
        cell.update(timeout=True, error_type="Timeout",
                    error=f"timeout after {timeout_s:.0f} s (running: {cell['running_pass'] or '?'})")
    else:
        tail = [line for line in stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_MARK)]
        signal_name = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        cell.update(error_type="ChildDied", error=f"child died ({signal_name}): {tail[-1] if tail else 'no output'}",
                    stderr_tail=tail[-5:])
    return cell


def _running_pass(stderr: str) -> str | None:
    """The pass a killed child was in: the first planned pass after the last one it reported done."""
    planned, done = [], 0
    for line in stderr.splitlines():
        if line.startswith(PROGRESS_MARK):
            event = json.loads(line[len(PROGRESS_MARK):])
            if "plan" in event:
                planned = event["plan"]
            else:
                done += 1
    if not planned:
        return "loading / planning"
    return planned[done] if done < len(planned) else "checking the written model"


def cell_text(cell: dict[str, Any]) -> str:
    """The table cell: SQNR, ``=``, ``no-op``, a short refusal or failure; ``*`` marks reported skips."""
    status = cell.get("status")
    if status == "ok":
        sqnr = cell.get("min_sqnr_db")
        if cell.get("has_lossy_pass") and not cell.get("lossy_modified"):
            text = "no-op"
        elif sqnr == "inf" or (sqnr is None and not cell.get("output_sqnr_db")):
            text = "="
        elif sqnr is None or sqnr == "-inf":
            text = "-inf dB"
        else:
            text = f"{sqnr:.1f} dB"
        if cell.get("ort_optimized_error"):
            text += " †"
        if cell.get("constant_outputs"):
            text += " !"
        if cell.get("skipped", {}).get("count"):
            text += " *"
        return text
    if status == "refused":
        return "refused"
    if cell.get("timeout"):
        return f"timeout ({cell.get('running_pass') or '?'})"
    return f"FAILED ({cell.get('error_pass') or cell.get('stage') or cell.get('error_type', '?')})"


def parse_recipe_timeouts(text: str) -> dict[str, float]:
    """``R=S,R2=S2`` as ``{R: S}``."""
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        recipe, _, seconds = item.partition("=")
        limits[recipe.strip()] = float(seconds)
    return limits


def write_feeds(model_name: str, folder: Path, calib: int, evaluation: int) -> None:
    """The model's calibration and evaluation feeds as two ``.npz`` files the children read."""
    from onnxsmith.models.corpus import calibration_feeds, evaluation_feeds

    folder.mkdir(parents=True, exist_ok=True)
    save_feeds(folder / "calibration.npz", calibration_feeds(model_name, calib))
    save_feeds(folder / "evaluation.npz", evaluation_feeds(model_name, evaluation))


def print_report(document: dict[str, Any], models: list[str], recipes: list[str]) -> str:
    """The markdown report: the table, the skip reasons, the refusals and failures; returned and printed."""
    cells = {(c["model"], c["recipe"]): c for c in document["cells"]}
    rows = [[model] + [cell_text(cells[(model, r)]) if (model, r) in cells else "" for r in recipes]
            for model in models]
    lines = [markdown_table(["model"] + recipes, rows), "",
             "Cells: min output SQNR vs FP32 over float outputs on the evaluation feeds; `=` identical outputs; "
             "`no-op` no lossy pass changed the model; `*` passes reported skipped nodes (below); `!` an output "
             "is constant over all evaluation feeds while FP32's varies (collapsed); `†` onnxruntime could not "
             "create a session with its graph optimizations on (measured with them off)."]
    skipped = [(c, c["skipped"]) for c in document["cells"] if c.get("skipped", {}).get("count")]
    if skipped:
        lines += ["", "Skipped nodes (count: pass: reason):", ""]
        for cell, summary in skipped:
            reasons = "; ".join(f"{n}x {r}" for r, n in summary["reasons"].items())
            lines.append(f"- {cell['model']} / {cell['recipe']}: {summary['count']} skipped: {reasons}")
    for status in ("refused", "failed"):
        bad = [c for c in document["cells"] if c.get("status") == status]
        if bad:
            lines += ["", f"{status.capitalize()} cells:", ""]
            for cell in bad:
                origin = cell.get("onnxsmith_frame") or cell.get("innermost_frame") or ""
                cause = f" | cause {cell['cause_type']}: {cell['cause']}" if cell.get("cause") else ""
                lines.append(f"- {cell['model']} / {cell['recipe']}: {cell.get('error_type')}: {cell.get('error')}"
                             f"{cause}{f' [{origin}]' if origin else ''}")
    report = "\n".join(lines)
    print(report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="comma-separated corpus models (default: all)")
    parser.add_argument("--recipes", help=f"comma-separated built-in recipes or {ANCHOR!r} (default: the anchor "
                                          "and every built-in recipe)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per cell (default 240)")
    parser.add_argument("--recipe-timeout", default="", help="per-recipe limits, e.g. ptq4vit=120,w4a4-kd=90")
    parser.add_argument("--calib", type=int, default=8, help="calibration feeds per model (default 8)")
    parser.add_argument("--eval", type=int, default=8, help="evaluation feeds per model (default 8)")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of an existing --json file")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "RECIPE", "FEEDS_DIR"), help=argparse.SUPPRESS)


def child(args: argparse.Namespace) -> int | None:
    """In a child process (``--child``): run its cell, exit 0."""
    if not args.child:
        return None
    child_main(args.child[0], args.child[1], Path(args.child[2]))
    return 0


def run(args: argparse.Namespace, report: Report) -> None:
    from onnxsmith.models.corpus import corpus_names, fetch_many
    from onnxsmith.optimizer.recipes import builtin_recipes

    models = args.models.split(",") if args.models else corpus_names()
    recipes = args.recipes.split(",") if args.recipes else [ANCHOR, *builtin_recipes()]
    limits = parse_recipe_timeouts(args.recipe_timeout)
    fetch_many(models)
    document = report.document
    document.update(calib=args.calib, eval=args.eval, timeout_s=args.timeout, recipe_timeouts_s=limits,
                    models=models, recipes=recipes, cells=[])
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if args.resume and args.out.exists():
        done = {(c["model"], c["recipe"]): c for c in json.loads(args.out.read_text()).get("cells", [])}
    with tempfile.TemporaryDirectory(prefix="corpus-feeds-") as feeds_root:
        for model in models:
            feeds_dir = Path(feeds_root) / model
            write_feeds(model, feeds_dir, args.calib, args.eval)
            for recipe in recipes:
                if (model, recipe) in done:
                    cell = done[(model, recipe)]
                else:
                    cell = spawn_cell(model, recipe, feeds_dir, limits.get(recipe, args.timeout))
                document["cells"].append(cell)
                print(f"{model:18} {recipe:15} {cell.get('wall_seconds', 0):6.1f} s  {cell_text(cell)}"
                      f"{'  ' + cell['error'] if cell.get('status') != 'ok' else ''}", flush=True)
                report.save()
    print()
    document["report_markdown"] = print_report(document, models, recipes)
    report.finish(f"cells: {dict(Counter(c.get('status') for c in document['cells']))}")
    args.out.with_suffix(".md").write_text(document["report_markdown"] + "\n")


main = Benchmark("corpus", __doc__, run, add_arguments, child=child,
                 quick={"models": "mtcnn-pnet", "recipes": f"{ANCHOR},cleanup,w8a8", "calib": 2, "eval": 2}).main

if __name__ == "__main__":
    sys.exit(main())
