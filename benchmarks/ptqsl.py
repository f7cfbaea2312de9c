"""PTQ-SL granularity sweep: sub-layer weight grids with and without channel reordering against per-channel.

Usage: ``python benchmarks/ptqsl.py [--models a,b] [--bits w4a8,w6a8] [--grids g1,g2,...] [--set MODEL:KEY=VALUE,...]
[--reorder off,on|off|on] [--skip-invariant] [--skip-anchors] [--out PATH] [--quick]`` (``--quick``: vit-digits,
W4A8, per-channel and 16x1, no invariant runs)

Claim under test (PTQ-SL): a sub-layer weight grid (one step per block of output x input channels) with
function-preserving channel reordering reaches the fidelity of per-channel quantization, or better, with fewer
weight scales. For every zoo model, bit setting and weight grid the cached FP32 model (copied into a temporary
folder) is quantized twice in this process, with the same calibration feeds and search settings:

- reorder OFF: recipe ``base-ptq`` (cleanup + ``ptq-qdq``);
- reorder ON: recipe ``ptq-sl`` (cleanup + ``reorder-channels`` + ``ptq-qdq``, same ``ptq-qdq`` defaults).

Both get ``wbits``, ``abits`` (``weight_only=True`` for ``a16``: float activations), ``weight_grid`` and the
model's search settings (``ptq-qdq``'s options) as pass options. Grids are ``per-tensor``, ``per-channel`` or ``NVxNH`` (``NV``
output-channel blocks x ``NH`` input-channel blocks of ``ceil(D / n)`` channels). Reordering is lossless and
per-tensor / per-channel grids do not see channel order, so their reorder-ON figures must equal reorder-OFF up to
float noise: a sanity column (``--skip-invariant`` skips them).

Per model (``MODELS``; the settings are overridable with ``--set``):

- ``vit-digits``: calibration ``calibration_feeds(4)`` (4 batches x 8 images), the 450 test images; search
  ``rounds=3 n=100 samples=32 metric=cosine``; figures top-1 agreement with FP32 (main) and accuracy;
- ``minilm``: calibration ``calibration_feeds(32)`` (32 sentences; onnxsmith keeps ``samples`` of them per layer),
  the 100 evaluation sentences; search ``rounds=1 n=50 samples=8 metric=cosine``; figures mean (main) and min
  embedding cosine vs FP32;
- ``smollm2``: calibration ``calibration_feeds(4)`` (4 x 256 tokens), the first 20 evaluation windows (5,120
  tokens); ``rounds=0`` (max-based steps, no search) ``samples=4``; figures perplexity (main, lower is better)
  and top-1 agreement with FP32. The tied 49152 x 576 LM head stays float in every row, onnxsmith's and
  onnxruntime's (``float_head``: the MatMul writing the ``logits`` output, found in the graph; the export names it
  ``node_linear_210``, so a name pattern such as ``lm_head`` would not match it).

Anchors measured in the same run (``--skip-anchors`` skips them): onnxruntime ``quantize_static`` (QDQ, MinMax,
QUInt8 activations, no Q/DQ on MatMul outputs, ``harness.ort_static_qdq``) with per-channel and per-tensor
weights (QInt4 at W4; onnxruntime has no 6-bit type, so at W6 they are ``n/a`` rows) on vit-digits and MiniLM;
on SmolLM2 onnxruntime's ``MatMulNBitsQuantizer`` (round to nearest, symmetric, block 64 along K: weight-only
INT4, activations stay float) and ``quantize_static`` per-channel W4A8.

Weight scales per row: ``scales`` is the number of distinct weight steps (onnxsmith: ``ptq-qdq``'s
``weight_scales``; anchors: the scale values in the file); ``stored`` counts the scale values the ONNX file holds
(``DequantizeLinear`` scales of integer weight initializers, ``MatMulNBits`` scales): ONNX has no 2-D block
layout, so a sub-layer grid stores its steps repeated per channel. ``×pc`` is ``scales`` over the per-channel
row's. A failing configuration is an ``error`` row with the exception's first line; the run goes on. Quantization
time is the wall time of the quantization call alone.

Results go to stdout (one markdown table per model and bit setting, the anchors, and a verdict per sub-layer grid)
and to ``--out`` (default ``benchmarks/results/ptqsl.json``, rewritten after every model and bit setting).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import harness
import onnx
from harness import (
    MODEL_SPECS,
    ORT_ACTIVATION_TYPES,
    ORT_WEIGHT_TYPES,
    Benchmark,
    Bits,
    ModelData,
    ModelSpec,
    NotApplicable,
    Report,
    ScoredRow,
    Variant,
    bits_label,
    fmt,
    log_result,
    joined,
    markdown_table,
    missing_recipes,
    note_of,
    onnxsmith_variant,
    ort_matmul_nbits,
    ort_static_qdq,
    parse_names,
    prepare_model,
    run_in_folder,
    run_models,
)

from onnxruntime.quantization import CalibrationMethod

if TYPE_CHECKING:
    from onnxsmith.optimizer.manager import PassRecord

DEFAULT_BITS = ("w4a8", "w6a8")
DEFAULT_GRIDS = ("per-tensor", "16x1", "64x1", "32x4", "per-channel")
PER_TENSOR, PER_CHANNEL = "per-tensor", "per-channel"
WEIGHT_ONLY = 16
"""Activation bits that stand for float activations: ``w4a16`` runs ``ptq-qdq`` with ``weight_only=True``."""
RECIPES = {False: "base-ptq", True: "ptq-sl"}
"""The recipe for reorder OFF / ON."""
QUANTIZE_PASS, REORDER_PASS = "ptq-qdq", "reorder-channels"
NBITS_BLOCK = 64
WEIGHT_INT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
"""Initializer types of quantized weights (int32 inputs of ``DequantizeLinear`` are biases, not weights)."""


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """One model's data and search settings.

    ``calibration`` / ``evaluation``: how many calibration / evaluation feeds (``evaluation`` None: all).
    ``rounds``, ``n``, ``samples``, ``metric``, ``exclude_regex`` go to both recipes as ``ptq-qdq`` options (``n``
    and ``metric`` None: the recipe's default), ``strategy`` (channel-reordering strategy) to ``ptq-sl`` only.
    ``float_head``: keep the MatMul / Gemm nodes that write a graph output float. The nodes kept float
    (:func:`float_nodes`) reach onnxsmith as exact-name ``exclude_regex`` patterns (beside the given ones) and
    onnxruntime as ``nodes_to_exclude``.
    """

    calibration: int
    evaluation: int | None
    rounds: int
    samples: int
    n: int | None = None
    metric: str | None = None
    exclude_regex: tuple[str, ...] = ()
    float_head: bool = False
    strategy: str = "auto"
    bits: tuple[str, ...] | None = None
    """This model's bit settings (None: ``--bits``)."""

    def search_options(self, kept_float: Sequence[str]) -> dict[str, Any]:
        """The search settings as ``ptq-qdq`` options, the same in both recipes (``strategy`` is not among them:
        only ``ptq-sl``'s ``reorder-channels`` takes it); ``kept_float`` join ``exclude_regex`` as exact-name
        patterns."""
        options: dict[str, Any] = {"rounds": self.rounds, "samples": self.samples}
        if self.n is not None:
            options["n"] = self.n
        if self.metric is not None:
            options["metric"] = self.metric
        patterns = [*self.exclude_regex, *(f"^{re.escape(name)}$" for name in kept_float)]
        if patterns:
            options["exclude_regex"] = patterns
        return options


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "all") else int(text)


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


