"""Per-layer fidelity: the SQNR of every activation a quantized model quantizes, measured on FP32 activations.

For each ``QuantizeLinear`` of the quantized model whose input tensor also exists in the reference model, the
reference model's values of that tensor are fake-quantized with the same scale and zero point. The result tells
which layer's quantization loses the most signal, independently of the error accumulated before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import numpy_helper

from onnxsmith.calibration.collection import collect
from onnxsmith.calibration.observers import QuantizationNoiseObserver
from onnxsmith.models.base import Feed


def activation_sqnr(
    reference: onnx.ModelProto, quantized: onnx.ModelProto, feeds: Sequence[Feed], *, progress: bool = True
) -> dict[str, float]:
    """SQNR (dB) of each quantized activation tensor over ``feeds``; empty when nothing is quantized."""
    constants = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    reference_tensors = {out for node in reference.graph.node for out in node.output}
    reference_tensors |= {i.name for i in reference.graph.input}
    observers = {}
    for node in quantized.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in reference_tensors:
            continue
        if node.input[1] not in constants or len(node.input) < 3 or node.input[2] not in constants:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = constants[node.input[1]]
        observers[node.input[0]] = QuantizationNoiseObserver(
            scale, constants[node.input[2]], axis=axis if scale.ndim else None, name=node.input[0]
        )
    collect(reference, observers, feeds, progress=progress)
    return {name: observer.sqnr_db() for name, observer in observers.items()}
