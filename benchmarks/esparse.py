"""E-Sparse N:M sparsity: magnitude, Wanda and E-Sparse (entropy score, channel shuffles) on zoo models.

Usage: ``python benchmarks/esparse.py [--models a,b] [--patterns 2:4,4:8] [--methods a,b] [--alpha A]
[--shuffle global|local|apex] [--calib N] [--windows N] [--gpu] [--out PATH] [--quick]`` (``--quick``: MiniLM,
2:4, magnitude and Wanda, 4 calibration sentences)

Claim under test (E-Sparse): scoring weights by ``|W|`` times an input-channel factor built from the channel's
entropy and norm, and shuffling the input channels so that the N:M groups keep more of that score, loses much less
than Wanda's ``|W| * ||X||`` at the same N:M pattern. For every zoo model and N:M pattern the cached FP32 model
(``zoo_model_path(name)``, never written) is pruned in this process by ``optimize_file`` (``verify=False``, no
evaluation, no progress bars), with the same calibration feeds, and scored on the same evaluation set. Rows
(``METHODS``; ``dense`` is always there, ``--methods`` picks among the others):

- ``dense``: the FP32 model's own figures (the reference every row is scored against);
- ``magnitude``: recipe ``sparse24`` (``prune-nm`` score ``magnitude``, no calibration), pass option ``nm``;
- ``wanda``: recipe ``wanda24`` (``prune-nm`` score ``wanda``: ``|W_ij| * ||X_j||_2``), ``nm``;
- ``esparse``: recipe ``esparse24`` with ``shuffle="none"``: the E-Sparse score alone
  (``|W_ij| * (H_j / mean H + alpha * ||X_j|| / mean ||X||)``), no channel shuffle;
- ``esparse+shuffle``: recipe ``esparse24``, ``shuffle=--shuffle`` (default ``local``: E-Sparse's global naive
  shuffle then its local block shuffle), ``absorb`` the pass default ``fold-or-gather`` (a permutation folded into
  the producers where ``reorder-channels`` can, else a runtime ``Gather`` of the activation);
- ``esparse+shuffle(fold-only)``: as ``esparse+shuffle`` with ``absorb="fold"``: no runtime ``Gather``, the
  layers whose permutation cannot be folded stay unshuffled;
- ``esparse+shuffle(gather-each)``: as ``esparse+shuffle`` with ``absorb="fold-or-gather-each"``: every layer that
  cannot fold gets its own permutation and ``Gather`` (q, k, v separately) instead of one per activation;
- ``wanda+shuffle``: recipe ``esparse24`` with ``score="wanda"`` in both passes: the shuffles without the entropy
  term (an ablation separating the two E-Sparse ingredients).

The E-Sparse rows get ``alpha=--alpha`` only when it is given (else the passes' default, 100). Per model:

- ``smollm2`` (SmolLM2-135M): calibration ``calibration_feeds(--calib)`` (default 32 windows x 256 pydoc tokens),
  evaluation ``evaluation_feeds(--windows)`` (default the first 80 x 256 tokens); figures ``perplexity`` (main,
  lower is better) and ``top1_agreement`` with FP32 (``zoo.score`` on outputs reduced by ``zoo.reduce_outputs``);
- ``minilm`` (all-MiniLM-L6-v2): calibration ``calibration_feeds(--calib)`` (default 32 sentences), evaluation all
  100 evaluation sentences; figures mean (main, higher is better) and min embedding cosine vs FP32.

Per row, from the ``optimize_file`` result's pass records: the wall time of the call (``opt s``: loading, every
pass, calibration and saving), the calibration seconds of all passes (``calib s``), ``prune-nm``'s pruned /
skipped layers (the LM head and layers under ``min_channels`` stay dense), ``shuffle-nm``'s folded / gathered /
unshuffled targets and the mean over its targets of ``kept_after - kept_before`` (the fraction of the layer's
pruning score that N:M keeps, gained by the shuffle; unshuffled targets count 0; the JSON adds the mean over the
shuffled targets only and ``prune-nm``'s mean kept weight energy). ``n:m weights``: how many GEMM weights of the
written file satisfy the row's N:M on their input axis, out of all MatMul/Gemm/Conv constant weights
(``onnxsmith.analysis.sparsity.inspect_sparsity``; the tied LM head is among them and stays dense). A failing configuration
is an ``error`` row with the exception's first line; the run goes on.

Verdicts, within this run (other runs' numbers are context only): for ``smollm2``, per pattern, E-Sparse +
shuffles (and, likewise, E-Sparse without shuffle and the fold-only variant) against Wanda:
``(ppl_wanda - ppl_esparse) / ppl_wanda >= 33 %`` and, at 2:4, ``ppl_esparse <= 60`` -> PASS, else MISS. For
``minilm``: mean cosine of E-Sparse + shuffles (and E-Sparse) at least Wanda's -> PASS, else MISS. The earlier
anchors measured on this machine with the same data (80 windows, 32 calibration windows: FP 17.47, magnitude 2:4
1548, Wanda 2:4 89.4 ppl) are printed for context only.

GPU part (``--gpu``; skipped with the reason when ``torch.cuda.is_available()`` is false): torch's semi-structured
2:4 sparse GEMM (``to_sparse_semi_structured``: cuSPARSELt, CUTLASS when this torch has no cuSPARSELt) against the
dense GEMM, float16, at SmolLM2's Linear shapes (q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576) for
2048 tokens (prefill 1 x 2048) and 4096 tokens (batch 32 x 128): random ``W [out, in]`` pruned 2:4 along ``in``
(2 largest ``|w|`` of every 4 kept), ``F.linear(x, W_sparse)`` vs ``F.linear(x, W)`` timed with CUDA events, after
warm-up, median over 50 samples of 10 back-to-back calls (``harness.torch_median_ms``); speedup = dense / sparse per shape and for the 7 GEMMs
of one decoder layer summed. The times include torch's tensor-subclass dispatch. E-Sparse's paper reports
1.24-1.53x. A shape the backend rejects is an error cell.

Results go to stdout (one markdown table per model and pattern as soon as it is done, the verdicts, the GPU
table) and to ``--out`` (default ``benchmarks/results/esparse.json``, rewritten after every model and pattern,
``"complete": true`` once the run has finished), with ``environment()`` and the settings.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness
import onnx
from harness import (
    MODEL_SPECS,
    Benchmark,
    ModelData,
    ModelSpec,
    Report,
    ScoredRow,
    add_data_arguments,
    earlier_anchors,
    figures,
    fmt,
    joined,
    log_result,
    markdown_table,
    note_of,
    one_line,
    onnxsmith_variant,
    parse_names,
    prepare_model,
    run_in_folder,
    run_models,
    torch_median_ms,
)

if TYPE_CHECKING:
    from onnxsmith.optimizer.manager import PassRecord

DEFAULT_PATTERNS = ("2:4", "4:8")
DEFAULT_CALIBRATION = 32
DEFAULT_WINDOWS = 80
DEFAULT_SHUFFLE = "local"
SHUFFLE_CHOICES = ("global", "local", "apex")
PRUNE_PASS, SHUFFLE_PASS = "prune-nm", "shuffle-nm"

TARGET_REDUCTION = 33.0
"""Smallest perplexity reduction (%) of E-Sparse + shuffles against Wanda in the same run for a PASS."""
PPL_CEILING = {"2:4": 60.0}
"""Largest E-Sparse + shuffles perplexity for a PASS, per pattern (none for the others)."""
EARLIER_ANCHORS = "SmolLM2 FP 17.47, magnitude 2:4 1548, Wanda 2:4 89.4 ppl"
ANCHOR_COUNTS = (80, 32)
"""Evaluation windows and calibration windows of the earlier anchors."""
PAPER_SPEEDUP = "1.24-1.53x"


@dataclass(frozen=True)
class Method:
    """A row: the recipe and the pass options beside ``nm`` (``alpha`` and ``shuffle`` filled from the command
    line for the E-Sparse rows)."""

    name: str
    recipe: str | None
    options: dict[str, Any]
    esparse: bool = False


METHODS: dict[str, Method] = {method.name: method for method in [
    Method("dense", None, {}),
    Method("magnitude", "sparse24", {}),
    Method("wanda", "wanda24", {}),
    Method("esparse", "esparse24", {"shuffle": "none"}, esparse=True),
    Method("esparse+shuffle", "esparse24", {}, esparse=True),
    Method("esparse+shuffle(fold-only)", "esparse24", {"absorb": "fold"}, esparse=True),
    Method("esparse+shuffle(gather-each)", "esparse24", {"absorb": "fold-or-gather-each"}, esparse=True),
    Method("wanda+shuffle", "esparse24", {"score": "wanda"}),
]}
SHUFFLED = ("esparse+shuffle", "esparse+shuffle(fold-only)", "esparse+shuffle(gather-each)", "wanda+shuffle")
VERDICT_ROWS = (("esparse+shuffle", "E-Sparse + shuffles"), ("esparse+shuffle(fold-only)", "E-Sparse + shuffles "
                "(fold-only)"), ("esparse+shuffle(gather-each)", "E-Sparse + shuffles (a Gather per layer)"),
                ("esparse", "E-Sparse (no shuffle)"), ("wanda+shuffle", "Wanda score + shuffles"))


MODELS: dict[str, ModelSpec] = {name: MODEL_SPECS[name] for name in ("smollm2", "minilm")}


# ----------------------------------------------------------------------------------------------------------------
# Data


def parse_pattern(text: str) -> tuple[int, int]:
    """``'2:4'`` -> ``(2, 4)`` (``0 < n < m``)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"pattern {text!r} is not N:M with 0 < N < M, e.g. 2:4")
    return int(match.group(1)), int(match.group(2))