SETTING_PARSERS: dict[str, Callable[[str], Any]] = {
    "calibration": int,
    "evaluation": _optional_int,
    "rounds": int,
    "samples": int,
    "n": _optional_int,
    "metric": lambda text: text or None,
    "exclude_regex": lambda text: (text,) if text else (),
    "float_head": _flag,
    "strategy": str,
    "bits": lambda text: tuple(text.split("+")) if text else None,
}
"""``--set`` value parsers per :class:`Settings` field (``exclude_regex`` takes one pattern; use ``|``; ``bits``
joins settings with ``+``, e.g. ``smollm2:bits=w4a16+w6a16``)."""


@dataclass(frozen=True)
class SweepModel:
    """A zoo model in the sweep: its :class:`ModelSpec` (figures, main first and their direction; onnxruntime op
    types and calibration feeds), default :class:`Settings`, the anchors (names in :data:`ANCHORS`) and lines for
    the table notes."""

    spec: ModelSpec
    settings: Settings
    anchors: tuple[str, ...]
    notes: tuple[str, ...] = ()


MODELS: dict[str, SweepModel] = {
    "vit-digits": SweepModel(MODEL_SPECS["vit-digits"],
                             Settings(calibration=4, evaluation=None, rounds=3, n=100, samples=32, metric="cosine"),
                             ("ort-static-per-channel", "ort-static-per-tensor")),
    "minilm": SweepModel(MODEL_SPECS["minilm"],
                         Settings(calibration=32, evaluation=None, rounds=1, n=50, samples=8, metric="cosine"),
                         ("ort-static-per-channel", "ort-static-per-tensor")),
    "smollm2": SweepModel(MODEL_SPECS["smollm2"],
                          Settings(calibration=4, evaluation=20, rounds=0, samples=4, float_head=True,
                                   bits=("w4a8", "w4a16", "w6a16")),
                          ("ort-matmulnbits-rtn", "ort-static-per-channel"),
                          ("the LM head (node_linear_210) is the tied 49152x576 embedding matrix",)),
}


