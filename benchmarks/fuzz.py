"""Fuzzing: the properties of ``tests/test_fuzz_passes.py`` on many more random ONNX graphs than CI runs.

Every configuration (lossless passes, lossy passes, recipes) gets ``--examples / configurations`` generated models
(``tests/fuzz_graphs.py``); a case is ``modified``, ``unchanged``, ``skipped`` (a pass refused the model through a
PreconditionError) or a failure. Failures do not stop the run: each distinct error is counted and shown with the
blocks of its first model (``ONNXSMITH_FUZZ_DUMP=folder`` also saves every failing model). Hypothesis does not
shrink here; rerun the failing configuration under pytest for a minimal example.

    python benchmarks/fuzz.py                          # 5000 cases, seed 0, writes results/fuzz.json
    python benchmarks/fuzz.py --examples 2000 --seed 3 --configs int8-qdq-uint8,w8a8
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings

from _harness import environment, finish, markdown_table, one_line, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_fuzz_passes as properties  # noqa: E402  (the tests folder is not a package)
from fuzz_graphs import FuzzModel, fuzz_models  # noqa: E402


def configurations() -> dict[str, tuple[str, Any]]:
    """Every configuration name -> (property, check function)."""
    table: dict[str, tuple[str, Any]] = {}
    table.update({name: ("lossless", properties.check_lossless) for name in sorted(properties.LOSSLESS)})
    table.update({name: ("lossy", properties.check_lossy) for name in sorted(properties.LOSSY)})
    table.update({name: ("recipe", properties.check_lossy) for name in sorted(properties.RECIPES)})
    return table


def fuzz_one(name: str, check: Any, examples: int, seed_value: int) -> dict[str, Any]:
    """Run ``check`` on ``examples`` generated models; outcome counts, failures and seconds."""
    outcomes: Counter[str] = Counter()
    failures: dict[str, dict[str, Any]] = {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(fm=fuzz_models())
    def run(fm: FuzzModel) -> None:
        try:
            outcomes[check(fm, name)] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
            outcomes["failed"] += 1
            key = one_line(exc)[:300]
            entry = failures.setdefault(key, {"error": key, "count": 0, "first_model": repr(fm)})
            entry["count"] += 1

    start = time.perf_counter()
    run()
    return {"cases": sum(outcomes.values()), **{k: outcomes.get(k, 0) for k in
            ("modified", "unchanged", "skipped", "failed")}, "seconds": time.perf_counter() - start,
            "failures": list(failures.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="generated cases in total (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (configuration i uses seed + i)")
    parser.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # "verification skipped" style warnings are expected on odd graphs
    table = configurations()
    names = [n for n in args.configs.split(",") if n] or list(table)
    unknown = set(names) - set(table)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(table)}")
    per_config = max(1, args.examples // len(names))
    start = time.perf_counter()
    document: dict[str, Any] = {"environment": environment(), "examples": args.examples, "seed": args.seed,
                                "per_configuration": per_config, "configurations": {}, "complete": False}
    rows = []
    for index, name in enumerate(names):
        kind, check = table[name]
        result = fuzz_one(name, check, per_config, args.seed + index)
        document["configurations"][name] = {"property": kind, **result}
        write_json(args.out, document)
        rows.append([kind, name, str(result["cases"]), str(result["modified"]), str(result["unchanged"]),
                     str(result["skipped"]), str(result["failed"]), f"{result['seconds']:.1f}"])
        print(f"{kind:8s} {name:30s} {result['cases']:5d} cases, {result['failed']} failed, "
              f"{result['seconds']:.1f} s", flush=True)
    print()
    print(markdown_table(["property", "configuration", "cases", "modified", "unchanged", "skipped", "failed", "s"],
                         rows))
    total = {k: sum(c[k] for c in document["configurations"].values())
             for k in ("cases", "modified", "unchanged", "skipped", "failed")}
    document["total"] = total
    print(f"\ntotal: {total}")
    for name, result in document["configurations"].items():
        for failure in result["failures"]:
            print(f"FAILED {name} x{failure['count']}: {failure['error']}\n    first model: {failure['first_model']}")
    finish(document, "cases: generated models per configuration; skipped: refused through a PreconditionError",
           start)
    write_json(args.out, document)
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
