"""The pass manager: plans a pass list, runs it, checks and verifies every step, and records what happened.

After each pass it runs ``onnx.checker``; when verifying, it checks the ``value_info`` a pass added or changed
against the shapes onnxruntime computes on the probe feeds, runs the result, and after each lossless pass
compares outputs before and after against the pass's declared tolerance. A result that fails gives way to the
pass's declared fallbacks; an optional pass with no result that verifies is skipped; any other failure raises
:class:`PassError` naming the pass and the passes that ran before it. Without verification, the ``value_info``
passes added is removed before the model is returned. The records are written into the model's
``metadata_props``.
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
from onnxsmith.core.errors import PassError, first_line
from onnxsmith.core.feeds import Feed, Outputs
from onnxsmith.core.model_io import check_model
from onnxsmith.core.pass_base import Pass, PassContext, PreconditionError, default_opset
from onnxsmith.optimizer.verification import ValueInfoConflict, changed_value_info, compare_outputs, reference_outputs, relax_value_info, value_info_conflicts, value_info_snapshot
from onnxsmith.core.feeds import generated_probe_feeds
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
    fallback: str | None = None
    """The label of the lesser result used because the pass's own result failed verification."""
    skipped: str | None = None
    """Why an optional pass's work was dropped (the model went on as it was given)."""


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
            planned.append(UpgradeOpset(target=needed))
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
        given_value_info = value_info_snapshot(model)
        probes, reference, unverified_reason = self._initial_reference(model, plan)
        records: list[PassRecord] = []
        for p in plan:
            model, record, reference = self._run_one(p, model, context, records, probes, reference)
            records.append(record)
            if self.on_record is not None:
                self.on_record(record)
        if reference is None:
            _keep_given_value_info(model, given_value_info)
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
        value_info_before = value_info_snapshot(model)
        start = time.perf_counter()
        try:
            result = p.run(model, context)
        except Exception as exc:
            if p.optional:
                return model, self._skipped(p, model, first_line(exc), time.perf_counter() - start), reference
            raise PassError(f"pass {p.name!r} failed: {first_line(exc)}{where}") from exc
        seconds = time.perf_counter() - start
        candidates = [(None, result), *result.fallbacks]
        failures: list[PassError] = []
        for index, (label, candidate) in enumerate(candidates):
            last = index == len(candidates) - 1
            try:
                verification, relaxed, after = self._verify(p, value_info_before, candidate.model, candidate.modified,
                                                            probes, reference, where, relax=last)
            except PassError as exc:
                failures.append(exc)
                continue
            record = PassRecord(p.name, p.lossless, seconds, candidate.modified, nodes_before,
                                len(candidate.model.graph.node), dict(candidate.changes), verification,
                                calibration_seconds, list(candidate.details))
            if failures:
                record.fallback = label
                record.changes["fallback"] = label
                record.details += [{"kind": "fallback", "reason": str(f)} for f in failures]
                log.warning("pass %r: using its fallback %r (%s)", p.name, label, first_line(failures[0]))
            if relaxed:
                record.changes["value_info_relaxed"] = len(relaxed)
                record.details += [{"tensor": name, "kind": "value_info-relaxed", "reason": conflict.reason}
                                   for name, conflict in relaxed.items()]
                log.warning("pass %r declared %d tensor shapes onnxruntime contradicts; removed them (e.g. %r: %s)",
                            p.name, len(relaxed), *next(iter((n, c.reason) for n, c in relaxed.items())))
            return candidate.model, record, after
        if p.optional:
            return model, self._skipped(p, model, "; ".join(str(f) for f in failures), seconds), reference
        raise failures[0]

    def _verify(
        self,
        p: Pass,
        value_info_before: dict[str, bytes],
        model: onnx.ModelProto,
        modified: bool,
        probes: list[Feed],
        reference: list[Outputs] | None,
        where: str,
        *,
        relax: bool,
    ) -> tuple[dict[str, Any] | None, dict[str, ValueInfoConflict], list[Outputs] | None]:
        """Check one result of ``p``: ``onnx.checker``; then, when verifying, its new ``value_info`` against
        onnxruntime (contradicted entries fail the result, or with ``relax`` lose their shape), that onnxruntime
        runs it, and for a lossless pass that outputs stay within tolerance. Returns the comparison, the relaxed
        entries and the new reference outputs; raises :class:`PassError` naming what failed."""
        try:
            check_model(model)
        except onnx.checker.ValidationError as exc:
            raise PassError(f"pass {p.name!r} produced an invalid model: {first_line(exc)}{where}") from exc
        if reference is None or (p.lossless and not modified):
            return None, {}, reference
        relaxed: dict[str, ValueInfoConflict] = {}
        changed = changed_value_info(value_info_before, model)
        try:
            conflicts = value_info_conflicts(model, changed, probes) if changed else {}
        except Exception as exc:
            raise PassError(f"pass {p.name!r} produced a model onnxruntime cannot run: {first_line(exc)}{where}") from exc
        if conflicts and not relax:
            name, conflict = next(iter(conflicts.items()))
            raise PassError(f"pass {p.name!r} declared {len(conflicts)} tensor shapes onnxruntime contradicts "
                            f"(e.g. {name!r}: {conflict.reason}){where}")
        if conflicts:
            relax_value_info(model, conflicts)
            relaxed = conflicts
        try:
            after = reference_outputs(model, probes)
        except Exception as exc:
            raise PassError(f"pass {p.name!r} produced a model onnxruntime cannot run: {first_line(exc)}{where}") from exc
        if not p.lossless:
            return None, relaxed, after
        comparison = compare_outputs(reference, after, p.tolerance)
        if not comparison.within_tolerance:
            raise PassError(
                f"lossless pass {p.name!r} changed output {comparison.worst_output!r}: max abs error "
                f"{comparison.max_abs_error:.3g} (relative {comparison.max_rel_error:.3g}) exceeds "
                f"atol {p.tolerance.atol:g} + rtol {p.tolerance.rtol:g}{where}"
            )
        return {**comparison.as_dict(), "atol": p.tolerance.atol, "rtol": p.tolerance.rtol}, relaxed, after

    @staticmethod
    def _skipped(p: Pass, model: onnx.ModelProto, reason: str, seconds: float) -> PassRecord:
        """The record of an optional pass whose work was dropped: the model stays as it was given."""
        log.warning("optional pass %r skipped: %s", p.name, reason)
        nodes = len(model.graph.node)
        return PassRecord(p.name, p.lossless, seconds, False, nodes, nodes, skipped=reason)

    @staticmethod
    def _calibrate(p: Pass, model: onnx.ModelProto, context: PassContext, where: str) -> float:
        """Run the observers ``p`` asks for (activations, then loss gradients) over the calibration data; returns
        the seconds it took."""
        if not p.needs_calibration:
            return 0.0
        start = time.perf_counter()
        context.gradients, context.gradients_unavailable = None, None
        try:
            context.calibration = collect(model, p.calibration_request(model), context.calibration_data,
                                          progress=context.progress)
            request = p.gradient_request(model)
        except Exception as exc:  # onnxruntime and observer errors alike: name the pass, keep the cause
            raise PassError(f"calibration for pass {p.name!r} failed: {first_line(exc)}{where}") from exc
        if request is not None:
            try:
                from onnxsmith.calibration.gradients import collect_gradients  # torch, only when a pass asks

                context.gradients = collect_gradients(model, request.observers, context.calibration_data,
                                                      loss=request.loss, progress=context.progress)
            except Exception as exc:
                if request.fallback is None:
                    raise PassError(f"gradients for pass {p.name!r} failed: {first_line(exc)}{where}") from exc
                context.gradients_unavailable = first_line(exc)
                log.warning("pass %r goes on with the %s: its gradients are unavailable (%s)", p.name,
                            request.fallback, context.gradients_unavailable)
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


def _keep_given_value_info(model: onnx.ModelProto, given: dict[str, bytes]) -> None:
    """Undo the ``value_info`` passes added or changed (unverified shapes never reach an output): entries the
    input declared come back as it declared them, new ones go."""
    kept = []
    for info in model.graph.value_info:
        if info.name in given:
            kept.append(onnx.ValueInfoProto.FromString(given[info.name]))
    if len(kept) < len(model.graph.value_info):
        log.info("removing %d unverified value_info entries", len(model.graph.value_info) - len(kept))
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _after(done: Sequence[PassRecord]) -> str:
    if not done:
        return " (it was the first pass)"
    return " (passes run before it: " + ", ".join(r.name for r in done) + ")"
