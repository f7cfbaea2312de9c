"""Calibration and probe data readers, validated against a model's inputs."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxsmith.errors import UserError
from onnxsmith.models.base import Feed


def read_npz_feeds(path: str | os.PathLike[str], model: onnx.ModelProto) -> list[Feed]:
    """Feeds from an ``.npz`` holding one array per model input, first axis = samples (one feed per sample).

    Names, dtypes and ranks are validated against the model's inputs; NaN/Inf and empty arrays are rejected.
    Every problem is a :class:`UserError` naming the file, the input and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration data not found: {path}")
    if path.suffix != ".npz":
        raise UserError(f"unsupported calibration data {path.name}: expected an .npz file (one array per input)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read calibration data {path.name}: {exc}") from exc
    specs = _input_specs(model)
    missing = sorted(set(specs) - set(arrays))
    extra = sorted(set(arrays) - set(specs))
    if missing or extra:
        raise UserError(
            f"calibration data {path.name} does not match the model inputs {sorted(specs)}: "
            f"missing {missing}, unexpected {extra}"
        )
    counts = set()
    for name, array in arrays.items():
        dtype, rank = specs[name]
        if array.dtype != dtype:
            raise UserError(f"calibration input {name!r} has dtype {array.dtype}, the model expects {dtype}")
        if rank is not None and array.ndim != rank:
            raise UserError(
                f"calibration input {name!r} has rank {array.ndim}, the model expects {rank} (first axis = samples)"
            )
        if array.size == 0:
            raise UserError(f"calibration input {name!r} is empty")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UserError(f"calibration input {name!r} contains NaN or Inf")
        counts.add(array.shape[0])
    if len(counts) != 1:
        raise UserError(f"calibration inputs in {path.name} have different sample counts: {sorted(counts)}")
    samples = counts.pop()
    return [{name: array[i : i + 1] for name, array in arrays.items()} for i in range(samples)]


def _input_specs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, int | None]]:
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        tensor_type = graph_input.type.tensor_type
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        specs[graph_input.name] = (np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), rank)
    return specs
