"""Loading, checking and atomically saving ONNX models, with one-line errors for bad files.

Models whose tensors exceed protobuf's 2 GB limit are saved with external data beside the model file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxsmith.core.errors import UserError, first_line

EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
"""Models whose tensors add up to more than this are written with external data."""
EXTERNAL_TENSOR_MIN_BYTES = 1024
"""In such models, tensors of at least this size go to the external data file."""


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the main graph's initializers (raw or typed fields), without serialising the model."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += tensor.ByteSize()
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialised as a single protobuf file."""
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model (external data included) or raise a :class:`UserError` naming the problem.

    External data must lie in the model's folder (or below it): a location that resolves elsewhere
    (``../secret.bin``, an absolute path, a symlink out) is refused before any external file is read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        raise UserError(f"expected an ONNX model file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"not a valid ONNX model (cannot parse {path.name}): {first_line(exc)}") from exc
    if not model.graph.node and not model.graph.output:
        raise UserError(f"not a valid ONNX model (no graph found in {path.name})")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise UserError(f"not a valid ONNX model ({path.name} imports no ONNX opset; truncated file?)")
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the external data of ``model`` (loaded from ``path``) into its tensors.

    Every location is checked first: one outside the model's folder, or a missing file, is a :class:`UserError`
    naming the tensor and the location, raised before any external file is opened.
    """
    folder = path.absolute().parent.resolve()
    external = [t for t in _all_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    for tensor in external:
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise UserError(f"refusing external data of tensor {tensor.name!r} at {location!r}: it lies outside "
                            f"the model's folder {folder}")
        if not target.is_file():
            raise UserError(f"external data of {path.name} is missing: {location} (tensor {tensor.name!r})")
    if not external:
        return
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise UserError(f"cannot read the external data of {path.name}: {first_line(exc)}") from exc


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def check_model(model: onnx.ModelProto) -> None:
    """Run ``onnx.checker`` on the model (through a temporary file when it exceeds the protobuf limit)."""
    if not needs_external_data(model):
        onnx.checker.check_model(model)
        return
    with saved_to_temporary_file(model) as path:
        onnx.checker.check_model(str(path))


@contextmanager
def saved_to_temporary_file(model: onnx.ModelProto) -> Iterator[Path]:
    """Yield the path of a temporary copy of ``model`` (external data beside it if large); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="onnxsmith-"))
    try:
        path = folder / "model.onnx"
        _write(model, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    Large models get their external data in ``<name>.data`` beside the model, also written before the
    rename. A missing destination folder is a :class:`UserError`.
    """
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"output folder does not exist: {path.parent}")
    staging = Path(tempfile.mkdtemp(prefix=".onnxsmith-", dir=path.parent))
    try:
        staged = staging / path.name
        _write(model, staged, data_name=path.name + ".data")
        data_file = staging / (path.name + ".data")
        if data_file.exists():
            os.replace(data_file, path.parent / data_file.name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write(model: onnx.ModelProto, path: Path, data_name: str | None = None) -> None:
    if needs_external_data(model):
        onnx.save_model(
            _copy(model),  # saving with external data rewrites the tensors it is given
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name or path.name + ".data",
            size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
        )
    else:
        onnx.save_model(model, str(path))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
