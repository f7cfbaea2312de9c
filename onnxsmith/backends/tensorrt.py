"""TensorRT 10 engines from optimized ONNX models: build plan, optimization profile, build, layer summary, latency.

Everything decidable without TensorRT is a pure function (:func:`precision_plan`, :func:`optimization_profile`,
:func:`summarize_layers`); ``tensorrt`` is imported only inside :func:`require_tensorrt`.

Precision rule (:func:`precision_plan`): a model holding Q/DQ nodes is built as a STRONGLY_TYPED network with no
precision flags ("Use explicit quantization with Strong Typing. Precision-control build flags are not required
and should not be specified"), so layers outside Q/DQ run in the ONNX tensors' own types (FP16 only where the
model stores FP16). A float model gets the FP16 builder flag (weakly typed, FP32 fallback) unless ``fp16=False``.
A Conv/MatMul/Gemm constant weight that is 2:4 sparse along its input-channel axis adds SPARSE_WEIGHTS to either.

TensorRT references used (API names checked against them):
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  (``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))``, Builder)
- https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
- https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html
  (symmetric signed INT8, INT4 weight-only)
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html (IBuilderConfig:
  set_flag, set_memory_pool_limit, add_optimization_profile, create_timing_cache, set_timing_cache;
  Builder.build_serialized_network / create_builder_config / create_optimization_profile)
- https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/BuilderConfig.html (ProfilingVerbosity)
- https://docs.rs/trtx-sys/0.5.0/trtx_sys/nvinfer1/enum.BuilderFlag.html (BuilderFlag list incl. SPARSE_WEIGHTS)
- https://docs.nvidia.com/deeplearning/tensorrt/11.1.0/inference-library/data-formats-tensors.html and
  https://developer.nvidia.com/blog/accelerating-inference-with-sparsity-using-ampere-and-tensorrt (2:4 sparsity)
- https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/api/python_api/parsers/Onnx/pyOnnx.html
  (OnnxParser.parse_from_file, num_errors, get_error)
- https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/engine-tools.html and
  https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/EngineInspector.html
  (create_engine_inspector, get_engine_information(LayerInformationFormat.JSON))
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_execution_context.html
  (setInputShape / setTensorAddress / enqueueV3 = set_input_shape / set_tensor_address / execute_async_v3)
- Inspector JSON fields (Layers, Name, LayerType, Inputs[].Format/Datatype, Weights.Type, TacticName,
  HasSparseWeights): NVIDIA/TensorRT tools/experimental/trt-engine-explorer/trex/{parser,layer,activations}.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnxsmith.analysis.trt_lint import lint_model
from onnxsmith.core.feeds import InputSpec, input_specs
from onnxsmith.analysis.sparsity import inspect_sparsity
from onnxsmith.core.errors import PassError, UserError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Precision:
    """How to build a model: what it holds and the TensorRT flag names that follow (see the module docstring)."""

    qdq: bool
    int8: bool
    int4_weights: bool
    fp16_tensors: bool
    sparse_layers: tuple[str, ...]
    builder_flags: tuple[str, ...]
    network_flags: tuple[str, ...]
    problems: tuple[str, ...] = ()
    """The TensorRT lint's error findings: what the parser or builder will reject."""


def precision_plan(model: onnx.ModelProto, *, fp16: bool = True) -> Precision:
    """Read precision and 2:4 sparsity off ``model`` (weights loaded) and choose the builder/network flags.

    2:4 layers are those :func:`~onnxsmith.optimizer.inspect_sparsity.inspect_sparsity` finds 2:4 on their input
    axis; ``problems`` are the error findings of :func:`~onnxsmith.analysis.trt_lint.lint_model`.
    """
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producers = {out: node for node in graph.node for out in node.output}
    qdq_nodes = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    qtypes = Counter(_quantized_type(node, types, producers) for node in qdq_nodes)
    int4 = any(node.op_type == "DequantizeLinear" and types.get(node.input[0]) in (TensorProto.INT4, TensorProto.UINT4)
               for node in qdq_nodes)
    sparse = tuple(row.node for row in inspect_sparsity(model, [(2, 4)]) if row.pattern == "2:4")
    problems = tuple(f.line() for f in lint_model(model) if f.severity == "error")
    builder_flags = ([] if qtypes or not fp16 else ["FP16"]) + (["SPARSE_WEIGHTS"] if sparse else [])
    return Precision(
        qdq=bool(qtypes), int8=TensorProto.INT8 in qtypes, int4_weights=int4,
        fp16_tensors=TensorProto.FLOAT16 in types.values(), sparse_layers=sparse, builder_flags=tuple(builder_flags),
        network_flags=("STRONGLY_TYPED",) if qtypes else (), problems=problems,
    )


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _quantized_type(node: onnx.NodeProto, types: Mapping[str, int], producers: Mapping[str, onnx.NodeProto]) -> int:
    """Element type of a Q node's output / DQ node's input: the zero point's type, else the declared one."""
    if zero_point := types.get(_input(node, 2)):
        return zero_point
    if node.op_type == "DequantizeLinear":
        if known := types.get(node.input[0]):
            return known
        producer = producers.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return _quantized_type(producer, types, producers)
        return TensorProto.UINT8
    attrs = {a.name: a.i for a in node.attribute}
    return attrs.get("output_dtype") or TensorProto.UINT8  # ONNX default without a zero point