# ----------------------------------------------------------------------------------------------------------------
# Data


def float_nodes(path: Path, settings: Settings) -> list[str]:
    """The nodes of the model at ``path`` that every row keeps float: those whose name matches a pattern of
    ``settings.exclude_regex`` and, with ``float_head``, the MatMul / Gemm nodes that write a graph output (a
    language model's LM head)."""
    graph = onnx.load(str(path)).graph
    outputs = {output.name for output in graph.output}
    patterns = [re.compile(pattern) for pattern in settings.exclude_regex]
    return [node.name for node in graph.node
            if any(pattern.search(node.name) for pattern in patterns)
            or (settings.float_head and node.op_type in ("MatMul", "Gemm") and outputs & set(node.output))]


def stored_weight_scales(path: Path) -> int:
    """Scale values the model file holds for its weights: the scales of every ``DequantizeLinear`` whose input is
    an 8- or 4-bit integer initializer, and of every ``MatMulNBits``."""
    graph = onnx.load(str(path)).graph
    initializers = {init.name: init for init in graph.initializer}

    def size(name: str) -> int:
        return int(np.prod(initializers[name].dims))  # a scalar (no dims) gives 1

    total = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            if initializers[node.input[0]].data_type in WEIGHT_INT_TYPES:
                total += size(node.input[1])
        elif node.op_type == "MatMulNBits":
            total += size(node.input[2])
    return total


# ----------------------------------------------------------------------------------------------------------------
# Quantizers


def ort_static_anchor(per_channel: bool) -> Callable[[Bits, Sequence[str]], Variant]:
    """onnxruntime ``quantize_static``, MinMax, per-channel or per-tensor weights (QInt4 at W4, QInt8 at W8)."""

    def variant(bits: Bits, kept_float: Sequence[str]) -> Variant:
        weight_bits, activation_bits = bits
        if weight_bits not in ORT_WEIGHT_TYPES or activation_bits not in ORT_ACTIVATION_TYPES:
            raise NotApplicable(f"onnxruntime's quantize_static has no W{weight_bits}A{activation_bits} types "
                                "(weights QInt4 / QInt8, activations QUInt8)")
        weight_type = ORT_WEIGHT_TYPES[weight_bits]

        def quantize(data: ModelData, output: Path) -> None:
            ort_static_qdq(data.fp32, output, data.ort_calibration, data.spec.ort_op_types, CalibrationMethod.MinMax,
                           weight_type, per_channel=per_channel, nodes_to_exclude=kept_float)

        return Variant("minmax", {"calibrate_method": "MinMax", "weight_type": weight_type.name,
                                  "activation_type": "QUInt8", "per_channel": per_channel,
                                  "nodes_to_exclude": list(kept_float)}, quantize)

    return variant


