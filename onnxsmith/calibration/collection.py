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
from onnxsmith.calibration.routing import RoutedObserver
from onnxsmith.core.feeds import Feed


def collect(
    model: onnx.ModelProto,
    observers: Mapping[str, Observer | RoutedObserver],
    feeds: Sequence[Feed],
    *,
    progress: bool = True,
) -> Mapping[str, Observer | RoutedObserver]:
    """Run ``feeds`` through ``model`` and let each observer watch its tensor; returns ``observers``.

    An observer watches the tensor named by its key, or, when it has a ``watches`` attribute (a tuple of tensor
    names, e.g. :class:`onnxsmith.calibration.routing.RoutedObserver`), receives those tensors' values of each
    feed as positional arguments. Tensor names must exist in the graph (graph inputs, node outputs); an unknown
    name raises ``KeyError``.
    """
    if not observers:
        return observers
    watched = {key: tuple(getattr(observer, "watches", (key,))) for key, observer in observers.items()}
    names = list(dict.fromkeys(name for tensors in watched.values() for name in tensors))
    session = create_session(with_outputs(model, names))
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    for feed in tqdm(feeds, desc="calibrating", unit="batch", leave=False, disable=None if progress else True):
        values = run_session(session, feed, names)
        for key, tensors in watched.items():
            observers[key].observe(*(values[name] for name in tensors))
    return observers


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (element types from value_info or inputs where
    known; onnxruntime infers the others)."""
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
        info = onnx.ValueInfoProto()
        info.name = name
        if name in known and known[name].type.tensor_type.elem_type:
            info.type.tensor_type.elem_type = known[name].type.tensor_type.elem_type
        extended.graph.output.append(info)
    return extended
