"""Feeds: the types one onnxruntime run takes and gives, a model's declared inputs, and generated feeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

Feed = dict[str, np.ndarray]
"""One onnxruntime input feed: graph input name -> array (batch axis first)."""

Outputs = dict[str, np.ndarray]
"""One onnxruntime result: graph output name -> array."""


@dataclass(frozen=True)
class InputSpec:
    """A graph input's element type and shape (``None`` for symbolic or unknown dimensions)."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None


def input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        tensor_type = graph_input.type.tensor_type
        shape = None
        if tensor_type.HasField("shape"):
            # Exporters such as paddle2onnx write -1 for a free dimension: only positive sizes are fixed.
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in tensor_type.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs[graph_input.name] = InputSpec(dtype, shape)
    return specs


SYMBOLIC_DIM_DEFAULT = 2
"""Size given to symbolic or unknown input dimensions in generated probe inputs."""


def generated_probe_feeds(model: onnx.ModelProto, count: int = 2, seed: int = 0) -> list[Feed]:
    """Random feeds within each graph input's declared type and shape.

    Floats are standard normal, integers are 0 or 1 (valid token ids and masks), inputs whose name contains
    'mask' are all ones, booleans are random, strings are short random words. Symbolic dimensions get
    ``SYMBOLIC_DIM_DEFAULT``.
    """
    initializer_names = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for graph_input in model.graph.input:
            if graph_input.name in initializer_names:
                continue
            tensor_type = graph_input.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            shape = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else SYMBOLIC_DIM_DEFAULT
                for d in tensor_type.shape.dim
            ]
            feed[graph_input.name] = _random_array(graph_input.name, dtype, shape, rng)
        feeds.append(feed)
    return feeds


def _random_array(name: str, dtype: np.dtype, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if "mask" in name.lower():
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype == np.object_:  # TensorProto.STRING
        words = np.array(["a", "onnx", "Hello", "42"], dtype=object)
        return words[rng.integers(0, len(words), size=shape)]
    raise ValueError(f"cannot generate probe values for input {name!r} of type {dtype}")