def nm_weights(path: Path, n: int, m: int) -> tuple[int, int, str]:
    """How many MatMul/Gemm/Conv constant weights of the model at ``path`` satisfy ``n:m`` on their input axis, of
    how many, and what counted them (``inspect_sparsity``, or this script's own count when that module is missing:
    weights read directly as constants, axis from ``weight_input_axis``)."""
    model = onnx.load(str(path))
    try:
        from onnxsmith.analysis.sparsity import inspect_sparsity
    except ImportError:
        return (*_own_nm_count(model, n, m), "own count")
    rows = inspect_sparsity(model, [(n, m)])
    return sum(row.pattern is not None for row in rows), len(rows), "inspect_sparsity"


def _own_nm_count(model: onnx.ModelProto, n: int, m: int) -> tuple[int, int]:
    import onnx_graphsurgeon as gs

    from onnxsmith.core.sparsity import satisfies_nm
    from onnxsmith.core.graph import import_graph
    from onnxsmith.analysis.weights import weight_input_axis

    satisfied = total = 0
    for node in import_graph(model).nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or weight.values.ndim < 2:
            continue
        total += 1
        satisfied += satisfies_nm(weight.values, n, m, weight_input_axis(node, node, 1))
    return satisfied, total


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Row(ScoredRow):
    """One method at one pattern: ``status`` ``ok`` or ``error`` (``note`` holds the exception's first line).

    ``seconds``: the ``optimize_file`` call; ``calibration_seconds``: all passes' calibration; ``pass_seconds``:
    ``shuffle-nm`` / ``prune-nm`` run times (calibration excluded). ``kept_gain_mean``: mean over ``shuffle-nm``'s
    targets of ``kept_after - kept_before`` (unshuffled: 0); ``kept_gain_mean_shuffled``: over the shuffled ones.
    ``nm_weights`` of ``gemm_weights``: weights of the written file satisfying the pattern on their input axis.
    """

    model: str
    pattern: str
    method: str
    recipe: str | None
    pass_options: dict[str, Any] = field(default_factory=dict)
    optimize_seconds: float | None = None
    pruned: int | None = None
    skipped: int | None = None
    kept_energy_mean: float | None = None
    folded: int | None = None
    gathered: int | None = None
    unshuffled: int | None = None
    kept_before_mean: float | None = None
    kept_after_mean: float | None = None
    kept_gain_mean: float | None = None
    kept_gain_mean_shuffled: float | None = None
    shuffle_methods: dict[str, int] = field(default_factory=dict)
    nm_weights: int | None = None
    gemm_weights: int | None = None
    nm_counted_by: str | None = None


