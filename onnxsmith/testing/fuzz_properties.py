"""The fuzz properties: every pass and the main recipes on random valid ONNX graphs (:mod:`.fuzz_graphs`).

Properties (:func:`check_lossless`, :func:`check_lossy`; each returns ``'modified'``, ``'unchanged'`` or
``'skipped'`` and raises :class:`AssertionError` or the pass's exception on a failure):

- lossless passes, run by :class:`PassManager` (which verifies them against onnxruntime on probe feeds with each
  pass's tolerance), either succeed or refuse through a :class:`PreconditionError` (a ``PassError`` caused by one);
  a pass that reports no change leaves the graph byte-identical;
- lossy passes and recipes produce a model that passes ``onnx.checker`` and runs in onnxruntime (graph rewrites
  off and on) with finite outputs of the input model's shapes;
- the caller's ModelProto is never modified.

``tests/test_fuzz_passes.py`` runs them in CI on derandomized examples, ``benchmarks/fuzz.py`` on many more.
``ONNXSMITH_FUZZ_DUMP=folder`` saves every failing input model there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.core.errors import PassError
from onnxsmith.core.feeds import generated_probe_feeds
from onnxsmith.core.pass_base import Pass, PassContext, PreconditionError
from onnxsmith.optimizer.manager import ManagerResult, PassManager
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.optimizer.verification import reference_outputs
from onnxsmith.passes.awq_scale import AwqScale
from onnxsmith.passes.constant_folding import ConstantFolding
from onnxsmith.passes.constants_to_initializers import ConstantsToInitializers
from onnxsmith.passes.fold_batchnorm import FoldBatchNorm
from onnxsmith.passes.int4_weight import Int4Weight
from onnxsmith.passes.kv_cache_qdq import KvCacheQuantize
from onnxsmith.passes.moe_qdq import MoeQuantize
from onnxsmith.passes.prune_nm import PruneNM
from onnxsmith.passes.ptq_qdq import PtqQuantize
from onnxsmith.passes.qdq_int8 import QuantizeInt8
from onnxsmith.passes.remove_dead_nodes import RemoveDeadNodes
from onnxsmith.passes.reorder_channels import ReorderChannels
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.passes.shuffle_nm import ShuffleNM
from onnxsmith.passes.sparse_conv import SparseGemmToConv
from onnxsmith.passes.upgrade_opset import UpgradeOpset
from onnxsmith.testing.fuzz_graphs import FuzzModel

PassFactory = Callable[[], list[Pass]]
Check = Callable[[FuzzModel, str], str]

LOSSLESS: dict[str, PassFactory] = {
    "shape-inference": lambda: [ShapeInference()],
    "shape-inference-symbolic": lambda: [ShapeInference(symbolic=True)],
    "constants-to-initializers": lambda: [ConstantsToInitializers()],
    "constant-folding": lambda: [ConstantFolding()],
    "fold-batchnorm": lambda: [FoldBatchNorm()],
    "c2i+fold-batchnorm": lambda: [ConstantsToInitializers(), FoldBatchNorm()],
    "remove-dead-nodes": lambda: [RemoveDeadNodes()],
    "reorder-channels": lambda: [ShapeInference(), ReorderChannels()],
    "upgrade-opset-21": lambda: [UpgradeOpset(target=21)],
    "awq-scale-16": lambda: [AwqScale(block_size=16, target="onnxruntime", awq_grid=4)],
    "awq-scale-64-tensorrt": lambda: [AwqScale(block_size=64, awq_grid=4)],
    "shuffle-nm": lambda: [ShapeInference(symbolic=True), ShuffleNM(min_channels=8, block=16, rounds=3)],
    "sparse-gemm-to-conv-all": lambda: [SparseGemmToConv(only_sparse=False)],
    "prune+sparse-gemm-to-conv": lambda: [PruneNM(min_channels=8), SparseGemmToConv()],
}
"""Lossless pass lists (a lossy pass before one changes the reference the next lossless pass is checked against)."""

LOSSY: dict[str, PassFactory] = {
    "int8-qdq-uint8": lambda: [QuantizeInt8()],
    "int8-qdq-int8-sparse-outputs": lambda: [QuantizeInt8(act_dtype="int8", sparse_outputs=True)],
    "int8-qdq-percentile": lambda: [QuantizeInt8(calibrator="percentile", activation_matmuls=False)],
    "ptq-qdq": lambda: [ShapeInference(), PtqQuantize(rounds=1, n=10, samples=2)],
    "ptq-qdq-w4a8-int8": lambda: [ShapeInference(), PtqQuantize(wbits=4, act_dtype="int8", rounds=0, n=10,
                                                                  samples=2)],
    "ptq-qdq-twin": lambda: [ShapeInference(), PtqQuantize(twin=True, rounds=1, n=10, samples=2)],
    "prune-nm-2:4": lambda: [PruneNM(min_channels=8)],
    "prune-nm-4:8": lambda: [PruneNM(n=4, m=8, min_channels=8, skip_head=False)],
    "prune-nm-wanda": lambda: [PruneNM(score="wanda", min_channels=8, skip_head=False)],
    "int4-weight-rtn-16": lambda: [Int4Weight(block_size=16, method="rtn", target="onnxruntime")],
    "int4-weight-mse-32-ort": lambda: [Int4Weight(block_size=32, target="onnxruntime")],
    "moe-qdq": lambda: [MoeQuantize(min_expert_tokens=1)],
    "kv-cache-qdq": lambda: [KvCacheQuantize()],
}

RECIPES: dict[str, PassFactory] = {
    "cleanup": lambda: load_recipe("cleanup").build(),
    "w8a8": lambda: load_recipe("w8a8").build(),
    "w8a8-int8": lambda: load_recipe("w8a8").build({"act_dtype": "int8"}),
    "sparse24": lambda: load_recipe("sparse24").build({"prune-nm": {"min_channels": 8}}),
    "int4-wo-16": lambda: load_recipe("int4-wo").build({"block_size": 16, "target": "onnxruntime"}),
    "int4-wo-32": lambda: load_recipe("int4-wo").build({"block_size": 32, "target": "onnxruntime"}),
}

KNOWN_ORT_OPTIMIZER_BUG = "does not match y_zero_point type"
"""onnxruntime (1.32) bug, not onnxsmith's: at opset >= 21 its graph rewrites (MatMulAddFusion's Reshape + QDQ
propagation) create a QuantizeLinear with ``output_dtype`` INT8 that its own type inference then rejects against
the int8 zero point (microsoft/onnxruntime#25526). The model itself is valid and runs with rewrites off; the
optimized-session check is skipped for exactly this error."""


def _require(condition: bool, message: str) -> None:
    """An :class:`AssertionError` with ``message`` unless ``condition`` (kept under ``python -O`` too)."""
    if not condition:
        raise AssertionError(message)


def feeds_for(model: onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Probe feeds (verification) and calibration feeds (other random values), both within the input specs."""
    return generated_probe_feeds(model, count=2, seed=0), generated_probe_feeds(model, count=3, seed=1)


def run_pipeline(model: onnx.ModelProto, passes: Sequence[Pass]) -> ManagerResult | None:
    """Run ``passes`` with verification and calibration on a copy of ``model``; ``None`` when a pass refused the
    model through a :class:`PreconditionError` (a clean skip). Any other failure propagates. Checks that the
    caller's ``model`` is left untouched."""
    before = model.SerializeToString()
    probes, calibration = feeds_for(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        result = PassManager(passes, probe_feeds=probes).run(
            work, PassContext(calibration_data=calibration, progress=False))
    except PassError as exc:
        if isinstance(exc.__cause__, PreconditionError):
            return None
        raise
    _require(model.SerializeToString() == before, "the caller's model was modified")
    return result


def assert_runs_like(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """``rewritten`` passes the checker and runs in onnxruntime (rewrites off and on) with finite outputs of the
    shapes ``original`` produces on the same probe feeds."""
    onnx.checker.check_model(rewritten, full_check=True)
    probes, _ = feeds_for(original)
    expected = reference_outputs(original, probes)
    optimized = _optimized_session(rewritten)
    for feed, ref, plain in zip(probes, expected, reference_outputs(rewritten, probes), strict=True):
        runs = [("plain", plain)] + ([("optimized", run_session(optimized, feed))] if optimized else [])
        for name, value in ref.items():
            for label, outputs in runs:
                got = outputs[name]
                _require(got.shape == value.shape and got.dtype == value.dtype,
                         f"{label} output {name!r}: {got.dtype} {list(got.shape)}, expected {value.dtype} "
                         f"{list(value.shape)}")
                _require(bool(np.isfinite(got).all()), f"{label} output {name!r} is not finite")


def _optimized_session(model: onnx.ModelProto):
    """A session with onnxruntime's graph rewrites on; None for :data:`KNOWN_ORT_OPTIMIZER_BUG` alone."""
    try:
        return create_session(model, optimize=True)
    except Exception as exc:
        if KNOWN_ORT_OPTIMIZER_BUG in str(exc):
            return None
        raise


def _graph_only(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    return copy.SerializeToString()


def dump_on_failure(check: Check) -> Check:
    """With ``ONNXSMITH_FUZZ_DUMP=folder`` set, save every failing input model there (``<config>-<n>.onnx``)."""

    def checked(fm: FuzzModel, name: str) -> str:
        try:
            return check(fm, name)
        except Exception:
            folder = os.environ.get("ONNXSMITH_FUZZ_DUMP")
            if folder:
                os.makedirs(folder, exist_ok=True)
                onnx.save(fm.model, os.path.join(folder, f"{name}-{len(os.listdir(folder))}.onnx"))
            raise

    return checked


def _outcome(result: ManagerResult) -> str:
    """'modified' when a pass other than shape inference changed the model, else 'unchanged'."""
    return "modified" if any(r.modified for r in result.records if r.name != "shape-inference") else "unchanged"


@dump_on_failure
def check_lossless(fm: FuzzModel, name: str) -> str:
    """The lossless property for configuration ``name`` of :data:`LOSSLESS`; returns 'skipped', 'modified' or
    'unchanged'."""
    result = run_pipeline(fm.model, LOSSLESS[name]())
    if result is None:
        return "skipped"
    if not any(r.modified for r in result.records):
        _require(_graph_only(result.model) == _graph_only(fm.model),
                 "a pass that reported no change changed the model")
    assert_runs_like(fm.model, result.model)
    return _outcome(result)


@dump_on_failure
def check_lossy(fm: FuzzModel, name: str) -> str:
    """The lossy-pass / recipe property for configuration ``name`` of :data:`LOSSY` or :data:`RECIPES`; returns
    like :func:`check_lossless`."""
    result = run_pipeline(fm.model, {**LOSSY, **RECIPES}[name]())
    if result is None:
        return "skipped"
    assert_runs_like(fm.model, result.model)
    return _outcome(result)


def configurations() -> dict[str, tuple[str, Check]]:
    """Every configuration name -> (property: ``lossless``, ``lossy`` or ``recipe``; its check)."""
    table: dict[str, tuple[str, Check]] = {}
    table.update({name: ("lossless", check_lossless) for name in sorted(LOSSLESS)})
    table.update({name: ("lossy", check_lossy) for name in sorted(LOSSY)})
    table.update({name: ("recipe", check_lossy) for name in sorted(RECIPES)})
    return table
