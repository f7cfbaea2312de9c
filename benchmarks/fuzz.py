"""Fuzzing: the properties of ``onnxsmith.testing.fuzz_properties`` on many more random ONNX graphs than CI runs.

Every configuration (lossless passes, lossy passes, recipes) gets ``--examples / configurations`` generated models
(``onnxsmith.testing.fuzz_graphs``); a case is ``modified``, ``unchanged``, ``skipped`` (a pass refused the model
through a PreconditionError) or a failure. Failures do not stop the run: each distinct error is counted and shown
with the blocks of its first model (``ONNXSMITH_FUZZ_DUMP=folder`` also saves every failing model). Hypothesis does
not shrink here; rerun the failing configuration under pytest (``tests/test_fuzz_passes.py``) for a minimal
example.

    python benchmarks/fuzz.py                          # 5000 cases, seed 0, writes results/fuzz.json
    python benchmarks/fuzz.py --examples 2000 --seed 3 --configs int8-qdq-uint8,w8a8
    python benchmarks/fuzz.py --quick                  # 10 cases per configuration
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings

from harness import Benchmark, Report, markdown_table, one_line, parse_names
from onnxsmith.testing.fuzz_graphs import FuzzModel, fuzz_models
from onnxsmith.testing.fuzz_properties import Check, configurations

OUTCOMES = ("modified", "unchanged", "skipped", "failed")


def fuzz_one(name: str, check: Check, examples: int, seed_value: int) -> dict[str, Any]:
    """Run ``check`` on ``examples`` generated models; outcome counts, failures and seconds."""
    outcomes: Counter[str] = Counter()
    failures: dict[str, dict[str, Any]] = {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(fm=fuzz_models())
    def run_cases(fm: FuzzModel) -> None:
        try:
            outcomes[check(fm, name)] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
            outcomes["failed"] += 1
            key = one_line(exc)[:300]
            entry = failures.setdefault(key, {"error": key, "count": 0, "first_model": repr(fm)})
            entry["count"] += 1

    start = time.perf_counter()
    run_cases()
    return {"cases": sum(outcomes.values()), **{k: outcomes.get(k, 0) for k in OUTCOMES},
            "seconds": time.perf_counter() - start, "failures": list(failures.values())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=int, default=5000, help="generated cases in total (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (configuration i uses seed + i)")
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.configs = parse_names(parser, args.configs or None, list(configurations()), "configurations")


def run(args: argparse.Namespace, report: Report) -> int:
    logging.disable(logging.WARNING)  # "verification skipped" style warnings are expected on odd graphs
    table = configurations()
    per_config = max(1, args.examples // len(args.configs))
    document = report.document
    document.update(examples=args.examples, seed=args.seed, per_configuration=per_config, configurations={})
    rows = []
    for index, name in enumerate(args.configs):
        kind, check = table[name]
        result = fuzz_one(name, check, per_config, args.seed + index)
        document["configurations"][name] = {"property": kind, **result}
        report.save()
        rows.append([kind, name, *(str(result[k]) for k in ("cases", *OUTCOMES)), f"{result['seconds']:.1f}"])
        print(f"{kind:8s} {name:30s} {result['cases']:5d} cases, {result['failed']} failed, "
              f"{result['seconds']:.1f} s", flush=True)
    print()
    print(markdown_table(["property", "configuration", "cases", *OUTCOMES, "s"], rows))
    total = {k: sum(c[k] for c in document["configurations"].values()) for k in ("cases", *OUTCOMES)}
    document["total"] = total
    print(f"\ntotal: {total}")
    for name, result in document["configurations"].items():
        for failure in result["failures"]:
            print(f"FAILED {name} x{failure['count']}: {failure['error']}\n    first model: {failure['first_model']}")
    report.finish("cases: generated models per configuration; skipped: refused through a PreconditionError")
    return 1 if total["failed"] else 0


main = Benchmark("fuzz", __doc__, run, add_arguments, check_arguments, quick={"examples": 330}).main

if __name__ == "__main__":
    sys.exit(main())