def matmul_nbits_anchor(bits: Bits, kept_float: Sequence[str]) -> Variant:
    """onnxruntime ``MatMulNBitsQuantizer``, its default algorithm (round to nearest), symmetric, block
    :data:`NBITS_BLOCK` along K, QOperator form (``MatMulNBits``; ``harness.ort_matmul_nbits``); weight-only, so
    only ``wbits`` applies."""
    if bits[0] != 4:
        raise NotApplicable(f"the INT4 anchor (MatMulNBits has 2-, 4- and 8-bit weights, no {bits[0]}-bit)")

    def quantize(data: ModelData, output: Path) -> None:
        ort_matmul_nbits(data.fp32, output, "rtn", NBITS_BLOCK, nodes_to_exclude=kept_float)

    return Variant("rtn", {"algorithm": "DEFAULT (round to nearest)", "bits": 4, "block_size": NBITS_BLOCK,
                           "is_symmetric": True, "accuracy_level": None, "nodes_to_exclude": list(kept_float)},
                   quantize)


@dataclass(frozen=True)
class Anchor:
    """An onnxruntime quantization measured beside the sweep: its table label and its call at a bit setting
    (raises :class:`NotApplicable` where it has no form)."""

    label: str
    variant: Callable[[Bits, Sequence[str]], Variant]


ANCHORS: dict[str, Anchor] = {
    "ort-static-per-channel": Anchor("ORT quantize_static per-channel (MinMax, QDQ, QUInt8 act)",
                                     ort_static_anchor(per_channel=True)),
    "ort-static-per-tensor": Anchor("ORT quantize_static per-tensor (MinMax, QDQ, QUInt8 act)",
                                    ort_static_anchor(per_channel=False)),
    "ort-matmulnbits-rtn": Anchor(f"ORT MatMulNBits RTN W4 block{NBITS_BLOCK} (A16, weight-only)", matmul_nbits_anchor),
}


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Row(ScoredRow):
    """One quantization: an onnxsmith grid with reorder OFF / ON (``reorder`` False / True) or an anchor
    (``reorder`` None, ``config`` the anchor's name). ``status`` ``ok``, ``n/a`` or ``error`` (``note`` says why).

    ``weight_scales``: distinct weight steps; ``stored_scales``: scale values in the file; ``scales_vs_per_channel``:
    ``weight_scales`` over the per-channel row's (reorder OFF). ``regions``: ``reorder-channels``' change counts;
    ``excluded``: nodes kept float by a pattern; ``seconds``: the quantization call; ``wall_seconds``: quantization,
    scoring and scale counting together.
    """

    model: str
    bits: str
    config: str
    reorder: bool | None
    label: str
    weight_scales: int | None = None
    stored_scales: int | None = None
    scales_vs_per_channel: float | None = None
    layers_quantized: int | None = None
    weight_grid: str | None = None
    regions: dict[str, Any] | None = None
    excluded: list[str] = field(default_factory=list)


