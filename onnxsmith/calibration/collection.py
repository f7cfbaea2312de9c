"""Activation collection: stream calibration feeds through onnxruntime and feed observers.

The requested tensors become extra graph outputs of a copy of the model; each feed's values go straight into
their observers and are dropped, so memory holds one feed's activations at a time whatever the sample count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from tqdm import tqdm

from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.observers import Observer
from onnxsmith.models.base import Feed


def collect(
    model: onnx.ModelProto,
    observers: Mapping[str, Observer],
    feeds: Sequence[Feed],
    *,
    progress: bool = True,
) -> Mapping[str, Observer]:
    """Run ``feeds`` through ``model`` and let each observer watch its tensor; returns ``observers``.

    Tensor names must exist in the graph (graph inputs, node outputs); an unknown name raises ``KeyError``.
    """
    if not observers:
        return observers
    session = create_session(with_outputs(model, list(observers)))
    names = list(observers)
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    for feed in tqdm(feeds, desc="calibrating", unit="batch", leave=False, disable=None if progress else True):
        values = run_session(session, feed, names)
        for name in names:
            observers[name].observe(values[name])
    return observers


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (types taken from value_info or inputs)."""
    known = {
        info.name: info
        for info in (*model.graph.value_info, *model.graph.input, *model.graph.output)
    }
    produced = {out for node in model.graph.node for out in node.output} | {i.name for i in model.graph.input}
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    for name in names:
        if name not in produced:
            raise KeyError(f"tensor {name!r} is not produced in the graph")
        if name in existing:
            continue
        if name in known and known[name].type.tensor_type.elem_type:
            info = onnx.ValueInfoProto()
            info.name = name
            info.type.tensor_type.elem_type = known[name].type.tensor_type.elem_type
        else:
            info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        extended.graph.output.append(info)
    return extended
