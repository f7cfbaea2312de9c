"""Lossless: convert the model to a newer default-domain opset with ``onnx.version_converter``."""

from __future__ import annotations

import onnx
from onnx import version_converter

from onnxsmith.optimizer.pass_base import Pass, PassContext, PassResult, Tolerance, default_opset


class UpgradeOpset(Pass):
    """Raise the default-domain opset to ``target`` (a no-op when the model is already there or newer)."""

    name = "upgrade-opset"
    description = "convert the model to a newer opset with onnx.version_converter"
    lossless = True
    tolerance = Tolerance(atol=1e-5, rtol=1e-4)

    def __init__(self, target: int = 21) -> None:
        self.target = target

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        current = default_opset(model)
        if current >= self.target:
            return PassResult(model, False, {"opset": current})
        converted = version_converter.convert_version(model, self.target)
        needed_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
        converted.ir_version = max(converted.ir_version, needed_ir)
        return PassResult(converted, True, {"opset_from": current, "opset_to": self.target})

    def __repr__(self) -> str:
        return f"<pass {self.name} target={self.target}>"
