"""The main job: load a model (file or zoo), run a recipe through the pass manager, save, evaluate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxsmith.analysis.trt_lint import Finding, lint_model
from onnxsmith.calibration.learning import TASK_KEY, model_task
from onnxsmith.calibration.readers import CalibrationSource, load_calibration, random_calibration
from onnxsmith.core.errors import UserError
from onnxsmith.models.base import ZooModel
from onnxsmith.core.feeds import Feed
from onnxsmith.models.zoo import get_zoo_model, zoo_model_path
from onnxsmith.optimizer.evaluation import Evaluation, evaluate
from onnxsmith.optimizer.manager import PassManager, PassRecord, plan_passes
from onnxsmith.core.model_io import load_model, save_model
from onnxsmith.core.pass_base import Pass, PassContext
from onnxsmith.optimizer.recipes import DEFAULT_RECIPE, Recipe, load_recipe
from onnxsmith.core.feeds import generated_probe_feeds

ZOO_PREFIX = "zoo:"
PROBE_FEEDS = 2
"""How many calibration feeds double as verification probes."""


@dataclass(frozen=True)
class ModelSource:
    """Where the input model comes from: a file, or a zoo model exported into the cache."""

    spec: str
    zoo: ZooModel | None

    def path(self) -> Path:
        """The ONNX file to read (exports zoo models into the cache on first use)."""
        if self.zoo is not None:
            return zoo_model_path(self.zoo.name)
        return Path(self.spec)


@dataclass
class OptimizeResult:
    """What one optimization run produced."""

    source: str
    input_path: Path
    output_path: Path
    recipe: Recipe
    records: list[PassRecord]
    unverified_reason: str | None
    evaluation: Evaluation | None
    seconds: float
    trt_lint: list[Finding] | None = None
    """TensorRT-readiness findings on the output, when the recipe targets TensorRT (see :func:`targets_tensorrt`)."""
    evaluation_seconds: float = 0.0

    def timings(self) -> dict[str, float]:
        """Seconds spent calibrating, in the passes' rewrites, evaluating, in the rest (loading, verifying the
        lossless passes, saving) and in all."""
        calibration = sum(r.calibration_seconds for r in self.records)
        passes = sum(r.seconds for r in self.records)
        return {"calibration": calibration, "passes": passes, "evaluation": self.evaluation_seconds,
                "load, verify, save": max(self.seconds - calibration - passes - self.evaluation_seconds, 0.0),
                "total": self.seconds}


def resolve_source(spec: str) -> ModelSource:
    """A ``zoo:NAME`` spec or a model file path."""
    if spec.startswith(ZOO_PREFIX):
        return ModelSource(spec, get_zoo_model(spec.removeprefix(ZOO_PREFIX)))
    return ModelSource(spec, None)


def default_output_path(source: ModelSource) -> Path:
    """``IN.opt.onnx`` beside a file input; ``./NAME.opt.onnx`` for a zoo model."""
    if source.zoo is not None:
        return Path.cwd() / f"{source.zoo.name}.opt.onnx"
    path = Path(source.spec)
    stem = path.name.removesuffix(".onnx")
    return path.with_name(f"{stem}.opt.onnx")


def plan(spec: str, recipe: str = DEFAULT_RECIPE, pass_options: dict[str, Any] | None = None) -> list[Pass]:
    """The passes a run would execute on this model, opset upgrades included (nothing is written)."""
    model = load_model(resolve_source(spec).path())
    return plan_passes(model, load_recipe(recipe).build(pass_options))


def optimize_file(
    spec: str,
    output: str | os.PathLike[str] | None = None,
    *,
    recipe: str = DEFAULT_RECIPE,
    calib: CalibrationSource | None = None,
    pass_options: dict[str, Any] | None = None,
    verify: bool = True,
    evaluate_model: bool | None = None,
    on_record: Callable[[PassRecord], None] | None = None,
    progress: bool = True,
) -> OptimizeResult:
    """Optimize the model named by ``spec`` with ``recipe`` and write it atomically to ``output``.

    The input file is never written. Calibration data (and the verification probes, its first feeds) come from
    ``calib`` (see :func:`load_calibration`) or the zoo's calibration set; without either, probes are generated
    and a recipe that needs calibration falls back to random inputs with a loud warning. ``pass_options``
    override pass arguments of the recipe (e.g. ``{"calibrator": "entropy"}``). ``evaluate_model`` defaults to
    on for zoo models (their evaluation set and metric) and off for files; for files it evaluates on the probes.
    """
    start = time.perf_counter()
    source = resolve_source(spec)
    recipe_obj = load_recipe(recipe)
    input_path = source.path()
    output_path = Path(output) if output is not None else default_output_path(source)
    _refuse_overwriting_input(input_path, output_path)
    if not output_path.parent.exists():  # checked again when saving; here so a long run does not end in this error
        raise UserError(f"output folder does not exist: {output_path.parent}")
    model = load_model(input_path)
    if source.zoo is not None:
        _set_task(model, source.zoo.task)
    passes = recipe_obj.build(pass_options)
    calibration = None
    if calib is not None:
        calibration = load_calibration(calib, model)
    elif source.zoo is not None:
        calibration = source.zoo.calibration_feeds()
    elif any(p.needs_calibration for p in passes):
        calibration = random_calibration(model)
    probes = calibration[:PROBE_FEEDS] if calibration is not None else None
    wants_evaluation = evaluate_model if evaluate_model is not None else source.zoo is not None
    file_eval_feeds = None
    if wants_evaluation and source.zoo is None:
        file_eval_feeds = probes if probes is not None else generated_probe_feeds(model)
    manager = PassManager(passes, probe_feeds=probes, verify=verify, on_record=on_record)
    result = manager.run(model, PassContext(calibration_data=calibration, progress=progress))
    save_model(result.model, output_path)
    trt_lint = lint_model(result.model) if targets_tensorrt(passes) else None
    evaluation = None
    evaluation_start = time.perf_counter()
    if source.zoo is not None and wants_evaluation:
        evaluation = evaluate(input_path, output_path, source.zoo.evaluation_feeds(), source.zoo, progress=progress)
    elif file_eval_feeds is not None:
        evaluation = evaluate(input_path, output_path, file_eval_feeds, progress=progress)
    evaluation_seconds = time.perf_counter() - evaluation_start if evaluation is not None else 0.0
    return OptimizeResult(spec, input_path, output_path, recipe_obj, result.records, result.unverified_reason,
                          evaluation, time.perf_counter() - start, trt_lint, evaluation_seconds)


def engine_feeds(result: OptimizeResult, calib: CalibrationSource | None) -> list[Feed]:
    """The feeds whose shapes make a TensorRT optimization profile: the run's calibration data (``calib``, the
    zoo's set), else probes generated within the model's input specs."""
    model = load_model(result.output_path)
    if calib is not None:
        return load_calibration(calib, model)
    source = resolve_source(result.source)
    if source.zoo is not None:
        return source.zoo.calibration_feeds()
    return generated_probe_feeds(model)


def targets_tensorrt(passes: list[Pass]) -> bool:
    """Whether a pass list writes TensorRT's forms (see :meth:`Pass.targets_tensorrt`)."""
    return any(p.targets_tensorrt() for p in passes)


def _set_task(model: onnx.ModelProto, task: str) -> None:
    """Record a zoo model's task in its ``onnxsmith.task`` metadata unless the model already names one."""
    if model_task(model) is None:
        model.metadata_props.add(key=TASK_KEY, value=task)


def _refuse_overwriting_input(input_path: Path, output_path: Path) -> None:
    same = output_path.resolve() == input_path.resolve()
    if not same and output_path.exists():
        same = os.path.samefile(output_path, input_path)
    if same:
        raise UserError(f"refusing to overwrite the input model {input_path}; choose another output with -o")
