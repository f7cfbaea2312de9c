"""onnxruntime sessions on the CPU for verification, calibration and evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxsmith.core.feeds import Feed, Outputs
from onnxsmith.core.model_io import needs_external_data, saved_to_temporary_file

ort.set_default_logger_severity(3)  # errors only: warnings from sessions other code creates (e.g. graph folding)


def create_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    optimize: bool = True,
) -> ort.InferenceSession:
    """A CPU session for a model object or file.

    ``optimize=False`` disables onnxruntime's own graph rewrites, so the session computes exactly what the
    graph says (used to verify rewrites). With rewrites on, the ``DequantizeLinear(INT4) -> MatMul`` fusion
    into ``MatMulNBits`` keeps float activations (``session.qdq_matmulnbits_accuracy_level`` 0; onnxruntime's
    default 4 would quantize them to int8 on the fly, changing the graph's values). Large model objects go
    through a temporary file with external data.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    providers = ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        if needs_external_data(model):
            with saved_to_temporary_file(model) as path:
                return ort.InferenceSession(str(path), options, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    return ort.InferenceSession(str(model), options, providers=providers)


def run_session(session: ort.InferenceSession, feed: Feed, output_names: Sequence[str] | None = None) -> Outputs:
    """Run one feed and return the outputs by name."""
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    values = session.run(names, feed)
    return {name: np.asarray(value) for name, value in zip(names, values)}