def optimization_profile(
    specs: Mapping[str, InputSpec], feed_shapes: Iterable[Mapping[str, object]]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per dynamic input from the calibration feeds' shapes (arrays or shape tuples).

    min/max are elementwise over the feeds (zero-length dims stay legal: an empty KV-cache past gives min 0);
    fixed dims must match. opt is one whole feed, so the inputs' shapes agree with each other: the most common
    combination, else the largest feed. Raises ValueError naming an input that is dynamic but absent from the feeds.
    """
    feeds = [{name: tuple(int(d) for d in getattr(value, "shape", value)) for name, value in feed.items()}
             for feed in feed_shapes]
    dynamic = [name for name, spec in specs.items() if spec.shape is None or any(d in (None, 0) for d in spec.shape)]
    profile: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in dynamic:
        spec, seen = specs[name].shape, [feed[name] for feed in feeds if name in feed]
        if not seen:
            raise ValueError(f"input {name!r} has dynamic shape {_show(spec)} and no calibration feed gives its size")
        rank = len(spec) if spec is not None else len(seen[0])
        for shape in seen:
            if len(shape) != rank or any(d not in (None, 0) and d != s for d, s in zip(spec or shape, shape)):
                raise ValueError(f"input {name!r}: feed shape {shape} does not fit the model's {_show(spec)}")
        low, high = tuple(np.min(seen, axis=0).tolist()), tuple(np.max(seen, axis=0).tolist())
        profile[name] = (low, high, high)
    complete = [tuple(feed[name] for name in dynamic) for feed in feeds if all(name in feed for name in dynamic)]
    if complete:
        best, count = Counter(complete).most_common(1)[0]
        if count == 1:
            best = max(complete, key=lambda shapes: sum(int(np.prod(s)) for s in shapes))
        for name, shape in zip(dynamic, best):
            profile[name] = (profile[name][0], shape, profile[name][2])
    return profile


def _show(shape: tuple[int | None, ...] | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join("?" if d in (None, 0) else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class LayerSummary:
    """What the engine inspector says about the built layers (names per category)."""

    layers: int
    sparse_weights: tuple[str, ...] = ()
    """Layers whose weights TensorRT found sparse (``HasSparseWeights``)."""
    sparse_tactics: tuple[str, ...] = ()
    """Layers running a sparse kernel (tactic name contains 'sparse')."""
    int8: tuple[str, ...] = ()
    int4: tuple[str, ...] = ()
    fp16: tuple[str, ...] = ()
    detailed: bool = True

    def counts(self) -> dict[str, int]:
        return {"layers": self.layers, **{key: len(getattr(self, key)) for key in _CATEGORIES}}

    def line(self) -> str:
        c = self.counts()
        return (f"{c['layers']} layers: {c['int8']} INT8, {c['int4']} INT4-weight, {c['fp16']} FP16; "
                f"{c['sparse_weights']} with sparse weights, {c['sparse_tactics']} on sparse kernels")


_CATEGORIES = ("sparse_weights", "sparse_tactics", "int8", "int4", "fp16")
_INT8, _INT4, _FP16 = (re.compile(p, re.IGNORECASE) for p in (r"\bint8\b", r"\bint4\b", r"\b(fp16|half)\b"))


def summarize_layers(info: Mapping[str, object]) -> LayerSummary:
    """Parse ``get_engine_information(LayerInformationFormat.JSON)`` (as a dict) into a :class:`LayerSummary`.

    Layers given by name only (engine built without DETAILED verbosity) count as layers; signal/wait
    (auxiliary-stream sync) entries do not. A layer is INT8/FP16 by its inputs' Format/Datatype, INT4 by its
    inputs' or weights' type.
    """
    layers = info.get("Layers") if isinstance(info, Mapping) else None
    if not isinstance(layers, list):
        raise ValueError("engine information has no 'Layers' list")
    found: dict[str, list[str]] = {key: [] for key in _CATEGORIES}
    count = 0
    for index, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            count += 1
            continue
        if str(layer.get("LayerType", "")).lower() in ("signal", "wait"):
            continue
        count += 1
        name = str(layer.get("Name", f"layer {index}"))
        formats = [str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, Mapping)]
        weights = layer.get("Weights")
        weight_type = str(weights.get("Type", "")) if isinstance(weights, Mapping) else ""
        checks = {
            "sparse_weights": str(layer.get("HasSparseWeights", 0)) not in ("0", "", "False"),
            "sparse_tactics": "sparse" in str(layer.get("TacticName", "")).lower(),
            "int8": any(_INT8.search(f) for f in formats),
            "int4": any(_INT4.search(f) for f in [*formats, weight_type]),
            "fp16": any(_FP16.search(f) for f in formats),
        }
        for key, hit in checks.items():
            if hit:
                found[key].append(name)
    detailed = any(isinstance(layer, Mapping) for layer in layers) or not layers
    return LayerSummary(count, **{key: tuple(names) for key, names in found.items()}, detailed=detailed)


NOT_HERE = ("engines need an NVIDIA GPU and TensorRT 10 (pip install tensorrt); run without --engine to write "
            "the ONNX model and build it there")


def require_tensorrt():
    """The ``tensorrt`` module (10 or newer) when it imports and a CUDA GPU is visible; else a one-line UserError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"TensorRT is not installed here; {NOT_HERE}") from None
    if int(str(getattr(trt, "__version__", "0")).split(".")[0]) < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old (need 10 or newer); {NOT_HERE}")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU is visible here; {NOT_HERE}")
    return trt


