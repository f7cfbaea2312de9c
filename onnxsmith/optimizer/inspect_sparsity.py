"""``optimize inspect-sparsity``: the command line of :func:`onnxsmith.analysis.sparsity.inspect_sparsity`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from onnxsmith.analysis.sparsity import format_table, inspect_sparsity, summary
from onnxsmith.core.model_io import load_model
from onnxsmith.optimizer.subcommands import subcommand_parser

COMMAND = "inspect-sparsity"


def build_inspect_parser() -> argparse.ArgumentParser:
    """The ``optimize inspect-sparsity`` argument parser."""
    parser = subcommand_parser(
        COMMAND,
        "Report which MatMul/Gemm/Conv weights are N:M (2:4, 4:8) sparse on their input axis,\n"
        "the axis TensorRT's sparse kernels need (QDQ models: the integer weights are read).",
        [("model.onnx", "table and summary"), ("model.onnx --json", "one JSON object: weights and summary")])
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report for ``args.model``; a bad file raises :class:`~onnxsmith.core.errors.UserError`."""
    rows = inspect_sparsity(load_model(args.model))
    if args.json:
        print(json.dumps({"weights": [asdict(row) for row in rows], "summary": summary(rows)}, indent=2))
    else:
        print(format_table(rows))
    return 0
