"""Run reports: ``report.json`` (machine-readable), ``report.md`` (the same, for people) and ``report.html``.

``report.html`` is one self-contained page (inline CSS, charts as base64 PNG data URIs, no script, nothing
fetched) built from the JSON data alone, with the sections :data:`HTML_SECTIONS` in that order; a section without
data says so in one line.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

from onnxsmith.analysis.trt_lint import summary
from onnxsmith.core.errors import UserError
from onnxsmith.analysis.sparsity import inspect_sparsity
from onnxsmith.optimizer import report_plots
from onnxsmith.core.model_io import load_model
from onnxsmith.optimizer.pipeline import OptimizeResult
from onnxsmith.optimizer.report_plots import TwinRange, UniformRange

HTML_SECTIONS = ("passes", "fidelity", "layer-sqnr", "activation-ranges", "sparsity", "size-latency", "trt-lint")
"""The ``<section id=...>`` of ``report.html``, in page order; every one is always present."""
MIN_ZERO_FRACTION = 0.1
"""Weights with fewer zeros than this and no N:M pattern are left out of the report's ``sparsity`` rows (INT8
rounding alone zeroes a few percent of a dense weight)."""


def report_data(result: OptimizeResult) -> dict[str, Any]:
    """The report as plain JSON-ready data (infinite SQNR written as the string 'inf')."""
    return json_ready({
        "source": result.source,
        "input": str(result.input_path),
        "output": str(result.output_path),
        "recipe": {"name": result.recipe.name, "source": result.recipe.source},
        "seconds": result.seconds,
        "verification": result.unverified_reason or "every lossless pass verified against onnxruntime",
        "passes": [asdict(r) for r in result.records],
        "evaluation": result.evaluation.as_dict() if result.evaluation else None,
        "trt_lint": None if result.trt_lint is None else {
            "summary": summary(result.trt_lint), "findings": [f.as_dict() for f in result.trt_lint]},
        "sparsity": sparsity_data(result.output_path),
    })


def sparsity_data(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The output model's GEMM weights with zeros (see :func:`inspect_sparsity`): ``{"weights": all of them,
    "rows": [{"node", "weight", "zero_fraction", "pattern"} of those with an N:M pattern or at least
    MIN_ZERO_FRACTION zeros]}``; ``{"error": ...}`` when the model cannot be read back."""
    try:
        rows = inspect_sparsity(load_model(model_path))
    except (OSError, ValueError, UserError) as error:  # the report must not fail on a side figure
        return {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
    return {"weights": len(rows), "rows": [
        {"node": r.node, "weight": r.weight, "zero_fraction": r.zero_fraction, "pattern": r.pattern}
        for r in rows if r.pattern is not None or r.zero_fraction >= MIN_ZERO_FRACTION]}


def write_report(result: OptimizeResult, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``folder`` (created if its parent exists);
    returns the JSON and Markdown paths (the HTML page lies beside them)."""
    folder = Path(folder)
    if not folder.parent.exists():
        raise UserError(f"report folder's parent does not exist: {folder.parent}")
    folder.mkdir(exist_ok=True)
    data = report_data(result)
    json_path = folder / "report.json"
    md_path = folder / "report.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown(data))
    (folder / "report.html").write_text(html_report(data), encoding="utf-8")
    return json_path, md_path


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: pass table, then the evaluation."""
    lines = [
        f"# onnxsmith report: {data['source']}",
        "",
        f"- recipe: `{data['recipe']['name']}` ({data['recipe']['source']})",
        f"- output: `{data['output']}`",
        f"- verification: {data['verification']}",
        f"- total time: {data['seconds']:.2f} s",
        "- charts (per-layer SQNR, activation ranges, sparsity, size and latency): [report.html](report.html)",
        "",
        "| pass | lossless | time (s) | changed | nodes | changes | max abs error |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in data["passes"]:
        verification = record["verification"]
        error = f"{verification['max_abs_error']:.3g}" if verification else "-"
        changes = _changes_text(record)
        lines.append(
            f"| {record['name']} | {'yes' if record['lossless'] else 'no'} | {record['seconds']:.3f} | "
            f"{'yes' if record['modified'] else 'no'} | {record['nodes_before']} → {record['nodes_after']} | "
            f"{changes} | {error} |"
        )
    evaluation = data.get("evaluation")
    if evaluation:
        lines += ["", f"## Evaluation ({evaluation['feeds']} feeds)", "", "| figure | value |", "|---|---|"]
        for key, value in evaluation["metrics"].items():
            lines.append(f"| {key} | {_fmt(value)} |")
        if evaluation.get("routing_agreement") is not None:
            lines.append(f"| routing agreement (top-1 expert unchanged) | {_fmt(evaluation['routing_agreement'])} |")
        for name, value in evaluation["output_sqnr_db"].items():
            lines.append(f"| SQNR of `{name}` (dB) | {_fmt(value)} |")
        for which, value in evaluation["latency_ms"].items():
            lines.append(f"| latency, {which} (ms) | {value:.2f} |")
        for which, value in evaluation["size_bytes"].items():
            lines.append(f"| size, {which} (MB) | {value / 1e6:.2f} |")
    lines += _layer_table(data)
    lines += _lint_lines(data)
    return "\n".join(lines) + "\n"


def _lint_lines(data: dict[str, Any]) -> list[str]:
    """The TensorRT lint findings, when the recipe targeted TensorRT."""
    lint = data.get("trt_lint")
    if lint is None:
        return []
    counts = lint["summary"]
    lines = ["", "## TensorRT readiness", "",
             f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} hints."]
    if lint["findings"]:
        lines += ["", "| severity | rule | node | problem | fix |", "|---|---|---|---|---|"]
        lines += [f"| {f['severity']} | {f['rule']} | `{f['node']}` | {f['message']} | {f['fix']} |"
                  for f in lint["findings"]]
    return lines


def _layer_table(data: dict[str, Any]) -> list[str]:
    """Per-layer SQNR of quantized weights (from the pass details) and activations (from the evaluation), worst
    first."""
    rows = layer_sqnr_rows(data)
    if not rows:
        return []
    lines = ["", "## Per-layer SQNR (worst first)", "", "| tensor | kind | SQNR (dB) |", "|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {_fmt(value)} |" for name, kind, value in rows]
    return lines


def layer_sqnr_rows(data: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(tensor, "weight" | "activation", SQNR dB)`` of every quantized weight (pass details) and activation
    (evaluation), worst first; values may be the string ``"inf"`` of :func:`report_data`."""
    rows = [
        (detail.get("tensor", detail.get("node", "?")), "weight", detail["sqnr_db"])
        for record in data["passes"]
        for detail in record.get("details", [])
        if detail.get("kind") == "weight" and "sqnr_db" in detail
    ]
    evaluation = data.get("evaluation") or {}
    rows += [(name, "activation", value) for name, value in evaluation.get("activation_sqnr_db", {}).items()]
    rows.sort(key=lambda row: float(row[2]))
    return rows


def activation_ranges(data: dict[str, Any]) -> dict[str, UniformRange | TwinRange | None]:
    """The quantization range chosen for each activation tensor, from the pass details (the last pass that
    quantized it wins): a :class:`TwinRange` for twin-uniform inputs, a :class:`UniformRange` for a plain grid
    (``scale`` with ``zero_point`` and ``dtype``, or symmetric ``bits``), None when not recorded (e.g. per-group
    fake quantization)."""
    ranges: dict[str, UniformRange | TwinRange | None] = {}
    for record in data["passes"]:
        for detail in record.get("details", []):
            if detail.get("kind") == "activation" and "tensor" in detail:
                ranges[detail["tensor"]] = _activation_range(detail)
    return ranges


def _activation_range(detail: dict[str, Any]) -> UniformRange | TwinRange | None:
    dtype = str(detail.get("dtype", ""))
    bits = int(detail.get("bits", 8))
    half = 2 ** (bits - 1)
    if "delta_r1" in detail and "delta_r2" in detail and "split" in detail:
        d1, d2, split = float(detail["delta_r1"]), float(detail["delta_r2"]), float(detail["split"])
        # softmax layout: R1 = levels 0..half-1 of delta_r1 below the split; gelu: R1 = -half..0 below 0.
        r1_low = -half * d1 if dtype.endswith("gelu") else 0.0
        return TwinRange(r1_low, split, (half - 1) * d2, d1, d2)
    scale = detail.get("scale")
    if not isinstance(scale, (int, float)):
        return None
    if "zero_point" in detail:
        zero_point = int(detail["zero_point"])
        qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
        return UniformRange((qmin - zero_point) * scale, (qmax - zero_point) * scale)
    return UniformRange(-half * scale, (half - 1) * scale)  # symmetric levels (ptq-qdq, any storage type)


def html_report(data: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (see the module docstring)."""
    sections = {
        "passes": ("Passes", _html_passes(data)),
        "fidelity": ("Fidelity: FP32 vs optimized", _html_fidelity(data)),
        "layer-sqnr": ("Per-layer SQNR (worst first)", _html_layer_sqnr(data)),
        "activation-ranges": ("Activation histograms and quantization ranges", _html_activation_ranges(data)),
        "sparsity": ("Weight sparsity", _html_sparsity(data)),
        "size-latency": ("Size and latency", _html_size_latency(data)),
        "trt-lint": ("TensorRT readiness", _html_lint(data)),
    }
    body = "\n".join(f'<section id="{key}">\n<h2>{_esc(title)}</h2>\n{content}\n</section>'
                     for key, (title, content) in ((k, sections[k]) for k in HTML_SECTIONS))
    summary_items = "".join(f"<li>{item}</li>" for item in (
        f"recipe <code>{_esc(data['recipe']['name'])}</code> ({_esc(data['recipe']['source'])})",
        f"input <code>{_esc(data['input'])}</code>", f"output <code>{_esc(data['output'])}</code>",
        f"verification: {_esc(data['verification'])}", f"total time {data['seconds']:.2f} s"))
    nav = " · ".join(f'<a href="#{key}">{_esc(sections[key][0])}</a>' for key in HTML_SECTIONS)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>onnxsmith report: {_esc(data['source'])}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>onnxsmith report: {_esc(data['source'])}</h1>
<ul class="summary">{summary_items}</ul>
<nav>{nav}</nav>
{body}
</body>
</html>
"""


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
section { margin-bottom: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .9em; } p.none, p.note { color: #666; font-style: italic; }
nav { font-size: .85em; margin-bottom: 1.5em; }
.grid { display: flex; flex-wrap: wrap; gap: .5em; } img { max-width: 100%; }
tr.bad td { background: #fde8e8; }
"""


def _html_passes(data: dict[str, Any]) -> str:
    if not data["passes"]:
        return _none("No pass ran.")
    rows = []
    for record in data["passes"]:
        verification = record["verification"]
        if verification:
            error = f"{verification['max_abs_error']:.3g}" + ("" if verification.get("within_tolerance", True)
                                                              else " (over tolerance)")
        else:
            error = "-"
        changes = _changes_text(record)
        rows.append([record["name"], "yes" if record["lossless"] else "no", f"{record['seconds']:.3f}",
                     f"{record.get('calibration_seconds', 0.0):.3f}", "yes" if record["modified"] else "no",
                     f"{record['nodes_before']} → {record['nodes_after']}", changes, error])
    return _table(["pass", "lossless", "time (s)", "calibration (s)", "changed", "nodes", "changes",
                   "verification max abs error"], rows, numeric={2, 3, 7})


def _html_fidelity(data: dict[str, Any]) -> str:
    evaluation = data.get("evaluation")
    if not evaluation:
        return _none("Not evaluated (pass --evaluate for a model file; zoo models are evaluated by default).")
    rows = []
    metrics = evaluation["metrics"]
    for key, value in metrics.items():
        if key.endswith("_fp") and key.removesuffix("_fp") in metrics:
            continue
        reference = metrics.get(f"{key}_fp")
        rows.append([f"metric: {key}", "-" if reference is None else _fmt(reference), _fmt(value)])
    for name, value in evaluation["output_sqnr_db"].items():
        rows.append([f"output SQNR of {name} (dB)", "reference", _fmt(value)])
    if evaluation.get("routing_agreement") is not None:
        rows.append(["routing agreement (top-1 expert unchanged)", "1 (reference)",
                     _fmt(evaluation["routing_agreement"])])
        for router, value in evaluation.get("routing_agreement_by_layer", {}).items():
            rows.append([f"routing agreement of {router}", "1 (reference)", _fmt(value)])
    head = f"<p>{evaluation['feeds']} evaluation feeds.</p>"
    if not rows:
        return head + _none("The evaluation holds no metric or float output.")
    return head + _table(["figure", "FP32", "optimized"], rows, numeric={1, 2})


def _html_layer_sqnr(data: dict[str, Any]) -> str:
    rows = layer_sqnr_rows(data)
    if not rows:
        return _none("No quantized weight or activation with a measured SQNR.")
    finite = [(name, kind, float(value)) for name, kind, value in rows if math.isfinite(float(value))]
    notes = []
    if len(finite) < len(rows):
        notes.append(f"{len(rows) - len(finite)} layers with infinite SQNR (lossless) are not drawn.")
    if len(finite) > report_plots.MAX_BARS:
        notes.append(f"Showing the worst {report_plots.MAX_BARS} of {len(finite)}; every layer is in report.json "
                     "and report.md.")
    parts = [_img(report_plots.layer_sqnr_chart(finite), "per-layer SQNR bar chart")] if finite else []
    parts += [f'<p class="note">{_esc(note)}</p>' for note in notes]
    return "\n".join(parts)


def _html_activation_ranges(data: dict[str, Any]) -> str:
    histograms = (data.get("evaluation") or {}).get("activation_histograms") or {}
    if not histograms:
        return _none("No activation histogram: the model quantizes no activation, or it was not evaluated.")
    ranges = activation_ranges(data)
    images = [_img(report_plots.activation_histogram_chart(tensor, h["edges"], h["counts"], ranges.get(tensor)),
                   f"histogram of {tensor}") for tensor, h in histograms.items()]
    note = (f'<p class="note">{len(histograms)} activations (worst SQNR first, at most 32), FP32 values on the '
            "evaluation feeds; red lines: the quantization grid's range; shaded: twin-uniform R1 / R2 and the "
            "split (dashed).</p>")
    return note + '\n<div class="grid">' + "\n".join(images) + "</div>"


def _html_sparsity(data: dict[str, Any]) -> str:
    sparsity = data.get("sparsity")
    if not sparsity or "error" in sparsity:
        reason = f" ({sparsity['error']})" if sparsity and "error" in sparsity else ""
        return _none(f"Sparsity was not inspected{reason}.")
    rows = sparsity["rows"]
    if not rows:
        return _none(f"No sparse weight: none of the {sparsity['weights']} GEMM weights has an N:M pattern or "
                     f"{MIN_ZERO_FRACTION:.0%} zeros.")
    patterned = sum(1 for r in rows if r["pattern"])
    parts = [f"<p>{patterned} of {sparsity['weights']} GEMM weights are N:M sparse on their input axis; "
             f"{len(rows)} have at least {MIN_ZERO_FRACTION:.0%} zeros.</p>",
             _img(report_plots.sparsity_chart([(r["node"], float(r["zero_fraction"]), r["pattern"]) for r in rows]),
                  "per-layer zero fraction bar chart")]
    if len(rows) > report_plots.MAX_BARS:
        parts.append(f'<p class="note">Showing the first {report_plots.MAX_BARS} of {len(rows)} in node order.</p>')
    return "\n".join(parts)


def _html_size_latency(data: dict[str, Any]) -> str:
    evaluation = data.get("evaluation")
    if not evaluation or not (evaluation.get("size_bytes") or evaluation.get("latency_ms")):
        return _none("Not evaluated: no size or latency was measured.")
    size, latency = evaluation.get("size_bytes", {}), evaluation.get("latency_ms", {})
    rows = [["size (MB)", *(f"{size[k] / 1e6:.3f}" if k in size else "-" for k in ("reference", "candidate"))],
            ["latency (ms, median, onnxruntime CPU)",
             *(f"{latency[k]:.3f}" if k in latency else "-" for k in ("reference", "candidate"))]]
    return (_table(["figure", "FP32", "optimized"], rows, numeric={1, 2}) + "\n"
            + _img(report_plots.size_latency_chart(size, latency), "size and latency bar chart"))


def _html_lint(data: dict[str, Any]) -> str:
    lint = data.get("trt_lint")
    if lint is None:
        return _none("No TensorRT lint: the recipe does not target TensorRT.")
    counts = lint["summary"]
    head = f"<p>{counts['error']} errors, {counts['warning']} warnings, {counts['info']} hints.</p>"
    if not lint["findings"]:
        return head + _none("No finding.")
    rows = [[f["severity"], f["rule"], f["node"], f["message"], f["fix"]] for f in lint["findings"]]
    return head + _table(["severity", "rule", "node", "problem", "fix"], rows)


def _table(header: list[str], rows: list[list[Any]], numeric: Collection[int] = ()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(
        f'<td class="num">{_esc(cell)}</td>' if i in numeric else f"<td>{_esc(cell)}</td>"
        for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _none(text: str) -> str:
    return f'<p class="none">{_esc(text)}</p>'


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats (nested in dicts and lists) written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def _changes_text(record: dict) -> str:
    """A pass record's change counts as ``k=v`` pairs, or why an optional pass was skipped."""
    if record.get("skipped"):
        return f"skipped: {record['skipped']}"
    return ", ".join(f"{k}={v}" for k, v in record["changes"].items()) or "-"
