"""Calibration data readers: ``.npz`` files, folders, Python iterables of feeds, with validation.

Every feed is checked against the model's inputs (names, dtypes, ranks, fixed dimensions, NaN/Inf, emptiness);
a problem is a one-line :class:`UserError` naming the source, the input and what was expected. Sequence
lengths may differ from feed to feed: feeds are run one at a time, so nothing is padded.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxsmith.core.errors import UserError
from onnxsmith.core.feeds import Feed, InputSpec, input_specs
from onnxsmith.core.feeds import generated_probe_feeds

log = logging.getLogger(__name__)

CalibrationSource = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]]
"""A path (``.npz`` file or folder of ``.npz``/``.npy`` files) or an iterable of feed dicts."""

RANDOM_FEEDS = 8
"""How many random feeds the fallback generates."""


def load_calibration(source: CalibrationSource, model: onnx.ModelProto) -> list[Feed]:
    """Read and validate calibration feeds from ``source`` for ``model``.

    - ``.npz`` file: one array per input, first axis = samples; each sample becomes a batch-1 feed.
    - folder: every ``.npz`` file in it (sorted by name) is one feed; for single-input models ``.npy`` files are
      feeds of that input too.
    - iterable: each item is one feed dict.
    """
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            feeds, label = _read_folder(path, specs), path.name
        elif path.is_file():
            if path.suffix != ".npz":
                raise UserError(f"unsupported calibration file {path.name}: expected .npz or a folder of .npz/.npy")
            arrays, label = _read_npz(path), path.name
            feeds = _split_samples(arrays, specs, label)
        else:
            raise UserError(f"calibration data not found: {path}")
    else:
        feeds, label = [dict(feed) for feed in source], "calibration feeds"
    if not feeds:
        raise UserError(f"{label} holds no calibration samples")
    for index, feed in enumerate(feeds):
        validate_feed(feed, specs, f"{label}, sample {index}")
    return feeds


def random_calibration(model: onnx.ModelProto, count: int = RANDOM_FEEDS) -> list[Feed]:
    """Random feeds within the input specs, with a loud warning: ranges calibrated on noise are not real ranges."""
    log.warning(
        "NO CALIBRATION DATA: calibrating on %d random inputs. Quantization ranges will not match real data; "
        "pass --calib with representative inputs.",
        count,
    )
    return generated_probe_feeds(model, count=count)


def validate_feed(feed: Mapping[str, np.ndarray], specs: Mapping[str, InputSpec], where: str) -> None:
    """Raise :class:`UserError` unless ``feed`` matches ``specs`` exactly (names, dtypes, ranks, fixed dims).

    An input may be empty along a dynamic axis (a KV-cache model's prefill has an empty past) as long as some input
    of the feed holds data.
    """
    _check_names(feed, specs, where)
    filled = any(isinstance(array, np.ndarray) and array.size for array in feed.values())
    for name, spec in specs.items():
        array = feed[name]
        if not isinstance(array, np.ndarray):
            raise UserError(f"{where}: input {name!r} is {type(array).__name__}, expected a numpy array")
        if array.dtype != spec.dtype:
            raise UserError(f"{where}: input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise UserError(f"{where}: input {name!r} has shape {array.shape}, the model expects rank {len(spec.shape)}")
            for axis, (actual, expected) in enumerate(zip(array.shape, spec.shape)):
                if expected not in (None, 0) and actual != expected:
                    raise UserError(
                        f"{where}: input {name!r} has size {actual} on axis {axis}, the model expects {expected}"
                    )
        if array.size == 0 and not filled:
            raise UserError(f"{where}: input {name!r} is empty")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UserError(f"{where}: input {name!r} contains NaN or Inf")


def _check_names(names: Mapping[str, object], specs: Mapping[str, InputSpec], where: str) -> None:
    missing, extra = sorted(set(specs) - set(names)), sorted(set(names) - set(specs))
    if missing or extra:
        raise UserError(f"{where}: inputs do not match the model's {sorted(specs)}: missing {missing}, unexpected {extra}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read calibration data {path.name}: {exc}") from exc


def _split_samples(arrays: dict[str, np.ndarray], specs: Mapping[str, InputSpec], label: str) -> list[Feed]:
    _check_names(arrays, specs, label)
    counts = {name: (array.shape[0] if array.ndim else 0) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise UserError(f"{label}: inputs have different sample counts (first axis): {counts}")
    samples = next(iter(counts.values()))
    return [{name: array[i : i + 1] for name, array in arrays.items()} for i in range(samples)]


def _read_folder(folder: Path, specs: Mapping[str, InputSpec]) -> list[Feed]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".npy"))
    feeds = []
    for path in files:
        if path.suffix == ".npz":
            feeds.append(_read_npz(path))
        elif len(specs) == 1:
            try:
                feeds.append({next(iter(specs)): np.load(path, allow_pickle=False)})
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read calibration data {path.name}: {exc}") from exc
        else:
            raise UserError(f"{path.name}: .npy files serve single-input models only; use .npz (one array per input)")
    return feeds
