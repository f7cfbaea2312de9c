"""The pass manager: plans a pass list, runs it, checks and verifies every step, and records what happened.

After each pass it runs ``onnx.checker``; after each lossless pass it compares onnxruntime outputs before and
after on probe feeds against the pass's declared tolerance. Any failure raises :class:`PassError` naming the
pass and the passes that ran before it. The records are written into the model's ``metadata_props``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from onnxsmith import __version__
from onnxsmith.calibration.collection import collect
from onnxsmith.calibration.gradients import collect_gradients
from onnxsmith.errors import PassError, first_line
from onnxsmith.models.base import Feed, Outputs
from onnxsmith.optimizer.model_io import check_model
from onnxsmith.optimizer.pass_base import Pass, PassContext, PreconditionError, default_opset
from onnxsmith.optimizer.verification import compare_outputs, generated_probe_feeds, reference_outputs
from onnxsmith.passes.upgrade_opset import UpgradeOpset

log = logging.getLogger(__name__)

METADATA_KEY = "onnxsmith.passes"


@dataclass
class PassRecord:
    """What one pass did: timing, node counts, its own change counts and the verification result."""

    name: str
    lossless: bool
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    changes: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    calibration_seconds: float = 0.0
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ManagerResult:
    """The rewritten model, one record per pass run, and why verification was off (``None`` when it ran)."""

    model: onnx.ModelProto
    records: list[PassRecord]
    unverified_reason: str | None = None


def plan_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> list[Pass]:
    """The passes to run, with one opset upgrade inserted before the first pass that needs a newer opset.

    The upgrade targets the highest ``min_opset`` any pass declares, so the model is converted once.
    """
    needed = max((p.min_opset for p in passes if p.min_opset is not None), default=0)
    current = default_opset(model)
    planned: list[Pass] = []
    for p in passes:
        if p.min_opset is not None and current < p.min_opset:
            planned.append(UpgradeOpset(needed))
            current = needed
        planned.append(p)
    return planned


class PassManager:
    """Runs an ordered pass list with checking, verification and records.

    ``probe_feeds`` are the inputs used for verification (generated within the input specs when omitted);
    ``verify=False`` skips the numerical comparison (``onnx.checker`` still runs). ``on_record`` is called after
    every pass, e.g. to print progress.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        probe_feeds: Sequence[Feed] | None = None,
        verify: bool = True,
        on_record: Callable[[PassRecord], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.probe_feeds = list(probe_feeds) if probe_feeds is not None else None
        self.verify = verify
        self.on_record = on_record

    def run(self, model: onnx.ModelProto, context: PassContext | None = None) -> ManagerResult:
        """Run the planned passes on ``model`` (which may be edited in place) and return the result."""
        context = context or PassContext()
        plan = plan_passes(model, self.passes)
        probes, reference, unverified_reason = self._initial_reference(model, plan)
        records: list[PassRecord] = []
        for p in plan:
            model, record, reference = self._run_one(p, model, context, records, probes, reference)
            records.append(record)
            if self.on_record is not None:
                self.on_record(record)
        write_provenance(model, records)
        return ManagerResult(model, records, unverified_reason)

    def _initial_reference(
        self, model: onnx.ModelProto, plan: Sequence[Pass]
    ) -> tuple[list[Feed], list[Outputs] | None, str | None]:
        if not self.verify:
            return [], None, "verification disabled"
        if not any(p.lossless for p in plan):
            return [], None, "no lossless pass to verify"
        try:
            probes = self.probe_feeds if self.probe_feeds is not None else generated_probe_feeds(model)
            return probes, reference_outputs(model, probes), None
        except Exception as exc:  # noqa: BLE001 - any onnxruntime failure means "cannot verify"
            reason = f"onnxruntime cannot run the input model: {first_line(exc)}"
            log.warning("lossless passes will not be verified: %s", reason)
            return [], None, reason

    def _run_one(
        self,
        p: Pass,
        model: onnx.ModelProto,
        context: PassContext,
        done: Sequence[PassRecord],
        probes: list[Feed],
        reference: list[Outputs] | None,
    ) -> tuple[onnx.ModelProto, PassRecord, list[Outputs] | None]:
        where = _after(done)
        try:
            p.requires(model, context)
        except PreconditionError as exc:
            raise PassError(f"{exc}{where}") from exc
        nodes_before = len(model.graph.node)
        calibration_seconds = self._calibrate(p, model, context, where)
        start = time.perf_counter()
        try:
            result = p.run(model, context)
        except Exception as exc:
            raise PassError(f"pass {p.name!r} failed: {first_line(exc)}{where}") from exc
        seconds = time.perf_counter() - start
        model = result.model
        try:
            check_model(model)
        except onnx.checker.ValidationError as exc:
            raise PassError(f"pass {p.name!r} produced an invalid model: {first_line(exc)}{where}") from exc
        record = PassRecord(p.name, p.lossless, seconds, result.modified, nodes_before, len(model.graph.node),
                            dict(result.changes), calibration_seconds=calibration_seconds,
                            details=list(result.details))
        if reference is None or (p.lossless and not result.modified):
            return model, record, reference
        try:
            after = reference_outputs(model, probes)
        except Exception as exc:
            raise PassError(f"pass {p.name!r} produced a model onnxruntime cannot run: {first_line(exc)}{where}") from exc
        if p.lossless:
            comparison = compare_outputs(reference, after, p.tolerance)
            record.verification = {**comparison.as_dict(), "atol": p.tolerance.atol, "rtol": p.tolerance.rtol}
            if not comparison.within_tolerance:
                raise PassError(
                    f"lossless pass {p.name!r} changed output {comparison.worst_output!r}: max abs error "
                    f"{comparison.max_abs_error:.3g} (relative {comparison.max_rel_error:.3g}) exceeds "
                    f"atol {p.tolerance.atol:g} + rtol {p.tolerance.rtol:g}{where}"
                )
        return model, record, after


    @staticmethod
    def _calibrate(p: Pass, model: onnx.ModelProto, context: PassContext, where: str) -> float:
        """Run the observers ``p`` asks for (activations, then loss gradients) over the calibration data; returns
        the seconds it took."""
        if not p.needs_calibration:
            return 0.0
        start = time.perf_counter()
        try:
            context.calibration = collect(model, p.calibration_request(model), context.calibration_data,
                                          progress=context.progress)
            request = p.gradient_request(model)
            context.gradients = None if request is None else collect_gradients(
                model, request.observers, context.calibration_data, loss=request.loss, progress=context.progress)
        except Exception as exc:  # onnxruntime and observer errors alike: name the pass, keep the cause
            raise PassError(f"calibration for pass {p.name!r} failed: {first_line(exc)}{where}") from exc
        return time.perf_counter() - start


def write_provenance(model: onnx.ModelProto, records: Sequence[PassRecord]) -> None:
    """Store the pass records (JSON) and the onnxsmith version in ``metadata_props``, replacing older ones."""
    entries = {
        METADATA_KEY: json.dumps([{k: v for k, v in asdict(r).items() if k != "details"} for r in records]),
        "onnxsmith.version": __version__,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def read_provenance(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The pass records stored by :func:`write_provenance` (empty when the model has none)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return []


def _after(done: Sequence[PassRecord]) -> str:
    if not done:
        return " (it was the first pass)"
    return " (passes run before it: " + ", ".join(r.name for r in done) + ")"
