"""The Python entry point: ``onnxsmith.optimize`` takes a model file, a zoo spec, an ``onnx.ModelProto`` or a
``torch.nn.Module`` and returns the optimized ``ModelProto`` with its report.

It runs the CLI's job (:func:`onnxsmith.optimizer.pipeline.optimize_file`) without global state: in-memory models
(ModelProtos, torch exports) are written to a private temporary folder that is removed before the call returns, the
caller's ModelProto is never modified, and a file is written only where ``output`` says (atomically).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsmith.core.errors import UserError, first_line
from onnxsmith.core.model_io import load_model, save_model, saved_to_temporary_file
from onnxsmith.optimizer.pipeline import OptimizeResult, optimize_file
from onnxsmith.optimizer.recipes import DEFAULT_RECIPE, load_recipe

log = logging.getLogger(__name__)

__all__ = ["OptimizeOutput", "OptimizeReport", "export_and_optimize", "optimize"]


@dataclass
class OptimizeReport(OptimizeResult):
    """The run's :class:`OptimizeResult` plus the exporter used for a torch module.

    ``input_path`` is ``None`` for in-memory models and ``output_path`` is ``None`` unless ``output`` was given
    (the temporary files they named are gone when :func:`optimize` returns).
    """

    exporter: str | None = None
    """``"dynamo"`` or ``"torchscript"`` for a torch module, ``None`` otherwise."""
    optimized_model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    """The optimized model, for report figures read from the output file when none was written."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready report (:func:`onnxsmith.optimizer.report.report_data`) plus ``exporter``; ``input`` and
        ``output`` are ``None`` where no file remains."""
        from onnxsmith.optimizer.report import report_data

        if self.output_path is None and self.optimized_model is not None:
            with saved_to_temporary_file(self.optimized_model) as path:  # report_data may read the output file
                data = report_data(replace(self, output_path=path))
        else:
            data = report_data(self)
        data["input"] = None if self.input_path is None else str(self.input_path)
        data["output"] = None if self.output_path is None else str(self.output_path)
        data["exporter"] = self.exporter
        return data


@dataclass
class OptimizeOutput:
    """What :func:`optimize` returns: the optimized model (in memory, external data loaded), the report, and the
    file it was written to (``None`` without ``output``)."""

    model: onnx.ModelProto
    report: OptimizeReport
    path: Path | None


def optimize(
    model: Any,
    recipe: str = DEFAULT_RECIPE,
    calibration: Any = None,
    *,
    output: str | os.PathLike[str] | None = None,
    pass_options: dict[str, Any] | None = None,
    example_inputs: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset_version: int | None = None,
    evaluate: bool | None = None,
    verify: bool = True,
    progress: bool = False,
) -> OptimizeOutput:
    """Optimize ``model`` with ``recipe`` and return the optimized ModelProto, the report and the written path.

    ``model`` is a model file path, ``"zoo:NAME"``, an ``onnx.ModelProto`` (left unchanged) or a
    ``torch.nn.Module`` with ``example_inputs`` (a tensor or a tuple of tensors), exported with
    ``torch.onnx.export`` (the dynamo exporter, else the TorchScript one; ``input_names``, ``output_names``,
    ``dynamic_axes``, ``dynamic_shapes`` and ``opset_version`` go to the exporter).

    ``calibration`` is anything :func:`onnxsmith.calibration.readers.load_calibration` reads (an ``.npz`` file, a
    folder, an iterable of feed dicts; torch tensors in feeds are converted). Its first feeds double as the
    verification probes. For a torch module without ``calibration`` the example inputs are the one feed (a warning
    says so when the recipe calibrates); for files and ModelProtos the CLI's rules apply (zoo data, else random
    inputs with a loud warning). ``evaluate`` defaults to on for zoo models, off otherwise. ``output`` is written
    atomically; without it nothing is written. ``pass_options`` holds global aliases by name
    (``{"act_dtype": "int8", "nm": (2, 4)}``, :mod:`onnxsmith.optimizer.aliases`) and per-pass tables of declared
    options (``{"int8-qdq": {"percentile": 99.99}}``); see :meth:`onnxsmith.optimizer.recipes.Recipe.overrides`.
    Bad input raises :class:`onnxsmith.core.errors.UserError`.
    """
    recipe_obj = load_recipe(recipe)  # an unknown recipe fails before any export
    torch_module = _is_torch_module(model)
    export_args = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                       dynamic_shapes=dynamic_shapes, opset_version=opset_version)
    if not torch_module:
        if example_inputs is not None:
            raise UserError("example_inputs apply to torch modules only; this model is a "
                            f"{type(model).__name__}")
        given = sorted(k for k, v in export_args.items() if v is not None)
        if given:
            raise UserError(f"{', '.join(given)} apply to torch modules only; this model is a {type(model).__name__}")
    output_path = Path(output) if output is not None else None
    if output_path is not None and not output_path.parent.exists():  # before a torch export, not after the run
        raise UserError(f"output folder does not exist: {output_path.parent}")
    calib = _calibration_source(calibration)
    with tempfile.TemporaryDirectory(prefix="onnxsmith-api-") as folder:
        work = Path(folder)
        exporter = None
        input_path: Path | None
        if torch_module:
            spec = str(work / "model.onnx")
            input_path = None
            inputs = _example_tuple(model, example_inputs)
            exporter = _export(model, inputs, Path(spec), work, **export_args)
            if calib is None:
                calib = _example_calibration(inputs, Path(spec), recipe_obj, pass_options)
            source = f"<torch module {type(model).__name__}>"
        elif isinstance(model, onnx.ModelProto):
            spec = str(work / "model.onnx")
            input_path = None
            save_model(model, spec)  # large models are copied before their external data is written
            source = "<onnx.ModelProto>"
        elif isinstance(model, (str, os.PathLike)):
            spec = os.fspath(model)
            if not isinstance(spec, str):
                raise UserError(f"expected a text path, got bytes: {spec!r}")
            source = spec
            input_path = None
        else:
            raise UserError(f"cannot optimize a {type(model).__name__}: expected a model file path, 'zoo:NAME', "
                            "an onnx.ModelProto or a torch.nn.Module")
        target = output_path if output_path is not None else work / "model.opt.onnx"
        result = optimize_file(spec, target, recipe=recipe, calib=calib, pass_options=pass_options, verify=verify,
                               evaluate_model=evaluate, progress=progress)
        if source == spec:  # a file or the zoo's cached export: the path stays valid
            input_path = result.input_path
        optimized = load_model(target)  # external data read into memory before the folder goes away
        report = OptimizeReport(**{f.name: getattr(result, f.name) for f in fields(OptimizeResult)},
                                exporter=exporter, optimized_model=optimized)
        report.source = source
        report.input_path = input_path  # None for in-memory models: their temporary file is gone on return
        report.output_path = output_path
    return OptimizeOutput(optimized, report, output_path)


def export_and_optimize(
    torch_module: Any,
    example_inputs: Any,
    recipe: str = DEFAULT_RECIPE,
    calibration: Any = None,
    **kwargs: Any,
) -> OptimizeOutput:
    """Export a ``torch.nn.Module`` to ONNX and optimize it: :func:`optimize` for export pipelines."""
    if not _is_torch_module(torch_module):
        raise UserError(f"export_and_optimize needs a torch.nn.Module, got a {type(torch_module).__name__}")
    return optimize(torch_module, recipe, calibration, example_inputs=example_inputs, **kwargs)


def _is_torch_module(model: Any) -> bool:
    """True for a ``torch.nn.Module`` (torch is not imported: a module instance means it already is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _example_tuple(module: Any, example_inputs: Any) -> tuple[Any, ...]:
    import torch

    name = type(module).__name__
    if example_inputs is None:
        raise UserError(f"a torch module ({name}) needs example_inputs (a tensor or a tuple of tensors) to be exported")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        kinds = ", ".join(type(t).__name__ for t in inputs) or "nothing"
        raise UserError(f"example_inputs for {name} must be a tensor or a tuple of tensors, got {kinds}")
    return inputs


def _export(module: Any, inputs: tuple[Any, ...], path: Path, work: Path, *, input_names: Any, output_names: Any,
            dynamic_axes: Any, dynamic_shapes: Any, opset_version: int | None) -> str:
    """Export with the dynamo exporter, else (it raised) the TorchScript one; returns which one wrote ``path``."""
    import torch

    common: dict[str, Any] = {"input_names": input_names, "output_names": output_names, "verbose": False}
    if opset_version is not None:
        common["opset_version"] = opset_version
    dynamo_options: dict[str, Any] = {"artifacts_dir": str(work)}
    if dynamic_shapes is not None:
        dynamo_options["dynamic_shapes"] = dynamic_shapes
    elif dynamic_axes is not None:
        dynamo_options["dynamic_axes"] = dynamic_axes  # torch translates them for the dynamo exporter
    try:
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(path), dynamo=True, **common, **dynamo_options)
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure: try the TorchScript exporter
        dynamo_error = first_line(exc)
        log.info("dynamo exporter failed (%s); falling back to the TorchScript exporter", dynamo_error)
    for leftover in work.iterdir():  # a partial dynamo output must not mix with the TorchScript one
        if leftover.is_file():
            leftover.unlink()
    axes = dynamic_axes if dynamic_axes is not None else _axes_from_shapes(dynamic_shapes)
    try:
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(path), dynamo=False, dynamic_axes=axes, **common)
    except Exception as exc:  # noqa: BLE001 - both exporters failed: one line naming both causes
        raise UserError(f"cannot export {type(module).__name__} to ONNX: dynamo exporter: {dynamo_error}; "
                        f"TorchScript exporter: {first_line(exc)}") from exc
    return "torchscript"