def pass_options(method: Method, n: int, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """``nm``, then the method's own options; the E-Sparse rows add ``shuffle`` (the shuffled ones) and ``alpha``
    (when given)."""
    options: dict[str, Any] = {"nm": (n, m)}
    if method.name in SHUFFLED:
        options["shuffle"] = args.shuffle
    options.update(method.options)
    if method.esparse and args.alpha is not None:
        options["alpha"] = args.alpha
    return options


def fill_from_records(row: Row, records: Sequence[PassRecord]) -> None:
    """Copy ``prune-nm``'s and ``shuffle-nm``'s counts and details into ``row``."""
    row.take_records(records, (PRUNE_PASS, SHUFFLE_PASS))
    for record in records:
        if record.name == PRUNE_PASS:
            row.pruned, row.skipped = record.changes.get("pruned"), record.changes.get("skipped")
            energy = [d["kept_energy"] for d in record.details if d.get("kind") == "pruned"]
            row.kept_energy_mean = statistics.fmean(energy) if energy else None
        elif record.name == SHUFFLE_PASS:
            row.folded, row.gathered = record.changes.get("folded"), record.changes.get("gathered")
            row.unshuffled = record.changes.get("unshuffled")
            targets = [d for d in record.details if "kept_before" in d]
            if targets:
                gains = [d["kept_after"] - d["kept_before"] for d in targets]
                shuffled = [gain for gain, d in zip(gains, targets) if d.get("kind") != "unshuffled"]
                row.kept_before_mean = statistics.fmean(d["kept_before"] for d in targets)
                row.kept_after_mean = statistics.fmean(d["kept_after"] for d in targets)
                row.kept_gain_mean = statistics.fmean(gains)
                row.kept_gain_mean_shuffled = statistics.fmean(shuffled) if shuffled else None
                for d in targets:
                    key = f"{d.get('kind')}:{d.get('method')}"
                    row.shuffle_methods[key] = row.shuffle_methods.get(key, 0) + 1
            elif row.unshuffled is not None:
                row.kept_gain_mean = 0.0


def dense_row(data: ModelData, pattern: tuple[int, int], fp32_scores: dict[str, float]) -> Row:
    """The FP32 reference: its figures against itself and its N:M weight count (expected 0)."""
    n, m = pattern
    row = Row(data.spec.name, f"{n}:{m}", "dense", None, scores=dict(fp32_scores))
    try:
        row.nm_weights, row.gemm_weights, row.nm_counted_by = nm_weights(data.fp32, n, m)
    except Exception as exc:  # noqa: BLE001 - a count that fails must not lose the row
        row.note = f"n:m weights not counted: {one_line(exc)}"
    return row


def method_row(data: ModelData, method: Method, pattern: tuple[int, int], args: argparse.Namespace,
               workdir: Path) -> Row:
    """One pruning with ``method`` at ``pattern``, scored; its file is counted and deleted. Never raises."""
    n, m = pattern
    options = pass_options(method, n, m, args)
    row = Row(data.spec.name, f"{n}:{m}", method.name, method.recipe, options)
    print(f"  {row.model} {row.pattern} {method.name} {options}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    results: list[Any] = []
    attempt, output = run_in_folder(onnxsmith_variant(method.recipe, options, results), data, workdir,
                                    f"{n}of{m}-{method.name}")
    row.take_attempt(attempt)
    if results:
        row.optimize_seconds = results[0].seconds
        fill_from_records(row, results[0].records)
    if attempt.status == "ok":
        try:
            row.nm_weights, row.gemm_weights, row.nm_counted_by = nm_weights(output, n, m)
            if row.pruned is not None and row.nm_weights < row.pruned:
                row.note = f"only {row.nm_weights} weights satisfy {n}:{m} but prune-nm pruned {row.pruned}"
        except Exception as exc:  # noqa: BLE001 - a count that fails must not lose the row
            row.note = f"n:m weights not counted: {one_line(exc)}"
    output.unlink(missing_ok=True)
    row.wall_seconds = time.perf_counter() - start
    log_result(row)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Verdicts


def verdicts(model: ModelSpec, pattern: str, rows: Sequence[Row], methods: Sequence[str]) -> list[str]:
    """E-Sparse rows against Wanda in this run (see the module docstring for the rule)."""
    key, header = model.metrics[0]
    ok = {row.method: row for row in rows if row.status == "ok" and math.isfinite(row.scores.get(key, math.nan))}
    lines = []
    for name, title in VERDICT_ROWS:
        if name not in methods:
            continue
        if "wanda" not in ok or name not in ok:
            missing = " and ".join(f"{n!r}" for n in (name, "wanda") if n not in ok)
            lines.append(f"{title}: not judged (no {missing} figure in this run)")
            continue
        value, wanda = ok[name].scores[key], ok["wanda"].scores[key]
        if model.lower_is_better:
            reduction = (wanda - value) / wanda * 100
            ceiling = PPL_CEILING.get(pattern)
            passed = reduction >= TARGET_REDUCTION and (ceiling is None or value <= ceiling)
            target = f">= {TARGET_REDUCTION:g} %" + (f", and <= {ceiling:g} at {pattern}" if ceiling else "")
            lines.append(f"{title}: {value:.2f} {header} vs Wanda {wanda:.2f} in this run: {abs(reduction):.1f} % "
                         f"{'lower' if reduction >= 0 else 'higher'} (target {target}) -> "
                         f"{'PASS' if passed else 'MISS'}")
        else:
            lines.append(f"{title}: {header} {value:.4f} vs Wanda {wanda:.4f} in this run: {value - wanda:+.4f} "
                         f"(higher is better; target >= Wanda) -> {'PASS' if value >= wanda else 'MISS'}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Output


def pattern_table(model: ModelSpec, rows: Sequence[Row]) -> str:
    """Method, figures, N:M weights, pruned / skipped, folded / gathered / unshuffled, kept gain, seconds."""
    headers = ["method", *(h for _, h in model.metrics), "n:m weights", "pruned/skipped",
               "folded/gathered/unshuffled", "kept gain", "opt s", "calib s", "notes"]
    lines = []
    for row in rows:
        gain = "—" if row.kept_gain_mean is None else f"{row.kept_gain_mean:+.4f}"
        lines.append([row.method, *figures(row.scores, model.metrics), joined(row.nm_weights, row.gemm_weights),
                      joined(row.pruned, row.skipped), joined(row.folded, row.gathered, row.unshuffled), gain,
                      fmt(row.seconds, 1), fmt(row.calibration_seconds, 1), note_of(row.status, row.note)])
    return markdown_table(headers, lines)


LEGEND = ("n:m weights: GEMM weights of the written file that satisfy the row's N:M on their input axis / all "
          "MatMul, Gemm, Conv constant weights; pruned/skipped: prune-nm's layers; folded/gathered/unshuffled: "
          "shuffle-nm's targets; kept gain: mean over shuffle-nm's targets of the kept score fraction after - "
          "before the shuffle; opt s: the optimize_file call; calib s: calibration inside it")


@dataclass
class PatternResult:
    """One model at one pattern: its rows and verdict lines."""

    pattern: str
    rows: list[Row]
    verdicts: list[str]


@dataclass
class ModelResult(harness.ModelResult):
    """Everything measured on one model."""

    results: list[PatternResult] = field(default_factory=list)


def print_pattern(model: ModelSpec, result: ModelResult, pattern: PatternResult) -> None:
    print(result.heading(f" {pattern.pattern}"))
    print(pattern_table(model, pattern.rows))
    print()
    if model.name == "smollm2":
        print(earlier_anchors(EARLIER_ANCHORS, (result.evaluation_feeds, result.calibration_feeds), ANCHOR_COUNTS))
    for line in pattern.verdicts:
        print(f"- verdict: {line}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------
# GPU: semi-structured 2:4 GEMM timing

SMOLLM2_LINEARS = (("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192), ("o_proj", 576, 576),
                   ("gate_proj", 576, 1536), ("up_proj", 576, 1536), ("down_proj", 1536, 576))
"""SmolLM2-135M's Linear layers of one decoder layer: (name, in features, out features)."""
GPU_TOKENS = (("prefill 1x2048", 2048), ("batch 32x128", 4096))
GPU_WARMUP, GPU_SAMPLES, GPU_REPS = 10, 50, 10


def prune_24(torch: Any, weight: Any) -> Any:
    """``weight [out, in]`` with the 2 largest ``|w|`` of every 4 consecutive input channels kept, the rest 0."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols).contiguous()


def gpu_benchmark() -> dict[str, Any]:
    """Dense vs semi-structured sparse ``F.linear`` at SmolLM2's shapes; ``{"skipped": reason}`` without CUDA."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return {"skipped": f"torch is not importable ({one_line(exc)})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch.cuda.is_available() is false (no CUDA GPU on this machine)"}
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    except ImportError as exc:
        return {"skipped": f"this torch has no semi-structured sparsity ({one_line(exc)})"}
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = bool(cusparselt is not None and cusparselt.is_available())
    SparseSemiStructuredTensor._FORCE_CUTLASS = not has_cusparselt
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__, "backend": "cuSPARSELt" if has_cusparselt else "CUTLASS (no cuSPARSELt)",
        "dtype": "float16", "warmup": GPU_WARMUP, "samples": GPU_SAMPLES, "calls_per_sample": GPU_REPS,
        "paper_speedup": PAPER_SPEEDUP, "cases": []}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for case, tokens in GPU_TOKENS:
        cells = []
        for name, d_in, d_out in SMOLLM2_LINEARS:
            cell: dict[str, Any] = {"layer": name, "in": d_in, "out": d_out, "tokens": tokens}
            print(f"  gpu {case} {name} {d_in}->{d_out}", file=sys.stderr, flush=True)
            try:
                with torch.no_grad():
                    weight = prune_24(torch, torch.randn(d_out, d_in, device="cuda", dtype=torch.float16,
                                                         generator=generator))
                    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.float16, generator=generator)
                    sparse = to_sparse_semi_structured(weight)
                    dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
                    cell["max_abs_diff"] = float((dense_out.float() - sparse_out.float()).abs().max())
                    cell["max_abs_dense"] = float(dense_out.float().abs().max())
                    cell["dense_ms"] = torch_median_ms(torch, lambda: F.linear(x, weight), GPU_SAMPLES, GPU_REPS,
                                                        GPU_WARMUP)
                    cell["sparse_ms"] = torch_median_ms(torch, lambda: F.linear(x, sparse), GPU_SAMPLES, GPU_REPS,
                                                         GPU_WARMUP)
                cell["speedup"] = cell["dense_ms"] / cell["sparse_ms"]
            except Exception as exc:  # noqa: BLE001 - a rejected shape is an error cell
                cell["error"] = one_line(exc)
            cells.append(cell)
        timed = [cell for cell in cells if "error" not in cell]
        layer: dict[str, Any] = {"shapes": len(cells), "timed": len(timed)}
        if len(timed) == len(cells):
            layer["dense_ms"] = sum(cell["dense_ms"] for cell in cells)
            layer["sparse_ms"] = sum(cell["sparse_ms"] for cell in cells)
            layer["speedup"] = layer["dense_ms"] / layer["sparse_ms"]
        result["cases"].append({"case": case, "tokens": tokens, "shapes": cells, "decoder_layer": layer})
    return result


def print_gpu(result: dict[str, Any]) -> None:
    print("\n### GPU: semi-structured 2:4 sparse GEMM vs dense (SmolLM2 shapes, float16)\n")
    if "skipped" in result:
        print(f"- skipped: {result['skipped']}")
        return
    lines = []
    for case in result["cases"]:
        for cell in case["shapes"]:
            lines.append([case["case"], cell["layer"], f"{cell['in']}->{cell['out']}",
                          fmt(cell.get("dense_ms"), 4), fmt(cell.get("sparse_ms"), 4), fmt(cell.get("speedup"), 2),
                          cell.get("error", "")])
        layer = case["decoder_layer"]
        lines.append([case["case"], "decoder layer (sum)", "7 GEMMs", fmt(layer.get("dense_ms"), 4),
                      fmt(layer.get("sparse_ms"), 4), fmt(layer.get("speedup"), 2),
                      "" if "speedup" in layer else f"{layer['timed']} of {layer['shapes']} shapes timed"])
    print(markdown_table(["tokens", "layer", "in->out", "dense ms", "sparse ms", "speedup", "notes"], lines))
    print(f"\n- {result['device']} (sm {'.'.join(map(str, result['capability']))}), torch {result['torch']}, "
          f"backend {result['backend']}; median of {GPU_SAMPLES} samples of {GPU_REPS} calls after {GPU_WARMUP} "
          f"warm-up calls; E-Sparse paper: {PAPER_SPEEDUP}")


# ----------------------------------------------------------------------------------------------------------------
# Main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                        help=f"comma-separated N:M patterns (default {','.join(DEFAULT_PATTERNS)})")
    parser.add_argument("--methods", default=",".join(name for name in METHODS if name != "dense"),
                        help="comma-separated subset of: " + ", ".join(METHODS) + " (dense is always run)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="E-Sparse alpha for the esparse rows (default: not passed, the passes' default 100)")
    parser.add_argument("--shuffle", default=DEFAULT_SHUFFLE, choices=SHUFFLE_CHOICES,
                        help=f"shuffle of the esparse+shuffle rows (default {DEFAULT_SHUFFLE}; apex: 2:4 only)")
    add_data_arguments(parser, DEFAULT_CALIBRATION, DEFAULT_WINDOWS)
    parser.add_argument("--gpu", action="store_true",
                        help="also time torch's semi-structured 2:4 GEMM vs dense at SmolLM2's shapes (CUDA only)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.models = parse_names(parser, args.models, list(MODELS), "models")
    args.methods = ["dense", *(name for name in parse_names(parser, args.methods, list(METHODS), "methods")
                               if name != "dense")]
    try:
        args.patterns = list(dict.fromkeys(parse_pattern(text) for text in args.patterns.split(",")))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.calib < 1 or args.windows < 1:
        parser.error("--calib and --windows must be at least 1")
    if args.alpha is not None and not args.alpha >= 0:
        parser.error("--alpha must be >= 0")


def run_model(model: ModelSpec, args: argparse.Namespace, report: Report, workdir: Path) -> None:
    """Every pattern and method on one model; the JSON is rewritten after every pattern."""
    data = prepare_model(model, calibration=args.calib,
                         evaluation=args.windows if model.name == "smollm2" else None)
    result = ModelResult.of(data)
    report.document["models"].append(result)
    for n, m in args.patterns:
        pattern = f"{n}:{m}"
        rows = [dense_row(data, (n, m), result.fp32_scores)]
        rows += [method_row(data, METHODS[name], (n, m), args, workdir) for name in args.methods if name != "dense"]
        result.results.append(PatternResult(pattern, rows, verdicts(model, pattern, rows, args.methods)))
        print_pattern(model, result, result.results[-1])
        report.save()


def run(args: argparse.Namespace, report: Report) -> None:
    """The whole benchmark; prints the tables as they are done and fills the JSON document."""
    report.document["settings"] = {
        "models": args.models,
        "patterns": [f"{n}:{m}" for n, m in args.patterns],
        "methods": {name: {"recipe": METHODS[name].recipe, "options": METHODS[name].options}
                    for name in args.methods},
        "alpha": args.alpha,
        "shuffle": args.shuffle,
        "calibration_feeds": args.calib,
        "smollm2_evaluation_windows": args.windows,
        "verdict": {"target_reduction_percent": TARGET_REDUCTION, "ppl_ceiling": PPL_CEILING},
        "earlier_anchors": {"figures": EARLIER_ANCHORS, "evaluation_windows": ANCHOR_COUNTS[0],
                            "calibration_windows": ANCHOR_COUNTS[1]},
        "gpu": args.gpu,
    }
    report.document["models"] = []
    run_models(report, args.models, lambda name, workdir: run_model(MODELS[name], args, report, workdir))
    if args.gpu:
        report.document["gpu"] = gpu_benchmark()
        print_gpu(report.document["gpu"])
    report.finish(LEGEND)


main = Benchmark("esparse", __doc__, run, add_arguments, check_arguments,
                 quick={"models": "minilm", "patterns": "2:4", "methods": "magnitude,wanda", "calib": 4}).main

if __name__ == "__main__":
    sys.exit(main())
