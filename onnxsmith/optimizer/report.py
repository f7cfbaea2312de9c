"""Run reports: ``report.json`` (machine-readable) and ``report.md`` (the same, for people)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from onnxsmith.backends.trt_lint import summary
from onnxsmith.errors import UserError
from onnxsmith.optimizer.pipeline import OptimizeResult


def report_data(result: OptimizeResult) -> dict[str, Any]:
    """The report as plain JSON-ready data (infinite SQNR written as the string 'inf')."""
    return _finite({
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
    })


def write_report(result: OptimizeResult, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``folder`` (created if its parent exists)."""
    folder = Path(folder)
    if not folder.parent.exists():
        raise UserError(f"report folder's parent does not exist: {folder.parent}")
    folder.mkdir(exist_ok=True)
    data = report_data(result)
    json_path = folder / "report.json"
    md_path = folder / "report.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown(data))
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
        "",
        "| pass | lossless | time (s) | changed | nodes | changes | max abs error |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in data["passes"]:
        verification = record["verification"]
        error = f"{verification['max_abs_error']:.3g}" if verification else "-"
        changes = ", ".join(f"{k}={v}" for k, v in record["changes"].items()) or "-"
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
    rows = [
        (detail["tensor"], "weight", detail["sqnr_db"])
        for record in data["passes"]
        for detail in record.get("details", [])
        if detail.get("kind") == "weight" and "sqnr_db" in detail
    ]
    evaluation = data.get("evaluation") or {}
    rows += [(name, "activation", value) for name, value in evaluation.get("activation_sqnr_db", {}).items()]
    if not rows:
        return []
    rows.sort(key=lambda row: float(row[2]))
    lines = ["", "## Per-layer SQNR (worst first)", "", "| tensor | kind | SQNR (dB) |", "|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {_fmt(value)} |" for name, kind, value in rows]
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
