"""Accuracy-driven mixed precision: keep the fewest, most sensitive layers in float until a metric target holds.

The recipe runs once; when its evaluation meets the target, that model is the answer. Otherwise the quantized
layers are ranked by sensitivity, cheaply, from that first run: every layer gets the lowest SQNR among its
quantized weight (the pass details' ``sqnr_db``) and its quantized activation inputs (the evaluation's
``activation_sqnr_db``, mapped to the consuming nodes); the lowest SQNR is the most sensitive. The ``k`` most
sensitive layers are then excluded from the recipe's quantizing and pruning passes (``exclude_nodes``, and an
exact-name ``exclude_regex`` for passes that only take patterns), so they stay float / dense, with ``k`` growing
1, 2, 4, 8, ... and, once some ``k`` passes, a bisection between the last failing and the first passing ``k``
for the smallest passing one. The search stops when the target holds at the smallest ``k`` found, when the
time budget would be overrun by another attempt, or when every ranked layer is float.

The best model is always kept in ``output`` (moved there atomically): the passing attempt with the fewest float
layers, or, when no attempt passes, the attempt with the best metric value (ties: fewer float layers).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnxsmith.core.errors import UserError
from onnxsmith.optimizer.report import json_ready

SQNR = "sqnr"
ALIASES = {"cos": "cosine_mean", "ppl": "perplexity", "top1": "top1_agreement", "acc": "accuracy"}
METRICS = ("cosine_mean", "cosine_min", "perplexity", "top1_agreement", "accuracy", SQNR)
"""Metric names a target may use: the zoo models' score keys, and ``sqnr`` (dB of the first float output)."""
_OPERATORS = (">=", "<=", ">", "<")
_EXPRESSION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")
DEFAULT_TIME_BUDGET = 600.0


def _valid_names() -> str:
    aliases = ", ".join(f"{alias}={name}" for alias, name in ALIASES.items())
    return f"{', '.join(METRICS)} (aliases {aliases})"


