"""``optimize lint-trt``: whether TensorRT 10 can parse a model and run its quantization as intended."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from onnxsmith.analysis.trt_lint import RULES, Finding, lint_model, summary
from onnxsmith.core.model_io import load_model
from onnxsmith.optimizer.subcommands import subcommand_parser

COMMAND = "lint-trt"
SHOWN = 20
"""Findings printed after an ``optimize`` run (the report holds all of them)."""


def build_lint_parser() -> argparse.ArgumentParser:
    """The ``optimize lint-trt`` argument parser."""
    rules = "\n".join(f"  {name:20} {text}" for name, text in RULES.items())
    parser = subcommand_parser(
        COMMAND,
        "Check an ONNX model against TensorRT 10's ONNX parser and quantization rules.\n"
        "Each finding names the node, the rule and the fix.",
        [("model.opt.onnx", "errors and warnings"), ("model.opt.onnx --info", "also speed hints"),
         ("model.opt.onnx --json", "one JSON object: findings and counts")],
        extra_epilog=f"rules:\n{rules}\n\n",
        exit_codes="exit codes: 0 no errors, 1 errors found, 2 bad input (one-line message; --debug for a trace)")
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    parser.add_argument("--info", action="store_true", help="also show info findings (speed hints)")
    return parser


def run_lint(args: argparse.Namespace) -> int:
    """Print the findings for ``args.model``; exit code 1 when there is an error finding."""
    findings = lint_model(load_model(args.model))
    shown = [f for f in findings if args.info or f.severity != "info"]
    if args.json:
        print(json.dumps({"findings": [f.as_dict() for f in shown], "summary": summary(findings)}, indent=2))
    else:
        for line in report_lines(shown, limit=None):
            print(line)
        print(summary_line(findings))
    return 1 if summary(findings)["error"] else 0


def summary_line(findings: Sequence[Finding]) -> str:
    counts = summary(findings)
    return f"TensorRT lint: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} hints"


def report_lines(findings: Sequence[Finding], limit: int | None = SHOWN) -> list[str]:
    """One line per finding (the first ``limit``), then how many were left out."""
    lines = [finding.line() for finding in findings[:limit]]
    if limit is not None and len(findings) > limit:
        lines.append(f"... and {len(findings) - limit} more (see the report)")
    return lines
