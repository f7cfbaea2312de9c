"""Numerical verification of rewrites: probe inputs, reference outputs, and the before/after comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.collection import with_outputs
from onnxsmith.core.feeds import Feed, Outputs
from onnxsmith.core.pass_base import Tolerance

def reference_outputs(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[Outputs]:
    """Outputs of ``model`` on ``feeds`` with onnxruntime's own graph rewrites disabled."""
    session = create_session(model, optimize=False)
    return [run_session(session, feed) for feed in feeds]


@dataclass(frozen=True)
class Comparison:
    """The worst output deviation between two runs of the same feeds."""

    max_abs_error: float
    max_rel_error: float
    worst_output: str
    within_tolerance: bool

    def as_dict(self) -> dict[str, float | str | bool]:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "worst_output": self.worst_output,
            "within_tolerance": self.within_tolerance,
        }


def compare_outputs(before: Sequence[Outputs], after: Sequence[Outputs], tolerance: Tolerance) -> Comparison:
    """Compare output sets feed by feed and name by name.

    Float outputs must satisfy ``tolerance`` (NaNs must stay where they were); integer and boolean outputs must be
    equal. Missing outputs, changed shapes or changed dtypes fail with an infinite error.
    """
    worst = Comparison(0.0, 0.0, "", True)
    for ref_outputs, new_outputs in zip(before, after, strict=True):
        for name, ref in ref_outputs.items():
            new = new_outputs.get(name)
            if new is None or new.shape != ref.shape or new.dtype != ref.dtype:
                return Comparison(float("inf"), float("inf"), name, False)
            abs_error, scale = _deviation(ref, new)
            rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else float("inf"))
            if np.issubdtype(ref.dtype, np.floating):
                ok = tolerance.allows(abs_error, scale)
            else:
                ok = abs_error == 0
            if not ok:
                return Comparison(abs_error, rel_error, name, False)
            if abs_error >= worst.max_abs_error:
                worst = Comparison(abs_error, rel_error, name, True)
    return worst


def _deviation(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    if ref.size == 0:
        return 0.0, 0.0
    if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
        return (0.0 if np.array_equal(ref, new) else float("inf")), 1.0
    ref64 = ref.astype(np.float64)
    new64 = new.astype(np.float64)
    ref_nan, new_nan = np.isnan(ref64), np.isnan(new64)
    if not np.array_equal(ref_nan, new_nan):
        return float("inf"), 1.0
    finite = ~ref_nan
    if not finite.any():
        return 0.0, 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(ref64[finite] - new64[finite])
    diff = np.where(np.isnan(diff), 0.0, diff)  # equal infinities
    scale = np.abs(ref64[finite])
    return float(diff.max()), float(scale[np.isfinite(scale)].max(initial=0.0))



def value_info_snapshot(model: onnx.ModelProto) -> dict[str, bytes]:
    """``model``'s main-graph ``value_info`` entries, serialized, by name (passes may edit the model in place)."""
    return {info.name: info.SerializeToString() for info in model.graph.value_info}


def changed_value_info(before: Mapping[str, bytes], after: onnx.ModelProto) -> list[str]:
    """Names of ``after``'s main-graph ``value_info`` entries that the snapshot ``before`` lacks or declares
    differently."""
    return [info.name for info in after.graph.value_info if before.get(info.name) != info.SerializeToString()]


@dataclass(frozen=True)
class ValueInfoConflict:
    """Why a ``value_info`` entry contradicts onnxruntime; ``type_wrong`` when its element type (not only its
    shape) is wrong."""

    reason: str
    type_wrong: bool = False


def value_info_conflicts(model: onnx.ModelProto, names: Sequence[str],
                         feeds: Sequence[Feed]) -> dict[str, ValueInfoConflict]:
    """Which of ``model``'s ``value_info`` entries named ``names`` disagree with what onnxruntime computes.

    The entries under test are removed from a copy of the model (onnxruntime plans memory from declared shapes,
    so a wrong one can crash the run or corrupt it), the tensors become outputs, and each feed's values are
    compared with the declarations: element type, rank, every fixed dimension, and every symbolic dimension,
    which must take one size across all tensors that name it within a feed (each tensor naming an inconsistent
    symbol is reported). Raises what onnxruntime raises when the copy cannot run.
    """
    wanted = set(names)
    declared = {info.name: info for info in model.graph.value_info if info.name in wanted}
    produced = {out for node in model.graph.node for out in node.output}
    tested = [name for name in declared if name in produced]
    if not tested or not feeds:
        return {}
    untyped = onnx.ModelProto()
    untyped.CopyFrom(model)
    drop_value_info(untyped, list(declared))
    session = create_session(with_outputs(untyped, tested), optimize=False)
    conflicts: dict[str, ValueInfoConflict] = {}
    for feed in feeds:
        values = run_session(session, feed, tested)
        symbols: dict[str, dict[int, list[str]]] = {}
        for name in tested:
            conflict = _declaration_mismatch(declared[name], values[name], symbols)
            if conflict is not None:
                conflicts.setdefault(name, conflict)
        for symbol, sizes in symbols.items():
            if len(sizes) > 1:
                seen = ", ".join(f"{size} in {users[0]!r}" for size, users in sorted(sizes.items()))
                for users in sizes.values():
                    for name in users:
                        conflicts.setdefault(name, ValueInfoConflict(f"symbol {symbol!r} takes several sizes ({seen})"))
    return conflicts


def _declaration_mismatch(info: onnx.ValueInfoProto, value: np.ndarray,
                          symbols: dict[str, dict[int, list[str]]]) -> ValueInfoConflict | None:
    """How ``value`` contradicts ``info`` (``None`` if it does not); records the size each symbol takes."""
    tensor_type = info.type.tensor_type
    if tensor_type.elem_type and helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) != value.dtype:
        declared = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        return ValueInfoConflict(f"declared {declared}, computed {value.dtype}", type_wrong=True)
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if len(dims) != value.ndim:
        return ValueInfoConflict(f"declared rank {len(dims)}, computed shape {list(value.shape)}")
    for axis, (dim, size) in enumerate(zip(dims, value.shape)):
        if dim.HasField("dim_value") and 0 < dim.dim_value != size:
            return ValueInfoConflict(f"axis {axis} declared {dim.dim_value}, computed shape {list(value.shape)}")
        if dim.HasField("dim_param") and dim.dim_param:
            symbols.setdefault(dim.dim_param, {}).setdefault(int(size), []).append(info.name)
    return None


def drop_value_info(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Remove the main-graph ``value_info`` entries named ``names`` from ``model`` (in place)."""
    dropped = set(names)
    kept = [info for info in model.graph.value_info if info.name not in dropped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def relax_value_info(model: onnx.ModelProto, conflicts: Mapping[str, ValueInfoConflict]) -> None:
    """Make ``model``'s ``value_info`` agree with onnxruntime (in place): entries with a wrong element type go,
    entries with a wrong shape keep their element type and lose their shape."""
    drop_value_info(model, [name for name, conflict in conflicts.items() if conflict.type_wrong])
    for info in model.graph.value_info:
        if info.name in conflicts:
            info.type.tensor_type.ClearField("shape")