def run_quantization(row: Row, variant: Variant, data: ModelData, workdir: Path) -> None:
    """Quantize with ``variant`` into ``workdir``, score the model and count its stored scales into ``row``; then
    delete the model. Never raises (``harness.run_variant`` makes a failure an ``error`` row)."""
    tag = f"{row.bits}-{row.config}" + ("" if row.reorder is None else f"-reorder-{'on' if row.reorder else 'off'}")
    print(f"  {row.model} {tag}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    attempt, output = run_in_folder(variant, data, workdir, tag)
    row.settings = variant.settings
    row.take_attempt(attempt)
    if attempt.status == "ok":
        try:
            row.stored_scales = stored_weight_scales(output)
        except Exception as exc:  # noqa: BLE001 - a count that fails must not lose the row
            row.note = f"stored scales not counted: {exc}"
    output.unlink(missing_ok=True)
    row.wall_seconds = time.perf_counter() - start
    log_result(row)


def fill_from_records(row: Row, records: Sequence[PassRecord]) -> None:
    """Copy ``ptq-qdq``'s and ``reorder-channels``' reports into ``row``."""
    row.take_records(records, (QUANTIZE_PASS, REORDER_PASS))
    for record in records:
        if record.name == QUANTIZE_PASS:
            row.weight_scales = record.changes.get("weight_scales")
            row.layers_quantized = record.changes.get("layers_quantized")
            row.weight_grid = record.changes.get("weight_grid")
            row.excluded = [d["node"] for d in record.details
                            if d.get("kind") == "skipped" and "pattern" in str(d.get("reason", ""))]
        elif record.name == REORDER_PASS:
            row.regions = region_summary(record)


def region_summary(record: PassRecord) -> dict[str, Any]:
    """``reorder-channels``' change counts, the reasons regions were skipped (node names in quotes replaced by
    ``'…'``, with counts) and its objective (summed relative weight quantization error of the regions it chose a
    permutation for) before and after."""
    chosen = [d for d in record.details if d.get("kind") in ("reordered", "identity")]
    reasons = Counter(re.sub(r"'[^']*'", "'…'", str(d.get("reason"))) for d in record.details
                      if d.get("kind") == "skipped")
    return {**{key: record.changes.get(key) for key in ("regions", "regions_reordered", "regions_skipped")},
            "skip_reasons": dict(reasons.most_common()),
            "objective_before": sum(d.get("error_before", 0.0) for d in chosen),
            "objective_after": sum(d.get("error_after", 0.0) for d in chosen)}


def grid_row(data: ModelData, bits: Bits, grid: str, reorder: bool, settings: Settings, kept_float: Sequence[str],
             workdir: Path) -> Row:
    """One onnxsmith quantization at ``bits`` with ``grid``, reorder OFF (``base-ptq``) or ON (``ptq-sl``)."""
    recipe = RECIPES[reorder]
    label = f"onnxsmith {recipe} {grid}"
    row = Row(data.spec.name, bits_label(bits), grid, reorder, label)
    activations = {"weight_only": True} if bits[1] == WEIGHT_ONLY else {"abits": bits[1]}
    pass_options = {"wbits": bits[0], **activations, "weight_grid": grid, "ptq-qdq": settings.search_options(kept_float)}
    if reorder:
        pass_options["strategy"] = settings.strategy
    results: list[Any] = []
    run_quantization(row, onnxsmith_variant(recipe, pass_options, results), data, workdir)
    if results:
        fill_from_records(row, results[0].records)
    return row


def anchor_row(data: ModelData, bits: Bits, name: str, kept_float: Sequence[str], workdir: Path) -> Row:
    """One anchor at ``bits``; its distinct scales are the scale values in its file."""
    anchor = ANCHORS[name]
    row = Row(data.spec.name, bits_label(bits), name, None, anchor.label)
    try:
        variant = anchor.variant(bits, kept_float)
    except NotApplicable as reason:
        row.status, row.note = "n/a", str(reason)
        return row
    run_quantization(row, variant, data, workdir)
    row.weight_scales, row.excluded = row.stored_scales, list(kept_float)
    return row


def ordered_grids(grids: Sequence[str]) -> list[str]:
    """``grids`` with per-tensor first and per-channel last, the sub-layer grids between in the given order."""
    kinds = {grid: grid_kind(grid) for grid in grids}
    return sorted(grids, key=lambda grid: {PER_TENSOR: 0, PER_CHANNEL: 2}.get(kinds[grid], 1))


def grid_kind(grid: str) -> str:
    """``per-tensor``, ``per-channel`` (whatever the spelling: ``1x1``, ``allx1``) or ``sub-layer``."""
    from onnxsmith.calibration.blocks import GridSpec

    spec = GridSpec.parse(grid)
    if spec == GridSpec(1, 1):
        return PER_TENSOR
    if spec == GridSpec(None, 1):
        return PER_CHANNEL
    return "sub-layer"


def set_scale_ratios(rows: Sequence[Row]) -> None:
    """``scales_vs_per_channel`` of every row from the per-channel row (reorder OFF, else ON) of the same run."""
    per_channel = [row for row in rows if row.reorder is not None and grid_kind(row.config) == PER_CHANNEL
                   and row.weight_scales]
    per_channel.sort(key=lambda row: row.reorder)
    if not per_channel:
        return
    reference = per_channel[0].weight_scales
    for row in rows:
        if row.weight_scales is not None:
            row.scales_vs_per_channel = row.weight_scales / reference


@dataclass
class BitsResult:
    """One model at one bit setting: its rows (grids, then anchors) and the verdict lines."""

    bits: str
    rows: list[Row]
    verdicts: list[str]
    sanity: list[str]


@dataclass
class ModelResult(harness.ModelResult):
    """Everything measured on one model."""

    settings: dict[str, Any]
    kept_float: list[str]
    notes: list[str]
    results: list[BitsResult] = field(default_factory=list)


def run_bits(model: SweepModel, data: ModelData, bits: Bits, args: argparse.Namespace, settings: Settings,
             kept_float: Sequence[str], workdir: Path) -> BitsResult:
    """Every grid reorder OFF and ON (invariant grids ON unless ``--skip-invariant``), then the anchors."""
    rows = []
    for grid in args.grids:
        if False in args.reorder:
            rows.append(grid_row(data, bits, grid, False, settings, kept_float, workdir))
        if True in args.reorder and not (args.skip_invariant and grid_kind(grid) != "sub-layer"):
            rows.append(grid_row(data, bits, grid, True, settings, kept_float, workdir))
    if not args.skip_anchors:
        rows += [anchor_row(data, bits, name, kept_float, workdir) for name in model.anchors]
    set_scale_ratios(rows)
    verdicts, sanity = judge(model, rows)
    return BitsResult(bits_label(bits), rows, verdicts, sanity)


def run_model(model: SweepModel, settings: Settings, args: argparse.Namespace, report: Report,
              workdir: Path) -> ModelResult:
    """The sweep on one model; the JSON is rewritten after every bit setting."""
    data = prepare_model(model.spec, workdir, settings.calibration, settings.evaluation)
    kept_float = float_nodes(data.fp32, settings)
    notes = list(model.notes)
    if kept_float:
        notes.append(f"kept float in every row, onnxsmith's and onnxruntime's: {', '.join(kept_float)}")
    if settings.rounds == 0:
        notes.append("rounds=0: max-based weight and activation steps, no step search")
    result = ModelResult.of(data, settings={**asdict(settings), "pass_options": settings.search_options(kept_float)},
                            kept_float=kept_float, notes=notes)
    report.document["models"].append(result)
    for bits in [parse_bits(text) for text in settings.bits] if settings.bits else args.bits:
        result.results.append(run_bits(model, data, bits, args, settings, kept_float, workdir))
        report.save()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Verdict


def better_or_equal(value: float, reference: float, lower_is_better: bool) -> bool:
    """Whether ``value`` reaches ``reference`` in the figure's direction."""
    return value <= reference if lower_is_better else value >= reference


def judge(model: SweepModel, rows: Sequence[Row]) -> tuple[list[str], list[str]]:
    """Verdict lines on the claim for each sub-layer grid with fewer scales than per-channel, and sanity lines
    (reorder ON - OFF on the permutation-invariant grids, expected 0 up to float noise; ``reorder-channels``'
    ``auto`` strategy usually keeps the identity there, as the grid's quantization error cannot change).

    The claim is ``shown`` for a grid when its reorder-ON main figure reaches the per-channel reorder-OFF figure,
    else ``refuted``; with a row missing it is not judged.
    """
    key, header = model.spec.metrics[0]
    ok = {(row.config, row.reorder): row for row in rows if row.reorder is not None and row.status == "ok"}
    per_channel = next((row for (config, reorder), row in ok.items()
                        if not reorder and grid_kind(config) == PER_CHANNEL), None)
    verdicts, sanity = [], []
    for (config, reorder), row in ok.items():
        if reorder and grid_kind(config) != "sub-layer" and (config, False) in ok:
            delta = row.scores[key] - ok[config, False].scores[key]
            moved = (row.regions or {}).get("regions_reordered")
            check = (f"{moved} regions reordered; expected 0 up to float noise" if moved else
                     "no region reordered, so equal by construction; "
                     f"--set {model.spec.name}:strategy=producer-range forces permutations")
            sanity.append(f"{config}: {header} reorder ON - OFF = {delta:+.2g} ({check})")
    configs = dict.fromkeys(row.config for row in rows
                            if row.reorder is not None and grid_kind(row.config) == "sub-layer")
    for config in configs:
        if per_channel is None:
            verdicts.append(f"{config}: not judged (no per-channel row)")
            continue
        on, off = ok.get((config, True)), ok.get((config, False))
        if on is None:
            verdicts.append(f"{config}: not judged (no reorder-ON figure)")
            continue
        if on.weight_scales is None or on.weight_scales >= per_channel.weight_scales:
            verdicts.append(f"{config}: not judged ({on.weight_scales} scales, not fewer than per-channel's "
                            f"{per_channel.weight_scales})")
            continue
        reached = better_or_equal(on.scores[key], per_channel.scores[key], model.spec.lower_is_better)
        off_text = f"; reorder OFF {off.scores[key]:.4f}" if off is not None else ""
        verdicts.append(
            f"{config} ({on.weight_scales} scales = {on.weight_scales / per_channel.weight_scales:.3f}x per-channel): "
            f"reorder ON {header} {on.scores[key]:.4f} vs per-channel {per_channel.scores[key]:.4f} "
            f"({'lower' if model.spec.lower_is_better else 'higher'} is better){off_text} -> "
            f"{'shown' if reached else 'refuted'}")
    return verdicts, sanity


# ----------------------------------------------------------------------------------------------------------------
# Output


def _note(row: Row | None) -> str:
    if row is None:
        return ""
    return note_of(row.status, row.note)


def sweep_table(model: SweepModel, rows: Sequence[Row]) -> str:
    """The grids, reorder OFF and ON side by side: figures, scales, regions reordered and seconds."""
    metrics = model.spec.metrics
    headers = ["grid", "scales", "×pc", "stored", *(f"{h} {side}" for _, h in metrics for side in ("off", "on")),
               "reordered", "s off", "s on", "notes"]
    by_key = {(row.config, row.reorder): row for row in rows if row.reorder is not None}
    lines = []
    for config in dict.fromkeys(row.config for row in rows if row.reorder is not None):
        off, on = by_key.get((config, False)), by_key.get((config, True))
        first = off or on
        figures = [fmt(side.scores.get(key) if side else None, 4) for key, _ in metrics for side in (off, on)]
        regions = on.regions if on and on.regions else None
        reordered = f"{regions['regions_reordered']}/{regions['regions']}" if regions else "—"
        notes = "; ".join(f"{side_name}: {_note(side)}" for side_name, side in (("off", off), ("on", on))
                          if _note(side))
        if on is not None and off is not None and on.weight_scales != off.weight_scales:
            notes = "; ".join(filter(None, [notes, f"on has {on.weight_scales} scales"]))
        lines.append([config, joined(first.weight_scales), fmt(first.scales_vs_per_channel, 3),
                      joined(first.stored_scales), *figures, reordered, fmt(off.seconds if off else None, 1),
                      fmt(on.seconds if on else None, 1), notes])
    return markdown_table(headers, lines)


def anchor_table(model: SweepModel, rows: Sequence[Row]) -> str:
    """The onnxruntime anchors of one bit setting."""
    metrics = model.spec.metrics
    headers = ["anchor", "scales", "×pc", "stored", *(h for _, h in metrics), "s", "notes"]
    lines = [[row.label, joined(row.weight_scales), fmt(row.scales_vs_per_channel, 3), joined(row.stored_scales),
              *(fmt(row.scores.get(key), 4) for key, _ in metrics), fmt(row.seconds, 1), _note(row)]
             for row in rows if row.reorder is None]
    return markdown_table(headers, lines)


def print_report(results: Sequence[ModelResult]) -> None:
    """Per model and bit setting: the sweep table, the anchor table, sanity and verdict lines."""
    for result in results:
        model = MODELS[result.model]
        settings = ", ".join(f"{key}={value}" for key, value in result.settings["pass_options"].items())
        for bits_result in result.results:
            print(result.heading(f" {bits_result.bits}", f"; {settings}"))
            for note in result.notes:
                print(f"- {note}")
            print()
            print(sweep_table(model, bits_result.rows))
            if any(row.reorder is None for row in bits_result.rows):
                print()
                print(anchor_table(model, bits_result.rows))
            print()
            for line in bits_result.sanity:
                print(f"- sanity: {line}")
            for line in bits_result.verdicts:
                print(f"- verdict: {line}")
        fp32 = ", ".join(f"{key} {value:.4f}" for key, value in result.fp32_scores.items())
        print(f"\n- {result.model}: FP32 scored against itself: {fp32}")
    print("\n- scales: distinct weight steps (onnxsmith ptq-qdq's weight_scales; anchors: the file's scale values); "
          "×pc: over the per-channel row's; stored: scale values in the ONNX file; reordered: regions reordered / "
          "regions (reorder-channels); s: wall time of the quantization call")


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_bits(text: str) -> Bits:
    """``'w4a8'`` -> ``(4, 8)``; weight bits 4..8, activation bits 4..8 or 16 (:data:`WEIGHT_ONLY`)."""
    match = re.fullmatch(r"w([4-8])a([4-8]|16)", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"bit setting {text!r} is not wNaM with N in 4..8 and M in 4..8 or 16 "
                                         "(weight-only), e.g. w4a8")
    return int(match.group(1)), int(match.group(2))


def parse_grid(text: str) -> str:
    """A weight grid accepted by ``ptq-qdq`` (``per-tensor``, ``per-channel``, ``NVxNH``)."""
    from onnxsmith.calibration.blocks import GridSpec

    try:
        GridSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.strip()


def apply_settings(parser: argparse.ArgumentParser, overrides: Sequence[str] | None) -> dict[str, Settings]:
    """Every model's :class:`Settings` with the ``--set MODEL:KEY=VALUE,...`` overrides applied."""
    settings = {name: model.settings for name, model in MODELS.items()}
    for text in overrides or []:
        name, _, pairs = text.partition(":")
        if name not in settings or not pairs:
            parser.error(f"--set {text!r}: expected MODEL:KEY=VALUE[,KEY=VALUE...] with MODEL one of "
                         f"{', '.join(MODELS)}")
        changes = {}
        for pair in pairs.split(","):
            key, _, value = pair.partition("=")
            if key not in SETTING_PARSERS:
                parser.error(f"--set {text!r}: unknown key {key!r}; known: {', '.join(SETTING_PARSERS)}")
            try:
                changes[key] = SETTING_PARSERS[key](value)
            except ValueError as exc:
                parser.error(f"--set {text!r}: bad value for {key}: {exc}")
        settings[name] = replace(settings[name], **changes)
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--bits", default=",".join(DEFAULT_BITS),
                        help=f"comma-separated bit settings wNaM (default {','.join(DEFAULT_BITS)})")
    parser.add_argument("--grids", default=",".join(DEFAULT_GRIDS),
                        help=f"comma-separated weight grids (default {','.join(DEFAULT_GRIDS)})")
    parser.add_argument("--set", action="append", metavar="MODEL:KEY=VALUE,...",
                        help=f"override a model's settings (repeatable); keys: {', '.join(SETTING_PARSERS)}; e.g. "
                             "'minilm:rounds=0' or 'smollm2:evaluation=80,samples=8'")
    parser.add_argument("--reorder", default="off,on", choices=("off,on", "off", "on"), metavar="off,on|off|on",
                        help="which sides to run: reorder OFF (base-ptq), ON (ptq-sl) or both (default)")
    parser.add_argument("--skip-invariant", action="store_true",
                        help="no reorder-ON run for per-tensor and per-channel (equal to OFF by construction)")
    parser.add_argument("--skip-anchors", action="store_true", help="no onnxruntime anchors")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.models = parse_names(parser, args.models, list(MODELS), "models")
    try:
        args.bits = [parse_bits(text) for text in args.bits.split(",")]
        args.grids = ordered_grids([parse_grid(text) for text in args.grids.split(",")])
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.settings = apply_settings(parser, args.set)
    args.reorder = [side == "on" for side in args.reorder.split(",")]


def run(args: argparse.Namespace, report: Report) -> None:
    """The whole sweep; prints the tables and fills the JSON document (rewritten during the run)."""
    report.document["settings"] = {
        "bits": [bits_label(bits) for bits in args.bits],
        "grids": list(args.grids),
        "recipes": {"reorder_off": RECIPES[False], "reorder_on": RECIPES[True]},
        "missing_recipes": missing_recipes(RECIPES.values()),
        "reorder": ["on" if side else "off" for side in args.reorder],
        "skip_invariant": args.skip_invariant,
        "anchors": {} if args.skip_anchors else {name: ANCHORS[name].label for name in ANCHORS},
    }
    report.document["models"] = []
    run_models(report, args.models,
               lambda name, workdir: run_model(MODELS[name], args.settings[name], args, report, workdir))
    print_report(report.document["models"])


main = Benchmark("ptqsl", __doc__, run, add_arguments, check_arguments,
                 quick={"models": "vit-digits", "bits": "w4a8", "grids": "per-channel,16x1", "skip_invariant": True}).main

if __name__ == "__main__":
    sys.exit(main())
