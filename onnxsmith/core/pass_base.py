"""What a graph rewrite is: a named pass that declares whether it is lossless and what it requires.

A pass receives a model it may edit in place and returns a :class:`PassResult`. The pass manager, not the pass,
runs ``onnx.checker`` and, for lossless passes, compares onnxruntime outputs before and after the pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import onnx

from onnxsmith.core.feeds import Feed
from onnxsmith.core.options import NoOptions, OptionError, PassOptions

Observer = Any
"""An observer of :mod:`onnxsmith.calibration.observers` (the ground layer does not import calibration)."""


@dataclass(frozen=True)
class Tolerance:
    """How far a lossless pass may move an output: ``max|after - before| <= atol + rtol * max|before|``."""

    atol: float = 1e-5
    rtol: float = 1e-4

    def allows(self, max_abs_error: float, reference_scale: float) -> bool:
        """Whether an output whose largest magnitude is ``reference_scale`` may move by ``max_abs_error``."""
        return max_abs_error <= self.atol + self.rtol * reference_scale


@dataclass
class PassContext:
    """What passes may read besides the model.

    ``calibration_data`` holds the validated calibration feeds; before a pass that ``needs_calibration`` runs, the
    manager fills ``calibration`` with the observers that pass requested, after they watched every feed.
    """

    calibration_data: Sequence[Feed] | None = None
    calibration: Mapping[str, Observer] | None = None
    gradients: Mapping[str, Observer] | None = None
    """Observers of loss gradients ``dL/dT`` the pass asked for with :meth:`Pass.gradient_request`."""
    gradients_unavailable: str | None = None
    """Why the gradients a pass asked for with a fallback could not be computed (``gradients`` is then None)."""
    progress: bool = True


@dataclass
class GradientRequest:
    """Observers keyed by the tensor ``T`` whose gradient ``dL/dT`` each must watch, the loss ``L`` (a name from
    :data:`onnxsmith.calibration.learning.LOSSES`) and the pass's way on without them."""

    observers: dict[str, Observer]
    loss: str = "auto"
    fallback: str | None = None
    """What the pass does without the gradients (e.g. ``"cosine metric"``); ``None``: it needs them, and a
    failure to compute them fails the run."""


@dataclass
class PassResult:
    """The model after the pass, whether it changed, and counts of what changed (e.g. ``{"folded": 3}``)."""

    model: onnx.ModelProto
    modified: bool
    changes: dict[str, int | float | str] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    """Per-item facts for the report (e.g. one entry per quantized tensor); not stored in the model."""
    fallbacks: list[tuple[str, PassResult]] = field(default_factory=list)
    """Lesser results, best first, each with a label saying what it is (e.g. ``"onnx shapes"``): the manager
    takes the first that passes verification when this one does not."""


class PreconditionError(Exception):
    """The model does not meet a pass's declared requirement."""


class Pass(ABC):
    """One graph rewrite.

    Class attributes declare the contract: ``name`` (kebab-case, as used in recipes), ``description`` (one
    line), ``lossless`` (outputs must stay within ``tolerance``, checked by the manager), ``min_opset`` (the
    manager upgrades the model first when it is older), ``needs_calibration`` (the context must carry
    calibration results) and ``optional`` (an analysis the run can do without: when it raises or none of its
    results passes verification, the manager keeps the model it was given, records the pass as skipped with the
    reason and goes on; an optional pass must not edit its input in place).

    ``Options`` is the pass's declared options dataclass (:mod:`onnxsmith.core.options`); a pass is built from an
    instance of it or from keyword values, validated against it, and kept as ``self.options``. ``configure``
    derives what the pass needs from them (e.g. compiled patterns, whether calibration is needed).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    lossless: ClassVar[bool]
    tolerance: ClassVar[Tolerance] = Tolerance()
    min_opset: ClassVar[int | None] = None
    needs_calibration: ClassVar[bool] = False
    optional: ClassVar[bool] = False
    Options: ClassVar[type[PassOptions]] = NoOptions

    def __init__(self, options: PassOptions | None = None, **values: Any) -> None:
        if options is not None and (values or not isinstance(options, self.Options)):
            raise TypeError(f"pass {self.name!r} takes a {self.Options.__name__} or keyword values, not both")
        try:
            self.options = options if options is not None else self.Options.build(values)
        except OptionError as exc:
            raise OptionError(f"pass {self.name!r}: {exc}") from None
        self.configure()

    def configure(self) -> None:
        """Derive state from ``self.options``; called once by ``__init__``."""

    def targets_tensorrt(self) -> bool:
        """Whether this pass, as configured, writes a form chosen for TensorRT (int8 activations with zero point 0,
        TensorRT's INT4 layout), so the run lints the result against TensorRT's rules."""
        return False

    def requires(self, model: onnx.ModelProto, context: PassContext) -> None:
        """Raise :class:`PreconditionError` if the model or context cannot be rewritten by this pass."""
        if self.needs_calibration and not context.calibration_data:
            raise PreconditionError(f"pass {self.name!r} needs calibration data (give --calib)")
        if self.min_opset is not None and default_opset(model) < self.min_opset:
            raise PreconditionError(
                f"pass {self.name!r} needs opset >= {self.min_opset}, the model has {default_opset(model)}"
            )

    def calibration_request(self, model: onnx.ModelProto) -> dict[str, Observer]:
        """Observers keyed by the tensor each must watch; called by the manager for passes that need calibration."""
        return {}

    def gradient_request(self, model: onnx.ModelProto) -> GradientRequest | None:
        """Loss gradients the pass needs besides activations (None: none); the manager collects them with
        :func:`onnxsmith.calibration.gradients.collect_gradients` over the same calibration feeds."""
        return None

    @abstractmethod
    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        """Rewrite ``model`` (in place or as a new object) and say what changed."""

    def __repr__(self) -> str:
        changed = [f"{spec.name}={getattr(self.options, spec.name)!r}" for spec in self.Options.specs()
                   if getattr(self.options, spec.name) != spec.default]
        return f"<pass {' '.join([self.name, *changed])}>"


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset version for the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1