def _axes_from_shapes(dynamic_shapes: Any) -> dict[str, dict[int, str]] | None:
    """``{input: {axis: Dim}}`` dynamic shapes as TorchScript ``dynamic_axes`` (other forms: none)."""
    if not isinstance(dynamic_shapes, Mapping):
        return None
    axes = {}
    for name, dims in dynamic_shapes.items():
        if isinstance(dims, Mapping):
            axes[name] = {int(axis): str(getattr(dim, "__name__", f"{name}_{axis}")) for axis, dim in dims.items()}
    return axes or None


def _example_calibration(inputs: tuple[Any, ...], path: Path, recipe_obj: Any,
                         pass_options: dict[str, Any] | None) -> list[dict[str, np.ndarray]] | None:
    """The example inputs as the one calibration feed (and verification probe) of the exported model, or ``None``
    (the pipeline's defaults) when they do not match its inputs."""
    from onnxsmith.calibration.readers import validate_feed
    from onnxsmith.core.feeds import input_specs

    specs = input_specs(onnx.load(str(path), load_external_data=False))
    arrays = [t.detach().cpu().numpy() for t in inputs]
    if len(arrays) != len(specs):
        log.warning("example inputs (%d) do not map onto the exported model's inputs %s; not using them as "
                    "calibration data", len(arrays), sorted(specs))
        return None
    feed = dict(zip(specs, arrays))
    try:
        validate_feed(feed, specs, "example inputs")
    except UserError as exc:
        log.warning("not using the example inputs as calibration data: %s", exc)
        return None
    if any(p.needs_calibration for p in recipe_obj.build(pass_options)):
        log.warning("calibrating on the example inputs only (one feed): ranges from one feed are thin; pass "
                    "calibration= with representative feeds")
    return [feed]


def _calibration_source(calibration: Any) -> Any:
    """``calibration`` as :func:`load_calibration` takes it: paths as given, feed dicts with torch tensors turned
    into numpy arrays; anything else is a :class:`UserError`."""
    if calibration is None or isinstance(calibration, (str, os.PathLike)):
        return calibration
    if isinstance(calibration, Mapping) or not isinstance(calibration, Iterable):
        raise UserError(f"calibration must be a path or an iterable of feed dicts (input name -> array), got a "
                        f"{type(calibration).__name__}")
    feeds = []
    for index, feed in enumerate(calibration):
        if not isinstance(feed, Mapping):
            raise UserError(f"calibration feed {index} is a {type(feed).__name__}, "
                            "expected a dict of input name -> array")
        feeds.append({name: _to_numpy(value) for name, value in feed.items()})
    return feeds


def _to_numpy(value: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value
