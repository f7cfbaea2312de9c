"""The INT8 QDQ quantizer the W8A8 passes compose: placement options, activation ranges and weight quantization.

``int8-qdq``, ``moe-qdq`` and ``ptq-qdq`` place Q/DQ with :class:`onnxsmith.analysis.qdq_placement.Int8Placer`
configured from :class:`PlacementOptions`; the two calibrated-range passes compute activation scales with
:func:`activation_qparams` from the observer :func:`activation_observer` gives, and all replace weights by
per-channel int8 ``DequantizeLinear`` with :func:`quantize_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxsmith.analysis.qdq_placement import Int8Placer
from onnxsmith.calibration.observers import HistogramObserver, MinMaxObserver, Observer
from onnxsmith.calibration.qparams import asymmetric_qparams, symmetric_scale
from onnxsmith.calibration.range_search import search_range
from onnxsmith.core.options import PassOptions, check_patterns, option
from onnxsmith.rewrite.qdq_nodes import quantize_weight

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ACT_DTYPES = {"uint8": np.uint8, "int8": np.int8}
TWIN_FORMS = ("fake-quant", "dual-gemm")


def act_dtype_option() -> Any:
    """The declared ``act_dtype`` option of a pass quantizing activations."""
    return option("uint8", "activation type: uint8 (onnxruntime CPU speed) or int8 (TensorRT, zero point 0)",
                  choices=tuple(ACT_DTYPES))


def twin_form_option() -> Any:
    """The declared ``twin_form`` option of a pass with twin-uniform quantizers."""
    return option("fake-quant", "ONNX form of twin-uniform tensors (dual-gemm: two integer GEMMs)",
                  choices=TWIN_FORMS)


@dataclass(frozen=True)
class PlacementOptions(PassOptions):
    """Which GEMMs an INT8 QDQ pass quantizes."""

    activation_matmuls: bool = option(True, "quantize MatMuls with two activation inputs (attention) too")
    exclude_nodes: tuple[str, ...] = option((), "node names kept float")
    exclude_ops: tuple[str, ...] = option((), "op types kept float")
    exclude_regex: tuple[str, ...] = option((), "node-name patterns kept float, e.g. 'lm_head|router'",
                                            check=check_patterns)

    def placer(self, **rules: Any) -> Int8Placer:
        """The placer for these options and the pass's own ``rules`` (``twin``, ``sparse_outputs``, ...; a rule
        given here wins over the option of the same name)."""
        options = {"activation_matmuls": self.activation_matmuls, "exclude_nodes": self.exclude_nodes,
                   "exclude_ops": self.exclude_ops, "exclude_regex": self.exclude_regex}
        return Int8Placer(**{**options, **rules})


@dataclass(frozen=True)
class CalibratedOptions(PlacementOptions):
    """Placement plus per-tensor activation ranges from a range search over the calibration data."""

    act_dtype: str = act_dtype_option()
    calibrator: str = option("minmax", "activation range search", choices=CALIBRATORS)
    percentile: float = option(99.999, "the percentile calibrator's percentile", above=0, maximum=100)


def activation_observer(calibrator: str, name: str) -> Observer:
    """The observer the ``calibrator``'s range search reads."""
    return MinMaxObserver(name=name) if calibrator == "minmax" else HistogramObserver(name=name)


def activation_qparams(observer: Observer, options: CalibratedOptions) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Scale, zero point and searched range ``[lo, hi]`` of one activation: symmetric int8 with zero point 0, or
    asymmetric uint8."""
    symmetric = options.act_dtype == "int8"
    extra = {"percentile": options.percentile} if options.calibrator == "percentile" else {}
    lo, hi = search_range(observer, options.calibrator, bits=8, symmetric=symmetric, **extra)
    if symmetric:
        scale = np.float32(symmetric_scale(max(abs(lo), abs(hi)), bits=8))
        return scale, np.int8(0), [float(lo), float(hi)]
    scale, zero_point = asymmetric_qparams(lo, hi, np.uint8)
    return np.float32(scale), np.uint8(zero_point), [float(lo), float(hi)]


def quantize_weights(graph: gs.Graph, sites: Sequence[tuple[gs.Node, int, int]]) -> tuple[int, list[dict]]:
    """Replace each weight site's constant by a per-channel int8 ``DequantizeLinear`` (one per weight and axis,
    shared by its readers); returns how many weights were quantized and one detail per weight."""
    details: list[dict] = []
    dequantized: dict[tuple[str, int], gs.Variable] = {}
    for node, index, axis in sites:
        weight = node.inputs[index]
        key = (weight.name, axis)
        if key not in dequantized:  # a tied weight read along another axis needs its own tensor names
            seen = any(name == weight.name for name, _ in dequantized)
            prefix = f"{weight.name}_axis{axis}" if seen else weight.name
            dequantized[key], detail = quantize_weight(graph, weight, axis, prefix=prefix)
            details.append(detail)
        node.inputs[index] = dequantized[key]
    return len(dequantized), details