@dataclass(frozen=True)
class Target:
    """A metric bound such as ``cosine_mean >= 0.995``."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse ``NAME OP NUMBER`` (OP one of >=, <=, >, <); a bad expression is a :class:`UserError`."""
        match = _EXPRESSION.match(text or "")
        if match is None:
            raise UserError(f"bad target metric {text!r}: write NAME>=VALUE or NAME<=VALUE, NAME one of "
                            f"{_valid_names()}")
        name, op, number = match.groups()
        name = ALIASES.get(name.lower(), name.lower())
        if name not in METRICS:
            raise UserError(f"unknown target metric {match.group(1)!r} in {text!r}; valid: {_valid_names()}")
        try:
            value = float(number)
        except ValueError:
            raise UserError(f"bad number {number!r} in target metric {text!r}") from None
        if not math.isfinite(value):
            raise UserError(f"target value must be finite, got {number!r}")
        return cls(name, op, value)

    @property
    def higher_is_better(self) -> bool:
        return self.op.startswith(">")

    def met(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return {">=": value >= self.value, "<=": value <= self.value,
                ">": value > self.value, "<": value < self.value}[self.op]

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (NaN is worst)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass
class Attempt:
    """One optimization run of the search: ``k`` layers kept float, its metric value and time."""

    k: int
    metric: float
    met: bool
    seconds: float
    excluded: list[str] = field(default_factory=list)


@dataclass
class SearchResult:
    """What the search found: the final (best) run, whether it meets the target, and every attempt."""

    target: Target
    target_met: bool
    metric: float
    excluded: list[str]
    attempts: list[Attempt]
    ranking: list[tuple[str, float]]
    """Quantized layers, most sensitive first, with their SQNR (dB) used for the ranking."""
    result: Any
    """The :class:`~onnxsmith.optimizer.pipeline.OptimizeResult` of the best attempt (its ``output_path`` is
    the search's output)."""
    stopped: str
    """Why the search ended: 'target met', 'time budget', 'all layers float' or 'no quantized layers'."""
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the ``mixed_precision`` key of report.json; non-finite floats as strings)."""
        return json_ready({
            "target": str(self.target),
            "metric": self.target.metric,
            "target_met": self.target_met,
            "value": self.metric,
            "float_layers": len(self.excluded),
            "excluded": list(self.excluded),
            "quantized_layers": len(self.ranking),
            "stopped": self.stopped,
            "seconds": self.seconds,
            "attempts": [{"k": a.k, "metric": a.metric, "met": a.met, "seconds": a.seconds} for a in self.attempts],
            "ranking": [{"node": name, "sqnr_db": value} for name, value in self.ranking],
        })

    def verdict(self) -> str:
        """One line: 'target met: ...' or 'target NOT met: best ...', naming the output."""
        where = f"(saved to {self.result.output_path})"
        layers = f"{len(self.excluded)} layer{'' if len(self.excluded) == 1 else 's'} float"
        if self.target_met:
            return f"target met: {self.target.metric} {self.metric:.4f} {self.target.op} {self.target.value:g} " \
                   f"with {layers} {where}"
        return f"target NOT met ({self.stopped}): best {self.target.metric} {self.metric:.4f} with {layers} {where}"


def metric_value(result: Any, target: Target) -> float:
    """The target's metric from a run's evaluation (``sqnr``: the first float output's SQNR in dB)."""
    evaluation = result.evaluation
    if evaluation is None:
        raise UserError("the target metric needs an evaluation; do not combine it with --no-evaluate")
    if target.metric == SQNR:
        if not evaluation.output_sqnr_db:
            raise UserError("the model has no float output to measure sqnr on")
        return float(next(iter(evaluation.output_sqnr_db.values())))
    if target.metric not in evaluation.metrics:
        known = ", ".join(list(evaluation.metrics) + [SQNR])
        raise UserError(f"{result.source} reports no {target.metric!r}; its metrics: {known}")
    return float(evaluation.metrics[target.metric])


def sensitivity_ranking(result: Any) -> list[tuple[str, float]]:
    """Quantized (or pruned) layers, most sensitive first: ``(node, lowest SQNR in dB of its weight and quantized
    activation inputs)``; layers without any SQNR (e.g. pruned only) come last, in graph order."""
    nodes: dict[str, float] = {}
    tensor_consumers: dict[str, list[str]] = {}

    def note(node: str, sqnr: float | None = None) -> None:
        current = nodes.setdefault(node, math.inf)
        if sqnr is not None and not math.isnan(sqnr):
            nodes[node] = min(current, sqnr)

    weight_tensors: dict[str, float] = {}
    for record in result.records:
        for detail in record.details:
            kind = detail.get("kind")
            node = detail.get("node")
            if kind in ("weight", "layer", "activation", "pruned") and node:
                note(node, detail.get("sqnr_db") if kind == "weight" else None)
            if kind == "activation" and detail.get("tensor"):
                consumers = detail.get("consumers") or ([node] if node else [])
                tensor_consumers.setdefault(detail["tensor"], []).extend(consumers)
                for consumer in consumers:
                    note(consumer)
            if kind == "weight" and not node and detail.get("tensor") and "sqnr_db" in detail:
                weight_tensors[detail["tensor"]] = float(detail["sqnr_db"])
    if weight_tensors:  # int8-qdq names the weight, not its reader: find the readers in the written model
        import onnx

        model = onnx.load(str(result.output_path), load_external_data=False)
        readers = _weight_readers(model, set(weight_tensors))
        for tensor, sqnr in weight_tensors.items():
            for node in readers.get(tensor, []):
                note(node, sqnr)
    evaluation = result.evaluation
    for label, sqnr in (evaluation.activation_sqnr_db if evaluation else {}).items():
        match = re.match(r"^(.*) \((.+)\)$", label)
        if match and match.group(2) in nodes:
            note(match.group(2), sqnr)
            continue
        for consumer in tensor_consumers.get(label, []):
            note(consumer, sqnr)
    order = {name: index for index, name in enumerate(nodes)}
    return sorted(nodes.items(), key=lambda item: (item[1], order[item[0]]))


def _weight_readers(model: Any, weights: set[str]) -> dict[str, list[str]]:
    """Map each weight initializer to the compute nodes reading it through its DequantizeLinear (or directly)."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] != "":
            source = node.input[0]
            root = max((w for w in weights if source.startswith(w)), key=len, default=None)
            if root is None:
                continue
            for reader in consumers.get(node.output[0], []):
                if reader.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                    found.setdefault(root, []).append(reader.name)
    return found


def exclusion_options(recipe: Any, pass_options: Mapping[str, Any] | None, layers: list[str]) -> dict[str, Any]:
    """``pass_options`` as per-pass tables (:meth:`Recipe.overrides`) plus the options that keep ``layers`` float /
    dense in every pass of the recipe that declares ``exclude_nodes`` (else ``exclude_regex``)."""
    from onnxsmith.optimizer.registry import PASSES

    options = recipe.overrides(pass_options)
    if not layers:
        return options
    exact = [f"^{re.escape(name)}$" for name in layers]
    excluding = False
    for name in dict.fromkeys(recipe.passes):
        declared = {spec.name for spec in PASSES[name].Options.specs()}
        key, added = ("exclude_nodes", layers) if "exclude_nodes" in declared else ("exclude_regex", exact)
        if key not in declared:
            continue
        current = options.get(name, {}).get(key, recipe.options.get(name, {}).get(key, ()))
        options.setdefault(name, {})[key] = (*current, *added)
        excluding = True
    if not excluding:
        raise UserError(f"recipe {recipe.name!r} has no pass that can keep layers in float (exclude_nodes)")
    return options


def search(
    spec: str,
    output: str | os.PathLike[str] | None,
    recipe: str,
    target: Target | str,
    *,
    calib: Any = None,
    pass_options: Mapping[str, Any] | None = None,
    time_budget: float = DEFAULT_TIME_BUDGET,
    verify: bool = True,
    on_attempt: Callable[[Attempt], None] | None = None,
    on_record: Callable[[Any], None] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Find the fewest float layers for which the optimized model meets ``target`` (see the module docstring).

    ``on_attempt`` is called after every run; ``on_record`` gets the pass records of the first run only. The
    best model is written to ``output`` (default as :func:`optimize_file`) whether or not the target is met.
    """
    from onnxsmith.optimizer.pipeline import default_output_path, optimize_file, resolve_source
    from onnxsmith.optimizer.recipes import load_recipe

    start = time.perf_counter()
    target = Target.parse(target) if isinstance(target, str) else target
    source = resolve_source(spec)
    if source.zoo is None and target.metric != SQNR:
        raise UserError(f"{target.metric!r} is a zoo metric; for a model file use sqnr>=DB (output SQNR on the "
                        f"calibration probes)")
    if time_budget <= 0:
        raise UserError(f"time budget must be positive, got {time_budget:g}")
    recipe_obj = load_recipe(recipe)
    output_path = Path(output) if output is not None else default_output_path(source)
    if not output_path.parent.exists():
        raise UserError(f"output folder does not exist: {output_path.parent}")
    exclusion_options(recipe_obj, pass_options, ["-"])  # fail now, not after the first run, if none can exclude
    staging = Path(tempfile.mkdtemp(prefix=".onnxsmith-mp-", dir=output_path.parent))
    attempts: list[Attempt] = []
    best: tuple[Attempt, Any] | None = None
    ranking: list[tuple[str, float]] = []

    def run(layers: list[str]) -> tuple[Attempt, Any]:
        nonlocal best
        began = time.perf_counter()
        folder = Path(tempfile.mkdtemp(dir=staging))
        result = optimize_file(spec, folder / output_path.name, recipe=recipe, calib=calib,
                               pass_options=exclusion_options(recipe_obj, pass_options, layers), verify=verify,
                               evaluate_model=True, on_record=on_record if not attempts else None,
                               progress=progress)
        value = metric_value(result, target)
        if not attempts:  # rank while the first run's model is still where its result says
            ranking.extend(sensitivity_ranking(result))
        attempt = Attempt(len(layers), value, target.met(value), time.perf_counter() - began, list(layers))
        attempts.append(attempt)
        if best is None or _preferred(target, attempt, best[0]):
            _promote(folder, output_path)
            best = attempt, replace(result, output_path=output_path)
        shutil.rmtree(folder, ignore_errors=True)
        if on_attempt is not None:
            on_attempt(attempt)
        return attempt, result

    try:
        first, _ = run([])
        names = [name for name, _ in ranking]
        stopped = "target met" if first.met else ("no quantized layers" if not names else "")
        low, high = 0, None  # largest failing k, smallest passing k
        k = 1
        while not stopped:
            if high is not None:
                if high - low <= 1:
                    stopped = "target met"
                    break
                k = (low + high) // 2
            else:
                k = min(k, len(names))
            mean = sum(a.seconds for a in attempts) / len(attempts)
            if time.perf_counter() - start + mean > time_budget:
                stopped = "time budget"
                break
            attempt, _ = run(names[:k])
            if attempt.met:
                high = k
            else:
                low = k
                if high is None:
                    if k >= len(names):
                        stopped = "all layers float"
                        break
                    k *= 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert best is not None
    chosen, result = best
    seconds = time.perf_counter() - start
    return SearchResult(target, chosen.met, chosen.metric, chosen.excluded, attempts, ranking, result, stopped,
                        seconds)


def _preferred(target: Target, a: Attempt, b: Attempt) -> bool:
    """Whether attempt ``a`` beats ``b``: passing beats failing; among passing, fewer float layers (then the
    better metric); among failing, the better metric (then fewer float layers)."""
    if a.met != b.met:
        return a.met
    if a.met:
        if a.k != b.k:
            return a.k < b.k
        return target.better(a.metric, b.metric)
    if target.better(a.metric, b.metric):
        return True
    return not target.better(b.metric, a.metric) and a.k < b.k


def _promote(folder: Path, output_path: Path) -> None:
    """Move a staged model (and its external data file, if any) over ``output_path``; each move is a rename."""
    data = folder / (output_path.name + ".data")
    if data.exists():
        os.replace(data, output_path.parent / data.name)
    os.replace(folder / output_path.name, output_path)


def write_report_section(folder: str | os.PathLike[str], found: SearchResult) -> None:
    """Add the search to a written report: a ``mixed_precision`` key in report.json, a section in report.md."""
    import json

    folder = Path(folder)
    json_path, md_path = folder / "report.json", folder / "report.md"
    if json_path.exists():
        data = json.loads(json_path.read_text())
        data["mixed_precision"] = found.as_dict()
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    if md_path.exists():
        summary = found.as_dict()
        lines = ["", "## Mixed precision", "",
                 f"- target: `{summary['target']}`: {'met' if found.target_met else 'NOT met'} "
                 f"({summary['metric']} {found.metric:.4f}, {len(found.excluded)} of {len(found.ranking)} "
                 f"layers float; stopped: {found.stopped})",
                 f"- float layers: {', '.join(f'`{n}`' for n in found.excluded) or 'none'}",
                 "", "| float layers (k) | metric | met | time (s) |", "|---|---|---|---|"]
        lines += [f"| {a.k} | {a.metric:.4f} | {'yes' if a.met else 'no'} | {a.seconds:.1f} |"
                  for a in found.attempts]
        with md_path.open("a") as stream:
            stream.write("\n".join(lines) + "\n")


def attempt_line(index: int, attempt: Attempt, target: Target) -> str:
    """One printed line per attempt."""
    verdict = "meets" if attempt.met else "misses"
    return (f"  attempt {index}: {attempt.k:3d} layers float  {target.metric} {attempt.metric:.4f}  "
            f"{verdict} {target}  ({attempt.seconds:.1f} s)")