@dataclass
class EngineReport:
    """What :func:`build_engine` did."""

    engine_path: Path
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    profile: dict[str, tuple[Shape, Shape, Shape]]
    seconds: float
    layers: LayerSummary
    parser_errors: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    sparse_layers: tuple[str, ...] = ()


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str],
                 feed_shapes: Iterable[Mapping[str, object]], *, timing_cache: Path | None = None,
                 workspace_mib: int = 4096, fp16: bool = True) -> EngineReport:
    """Parse ``onnx_path`` (external data beside it), build with the :func:`precision_plan` flags and the
    :func:`optimization_profile` of ``feed_shapes``, write the plan atomically to ``engine_path``, load/save
    ``timing_cache``, and summarize the layers. Parse failures are a UserError, build failures a PassError."""
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = onnx.load(str(onnx_path))
    plan = precision_plan(model, fp16=fp16)
    try:
        shapes = optimization_profile(input_specs(model), feed_shapes)
    except ValueError as exc:
        raise UserError(f"{onnx_path.name}: {exc}") from None
    del model
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = tuple(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
    if not parsed:
        hint = f" (likely cause: {'; '.join(plan.problems)})" if plan.problems else ""
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:3]) or 'unknown error'}{hint}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise PassError(f"TensorRT could not build {onnx_path.name}: {'; '.join(logger.errors[-3:]) or 'see its log'}")
    _write_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)  # outlives the engine
    engine = runtime.deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return EngineReport(engine_path, plan.network_flags, plan.builder_flags, shapes, seconds, summarize_layers(info),
                        errors, plan.problems, plan.sparse_layers)


def _logger(trt):
    """A TensorRT logger that keeps error messages (for the failure message) and forwards the rest to logging."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # must not raise
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(msg)
            elif severity == trt.Logger.WARNING:
                log.info("TensorRT: %s", msg)

    return Logger()


def _parser_error(error) -> str:
    node = getattr(error, "node_name", lambda: "")()
    return f"{node}: {error.desc()}" if node else str(error.desc())


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def measure_latency(engine_path: str | os.PathLike[str], feed: Mapping[str, np.ndarray], runs: int = 50,
                    warmup: int = 10) -> dict[str, float]:
    """Median and p90 GPU time (ms, CUDA events) of ``execute_async_v3`` on one feed, buffers as torch tensors."""
    trt = require_tensorrt()
    import torch

    runtime = trt.Runtime(_logger(trt))  # outlives the engine
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    buffers = {}
    for name, array in feed.items():
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        buffers[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).cuda()
        context.set_input_shape(name, tuple(array.shape))
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output {name!r} has a data-dependent shape {shape}; latency needs static outputs")
            dtype = torch.from_numpy(np.empty(0, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))).dtype
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
    for name, tensor in list(buffers.items()):
        if not tensor.numel():  # an empty tensor (e.g. a prefill's past) still needs a valid address
            buffers[name] = tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
        context.set_tensor_address(name, tensor.data_ptr())
    stream, times = torch.cuda.Stream(), []
    torch.cuda.synchronize()  # the input copies ran on the default stream
    for index in range(warmup + runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        if not context.execute_async_v3(stream.cuda_stream):
            raise PassError(f"TensorRT could not run {Path(engine_path).name}")
        end.record(stream)
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": float(runs)}
