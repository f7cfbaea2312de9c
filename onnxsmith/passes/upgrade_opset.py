"""Lossless: convert the model to a newer default-domain opset with ``onnx.version_converter``."""

from __future__ import annotations

import onnx
from onnx import version_converter

from dataclasses import dataclass

from onnxsmith.core.options import PassOptions, option
from onnxsmith.core.pass_base import Pass, PassContext, PassResult, Tolerance, default_opset


@dataclass(frozen=True)
class UpgradeOpsetOptions(PassOptions):
    target: int = option(21, "the default-domain opset to convert to", minimum=7)


class UpgradeOpset(Pass):
    """Raise the default-domain opset to ``target`` (a no-op when the model is already there or newer)."""

    name = "upgrade-opset"
    description = "convert the model to a newer opset with onnx.version_converter"
    lossless = True
    tolerance = Tolerance(atol=1e-5, rtol=1e-4)
    Options = UpgradeOpsetOptions

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        current = default_opset(model)
        if current >= self.options.target:
            return PassResult(model, False, {"opset": current})
        converted = version_converter.convert_version(model, self.options.target)
        needed_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
        converted.ir_version = max(converted.ir_version, needed_ir)
        return PassResult(converted, True, {"opset_from": current, "opset_to": self.options.target})
