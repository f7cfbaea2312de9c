"""GPU GEMM proxy: onnxsmith's weights at the models' real GEMM shapes, dense FP16 vs 2:4 sparse vs INT4 weight-only.

Usage: ``python benchmarks/gpu_gemm.py [--models smollm2,minilm] [--recipes sparse24,int4-wo] [--onnx PATH ...]
[--groups PATH ...] [--save-groups PATH] [--tokens 1,16,128,2048] [--runs N] [--reps N] [--warmup N] [--calib N]
[--set RECIPE:KEY=VALUE,...] [--tolerance X] [--device auto|cuda|cpu] [--dry-run] [--out PATH] [--quick]``
(``--quick``: MiniLM with ``sparse24`` only, 1 calibration feed, M = 1 and 16, 5 samples of 2 calls)

A stand-in until a TensorRT machine exists: instead of building engines, the GEMMs of the files onnxsmith writes
are timed one by one with torch on the GPU, at the models' own shapes and with their own weight values.

Sources (one table each): every ``--models`` zoo model (default ``smollm2``: SmolLM2-135M, the real LLM) optimized
with every ``--recipes`` recipe (default ``sparse24`` and ``int4-wo``) by ``optimize_file`` into a temporary folder
(``verify=False``, ``evaluate_model=False``, calibration ``calibration_feeds(--calib)``, default 4, pass options
from ``--set``), and/or every ``--onnx`` file as it is, and/or every source of a ``--groups`` file (without
``--models`` given, ``--onnx`` / ``--groups`` alone skip the zoo). ``--save-groups PATH`` writes the timed weight of
every group of every source to one ``.npz`` (a few MB for SmolLM2): the GPU machines reach no network and carry at
most 64 MiB, so prepare with ``--dry-run --save-groups`` on a CPU machine and time with ``--groups`` on the GPU
(correctness is then checked on that one weight per group).

Extraction (:func:`gemm_weights`, numpy/onnx, no GPU): every ``MatMul``, ``Gemm``, 1x1 ``Conv`` (group 1;
the ``sparse-gemm-to-conv`` form) and ``com.microsoft.MatMulNBits`` whose weight is a constant, read directly, or
behind ``DequantizeLinear`` (per-tensor, per-channel or blocked, any integer type incl. packed INT4/UINT4, zero
point subtracted), ``Transpose`` (tied LM heads), no-op ``Reshape`` (onnxsmith's fusion guard), ``Identity`` or
``Cast``. Each gives a :class:`GemmWeight`: ``K`` (reduction), ``N`` (outputs), the float weight as ``[N, K]``
(torch's Linear layout; dequantized, Gemm's ``alpha`` folded in), whether it is 2:4 along K, and for 4-bit blocked
weights the integer levels ``[N, K]`` (``q - zero_point``) and the block steps ``[N, K / block]``. GEMMs whose
second input is an activation (attention's ``Q @ K^T``, ``P @ V``) are counted, not timed. Weights of one
``(K, N)`` shape and the same kind (2:4 or not, INT4 block) form one group, timed once with its first weight; the
count weights the totals.

Timing (``--device cuda``, the default when ``torch.cuda.is_available()``): for each group and each token count
``M`` of ``--tokens`` (default 1, 16 = decode-like, 128, 2048 = prefill-like), ``x [M, K]`` random:

- dense: ``F.linear(x, W)`` with ``W [N, K]`` float16, ``x`` float16 (the reference of every ratio);
- sparse: ``F.linear(x, to_sparse_semi_structured(W))`` (``torch.sparse``), float16, only for weights that are 2:4
  along K and whose ``[N, K]`` meets the backend's minimum / multiple (read from the torch class:
  cuSPARSELt 16 x 16, CUTLASS 32 x 64 for float16); cuSPARSELt when ``torch.backends.cusparselt.is_available()``
  (``SparseSemiStructuredTensor._FORCE_CUTLASS = False``), else CUTLASS;
- int4: ``torch._weight_int4pack_mm(x_bf16, packed, group, scales_and_zeros)`` (tinygemm, bfloat16 only on CUDA)
  with the file's own INT4 levels and block steps: levels + 8 as unsigned nibbles, two per byte with the even K
  index in the high nibble (``[N, K / 2]`` uint8) through ``torch._convert_weight_to_int4pack(packed, inner_k_tiles)``
  (8, 4 or 2 k-tiles, the largest with ``K % (16 * tiles) == 0``; torch < 2.5 takes int32 ``[N, K]``, tried
  second), ``scales_and_zeros [K / group, N, 2]`` bfloat16 with zero 0 (the kernel computes ``(u - 8) * s + z``);
  only groups 32, 64, 128, 256 and ``N % 8 == 0``, else the row says why.

CUDA events around ``--reps`` back-to-back calls (default 10) per sample, ``--warmup`` calls first (default 10),
the median of ``--runs`` samples (default 50), ``torch.cuda.synchronize`` before timing. Correctness, on the same
inputs, before timing: ``max |y_fast - y_dense| / max |y_dense|`` against the dense GEMM (float16 for sparse;
for int4 the dense bfloat16 GEMM of the dequantized weight), the maximum over every weight of the group; a fast
path above ``--tolerance`` (default 0.02) is marked ``WRONG`` and left out of the totals (a fast wrong kernel is
no evidence). Ratios are time / dense FP16 time (below 1 = faster). Per source the weighted totals per ``M``:
sum over groups of count x ms, the fast path where it ran and was right, dense elsewhere.

``--device cpu`` runs the same pipeline on the CPU (dense and torch's CPU int4 kernel
``_weight_int4pack_mm_for_cpu``; no sparse): a smoke test of this script, not a GPU figure. Without CUDA (and
not ``--device cpu``), or with ``--dry-run``: the shape table only, the line ``no CUDA GPU: shapes only, no
timings``, exit 0; no number is ever made up.

Results: markdown tables on stdout (shapes per source; with timings one row per group and ``M`` and the totals)
and ``--out`` (default ``benchmarks/results/gpu_gemm.json``, rewritten after every source, ``"complete": true`` at
the end) with ``environment()`` plus the GPU name and capability, torch and CUDA versions, cuSPARSELt availability
and version, and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from harness import Benchmark, Report, markdown_table, one_line, optimize_model, torch_median_ms

DEFAULT_MODELS = ("smollm2",)
MODEL_CHOICES = ("smollm2", "minilm")
DEFAULT_RECIPES = ("sparse24", "int4-wo")
DEFAULT_TOKENS = (1, 16, 128, 2048)
DEFAULT_RUNS, DEFAULT_REPS, DEFAULT_WARMUP = 50, 10, 10
DEFAULT_CALIBRATION = 4
DEFAULT_TOLERANCE = 0.02
NO_GPU_LINE = "no CUDA GPU: shapes only, no timings"

INT4PACK_GROUPS = (32, 64, 128, 256)
"""Group sizes ``_weight_int4pack_mm`` (tinygemm) accepts on CUDA."""
INNER_K_TILES = (8, 4, 2)
"""``innerKTiles`` values ``_convert_weight_to_int4pack`` accepts, the widest load first."""
FALLBACK_SPARSE_MIN = {"cuSPARSELt": (16, 16), "CUTLASS": (32, 64)}
"""float16 ``(sparse_min_rows, sparse_min_cols)`` of torch 2.13's semi-structured classes, used only when this torch
has no ``torch.sparse`` semi-structured classes to read them from."""
FOUR_BIT_TYPES = {TensorProto.INT4: True, TensorProto.UINT4: False}
"""ONNX 4-bit element types -> signed."""
GEMM_OPS = ("MatMul", "Gemm", "Conv", "MatMulNBits")


# ----------------------------------------------------------------------------------------------------------------
# Extraction (numpy + onnx, no GPU)


@dataclass(eq=False)
class GemmWeight:
    """One GEMM's constant weight, in torch's Linear layout.

    ``weight`` is float32 ``[N, K]`` (output channels x reduction), dequantized when the file stores it quantized,
    Gemm's ``alpha`` folded in. ``levels`` (int8 ``[N, K]``, ``q - zero_point``) and ``scales`` (float32
    ``[N, K / block]``) are set for 4-bit weights blocked (or per-channel: block = K) along K whose levels fit
    ``-8 .. 7``; then ``weight == levels * repeat(scales, block, axis=1)``.
    """

    name: str
    op: str
    k: int
    n: int
    weight: np.ndarray | None
    """None only for a group loaded from a ``--groups`` file without values (dense timing on random values)."""
    sparse24: bool
    source: str
    """``float``, ``int8 DQ per-channel``, ``INT4 DQ block 64``, ``MatMulNBits block 64``, ..."""
    int4: bool = False
    """The weight is stored with 4-bit levels (INT4/UINT4 ``DequantizeLinear`` or ``MatMulNBits``)."""
    block: int | None = None
    """Block size along K of a blocked weight (``DequantizeLinear`` ``block_size``, ``MatMulNBits``)."""
    levels: np.ndarray | None = None
    scales: np.ndarray | None = None
    path: str = ""
    """How the weight reaches the GEMM, e.g. ``DequantizeLinear -> Transpose``."""
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"{self.k}x{self.n}"

    @property
    def int4_block(self) -> int | None:
        """The group size of the int4 path: the block when levels are available, else None."""
        return None if self.levels is None else self.k // self.scales.shape[1]


@dataclass(eq=False)
class _Tensor:
    """A resolved constant: float values, and for quantized ones the levels, the scale per element, the block."""

    values: np.ndarray
    levels: np.ndarray | None = None
    scale: np.ndarray | None = None
    block: int | None = None
    block_axis: int | None = None
    per_axis: int | None = None
    four_bit: bool = False
    kind: str = "float"
    path: list[str] = field(default_factory=list)

    def transposed(self, perm: Sequence[int]) -> _Tensor:
        def move(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else np.transpose(array, perm)

        return _Tensor(move(self.values), move(self.levels), move(self.scale), self.block,
                       None if self.block_axis is None else list(perm).index(self.block_axis),
                       None if self.per_axis is None else list(perm).index(self.per_axis),
                       self.four_bit, self.kind, [*self.path, "Transpose"])

    def moved(self, step: str) -> _Tensor:
        return _Tensor(self.values, self.levels, self.scale, self.block, self.block_axis, self.per_axis,
                       self.four_bit, self.kind, [*self.path, step])


class _Graph:
    """Constants and producers of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.inputs = {i.name for i in model.graph.input} - set(self.initializers)

    def constant(self, name: str) -> np.ndarray | None:
        """The array of initializer / ``Constant`` node ``name`` (4-bit types unpacked to int8), else None."""
        if name in self.initializers:
            return tensor_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return tensor_array(attr.t)
        return None

    def resolve(self, name: str) -> _Tensor | str:
        """The constant reaching tensor ``name`` (through DQ, Transpose, no-op Reshape, Identity, Cast), or why not."""
        array = self.constant(name)
        if array is not None:
            if not np.issubdtype(array.dtype, np.floating):
                return f"integer constant ({array.dtype}) read directly"
            return _Tensor(array.astype(np.float32), path=["constant"])
        if name in self.inputs:
            return "graph input"
        node = self.producers.get(name)
        if node is None:
            return "no producer"
        if node.op_type == "DequantizeLinear":
            return self._dequantize(node)
        if node.op_type in ("Identity", "Cast"):
            inner = self.resolve(node.input[0])
            return inner if isinstance(inner, str) else inner.moved(node.op_type)
        if node.op_type == "Transpose":
            inner = self.resolve(node.input[0])
            if isinstance(inner, str):
                return inner
            perm = _attr(node, "perm", list(reversed(range(inner.values.ndim))))
            return inner.transposed(perm)
        if node.op_type == "Reshape":
            inner = self.resolve(node.input[0])
            if isinstance(inner, str):
                return inner
            shape = self.constant(node.input[1]) if len(node.input) > 1 else None
            if shape is None:
                return "Reshape with a computed shape"
            if not _is_noop_reshape(inner.values.shape, shape.tolist(), bool(_attr(node, "allowzero", 0))):
                return f"Reshape {list(inner.values.shape)} -> {shape.tolist()} (not a no-op)"
            return inner.moved("Reshape (no-op)")
        return f"weight comes from {node.op_type} (an activation)"

    def _dequantize(self, node: onnx.NodeProto) -> _Tensor | str:
        q = self.constant(node.input[0])
        scale = self.constant(node.input[1]) if len(node.input) > 1 else None
        if q is None or scale is None:
            return "DequantizeLinear of a non-constant"
        if not np.issubdtype(q.dtype, np.integer):
            return f"DequantizeLinear of {q.dtype} (not an integer type)"
        zero = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        rank = q.ndim
        axis = _attr(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        block = _attr(node, "block_size", 0)
        scale_full = _expand(scale.astype(np.float32), q.shape, axis, block)
        zero_full = np.zeros(q.shape, np.int32) if zero is None else \
            _expand(zero.astype(np.int32), q.shape, axis, block).astype(np.int32)
        levels = q.astype(np.int32) - zero_full
        four_bit_type = self._four_bit_type(node.input[0])
        four_bit = four_bit_type is not None
        bits = four_bit_type or str(q.dtype)
        if block:
            kind = f"{bits} DQ block {block}"
        elif scale.size == 1:
            kind = f"{bits} DQ per-tensor"
        else:
            kind = f"{bits} DQ per-channel"
        per_axis = axis if not block and scale.size > 1 else None
        return _Tensor(levels * scale_full, levels, scale_full, block or None, axis if block else None, per_axis,
                       four_bit, kind, ["DequantizeLinear"])

    def _four_bit_type(self, name: str) -> str | None:
        """``INT4`` / ``UINT4`` when constant ``name`` has that ONNX element type, else None."""
        tensor = self.initializers.get(name)
        if tensor is None and name in self.producers and self.producers[name].op_type == "Constant":
            tensor = next((a.t for a in self.producers[name].attribute if a.name == "value"), None)
        if tensor is None or tensor.data_type not in FOUR_BIT_TYPES:
            return None
        return "INT4" if FOUR_BIT_TYPES[tensor.data_type] else "UINT4"


def _is_noop_reshape(shape: Sequence[int], target: Sequence[int], allowzero: bool) -> bool:
    """Whether ``Reshape`` to ``target`` keeps ``shape`` (0 copies the input's dim unless ``allowzero``; one -1)."""
    if len(target) != len(shape):
        return False
    dims = [shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        dims[dims.index(-1)] = int(np.prod(shape, dtype=np.int64)) // known if known else -1
    return list(dims) == list(shape)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array``, with INT4 / UINT4 unpacked to int8 by onnxsmith's own :func:`unpack_int4`."""
    if tensor.data_type in FOUR_BIT_TYPES:
        from onnxsmith.core.int4 import unpack_int4

        count = int(np.prod(tensor.dims, dtype=np.int64))
        signed = FOUR_BIT_TYPES[tensor.data_type]
        if tensor.HasField("raw_data"):
            packed = np.frombuffer(tensor.raw_data, dtype=np.uint8)
        else:  # int32_data holds one packed byte per element
            packed = np.asarray(tensor.int32_data, dtype=np.int64).astype(np.uint8)
        return unpack_int4(packed, count, signed=signed).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _expand(param: np.ndarray, shape: Sequence[int], axis: int, block: int) -> np.ndarray:
    """A DequantizeLinear scale / zero point broadcast to the quantized tensor's ``shape`` (per-tensor, per-axis
    ``axis``, or blocked along ``axis`` by ``block``)."""
    if block:
        return np.repeat(param, block, axis=axis).take(np.arange(shape[axis]), axis=axis)
    if param.size == 1:
        return np.broadcast_to(param.reshape(()), shape)
    view = [1] * len(shape)
    view[axis] = param.size
    return np.broadcast_to(param.reshape(view), shape)


def gemm_weights(model: onnx.ModelProto, skipped: list[tuple[str, str]] | None = None) -> list[GemmWeight]:
    """Every MatMul / Gemm / 1x1 Conv / MatMulNBits of ``model``'s main graph with a constant weight, in graph order.

    See the module docstring for the forms followed back to a constant; :class:`GemmWeight` for the layout. GEMMs
    that do not qualify (activation weights, batched or k x k Conv weights, unsupported quantized forms) are
    appended to ``skipped`` as ``(node name, reason)`` when a list is given.
    """
    from onnxsmith.core.sparsity import satisfies_nm

    graph = _Graph(model)
    result = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in GEMM_OPS or len(node.input) < 2:
            continue
        name = node.name or node.output[0] or f"{node.op_type}_{index}"
        if node.op_type == "MatMulNBits":
            found = _matmul_nbits(graph, node, name)
        else:
            resolved = graph.resolve(node.input[1])
            found = resolved if isinstance(resolved, str) else _as_gemm(node, name, resolved)
        if isinstance(found, str):
            if skipped is not None:
                skipped.append((name, found))
            continue
        found.sparse24 = satisfies_nm(found.weight, 2, 4, axis=1)
        result.append(found)
    return result


def _as_gemm(node: onnx.NodeProto, name: str, tensor: _Tensor) -> GemmWeight | str:
    """``tensor`` (the node's second input) as ``[N, K]`` with its quantization, or why it is not a 2-D GEMM weight."""
    values = tensor.values
    alpha = 1.0
    if node.op_type == "Conv":
        if values.ndim < 3 or any(d != 1 for d in values.shape[2:]):
            return f"Conv weight {list(values.shape)} is not 1x1"
        if _attr(node, "group", 1) != 1:
            return "grouped Conv"
        k_axis, flat = 1, lambda a: a.reshape(a.shape[0], a.shape[1])
    elif values.ndim != 2:
        return f"weight is {values.ndim}-D (batched or a vector), not a 2-D GEMM weight"
    elif node.op_type == "Gemm":
        alpha = float(_attr(node, "alpha", 1.0))
        k_axis = 1 if _attr(node, "transB", 0) else 0
        flat = (lambda a: a) if k_axis == 1 else (lambda a: a.T)
    else:
        k_axis, flat = 0, lambda a: a.T
    weight = np.ascontiguousarray(flat(values), dtype=np.float32) * np.float32(alpha)
    n, k = weight.shape
    gemm = GemmWeight(name, node.op_type, k, n, weight, False, tensor.kind, tensor.four_bit, tensor.block,
                      path=" -> ".join(tensor.path))
    if tensor.levels is None:
        return gemm
    if tensor.block is not None and tensor.block_axis != k_axis:
        gemm.notes.append("blocked along N, not K")
        return gemm
    if tensor.per_axis == k_axis:
        gemm.notes.append("per-channel along K")
        return gemm
    if tensor.four_bit:
        block = tensor.block or k
        _set_levels(gemm, flat(tensor.levels), flat(tensor.scale) * np.float32(alpha), block)
    return gemm


def _set_levels(gemm: GemmWeight, levels: np.ndarray, scale_full: np.ndarray, block: int) -> None:
    """Store INT4 ``levels [N, K]`` and the compact steps ``[N, K / block]`` when they fit the int4 path."""
    if levels.min() < -8 or levels.max() > 7:
        gemm.notes.append(f"levels - zero point span [{levels.min()}, {levels.max()}], not -8..7")
        return
    if gemm.k % block:
        gemm.notes.append(f"block {block} does not divide K = {gemm.k}")
        return
    gemm.levels = np.ascontiguousarray(levels, dtype=np.int8)
    gemm.scales = np.ascontiguousarray(scale_full[:, ::block], dtype=np.float32)


def _matmul_nbits(graph: _Graph, node: onnx.NodeProto, name: str) -> GemmWeight | str:
    """``com.microsoft.MatMulNBits`` (bits 4, uint8 zero points or none): unsigned nibbles ``[N, blocks, block/2]``
    low nibble first, scales ``[N * blocks]``, default zero point 8."""
    from onnxsmith.core.int4 import unpack_int4

    k, n, bits, block = (_attr(node, key, None) for key in ("K", "N", "bits", "block_size"))
    if bits != 4:
        return f"MatMulNBits with bits={bits} (only 4 is read)"
    if len(node.input) > 4 and node.input[4]:
        return "MatMulNBits with g_idx"
    packed, scales = graph.constant(node.input[1]), graph.constant(node.input[2])
    if packed is None or scales is None:
        return "MatMulNBits with non-constant weight or scales"
    blocks = -(-k // block)
    nibbles = np.stack([unpack_int4(row, blocks * block, signed=False) for row in packed.reshape(n, -1)])
    zero = np.full((n, blocks), 8, np.int32)
    if len(node.input) > 3 and node.input[3]:
        zp = graph.constant(node.input[3])
        if zp is None or zp.dtype != np.uint8:
            return "MatMulNBits with float or non-constant zero points"
        zero = np.stack([unpack_int4(row, blocks, signed=False) for row in zp.reshape(n, -1)]).astype(np.int32)
    scale_full = np.repeat(scales.astype(np.float32).reshape(n, blocks), block, axis=1)[:, :k]
    levels = nibbles.astype(np.int32)[:, :k] - np.repeat(zero, block, axis=1)[:, :k]
    gemm = GemmWeight(name, "MatMulNBits", k, n, (levels * scale_full).astype(np.float32), False,
                      f"MatMulNBits block {block}", True, block, path="MatMulNBits")
    _set_levels(gemm, levels, scale_full, block)
    return gemm


# ----------------------------------------------------------------------------------------------------------------
# Groups and the paths a group qualifies for (pure)


@dataclass(eq=False)
class Group:
    """GEMM weights of one ``(K, N)`` shape and kind: the ``layers`` (node names) of the file, the weights at hand
    (all of them after extraction, the first one from a ``--groups`` file); timed with ``weights[0]``, weighted by
    ``count``."""

    k: int
    n: int
    sparse24: bool
    int4: bool
    int4_block: int | None
    weights: list[GemmWeight]
    layers: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> str:
        return f"{self.k}x{self.n}"

    @property
    def sources(self) -> str:
        return ", ".join(dict.fromkeys(w.source for w in self.weights))


def group_weights(weights: Sequence[GemmWeight]) -> list[Group]:
    """Weights grouped by ``(K, N, 2:4 along K, INT4 or not, INT4 group size)``, in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for weight in weights:
        key = (weight.k, weight.n, weight.sparse24, weight.int4, weight.int4_block)
        if key not in groups:
            groups[key] = Group(weight.k, weight.n, weight.sparse24, weight.int4, weight.int4_block, [])
        groups[key].weights.append(weight)
        groups[key].layers.append(weight.name)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Saved groups: the timed weight of every group in one .npz, for a GPU machine without the zoo or the ONNX files

SAVE_VALUES_LIMIT = 4_000_000
"""A group with no fast path whose weight has more elements than this is saved as its shape only (the tied LM
head: 28 M values); its dense GEMM is then timed on random values, which do not change a dense GEMM's time."""


def save_groups(path: Path, prepared: Sequence[tuple[str, Prepared]]) -> dict[str, Any]:
    """Write every source's groups to ``path`` (``.npz``): a JSON manifest plus each group's first weight, as
    float16 ``[N, K]`` values, or INT4 levels + float32 steps, or nothing (shape only, see
    :data:`SAVE_VALUES_LIMIT`). Returns what was written (bytes, groups with values / shape only)."""
    arrays: dict[str, np.ndarray] = {}
    manifest: list[dict[str, Any]] = []
    shape_only = 0
    for s_index, (label, prep) in enumerate(prepared):
        groups = []
        for g_index, group in enumerate(prep.groups):
            weight, key = group.weights[0], f"s{s_index}g{g_index}"
            stored: dict[str, str] = {}
            if weight.levels is not None:
                arrays[f"{key}_levels"], arrays[f"{key}_scales"] = weight.levels, weight.scales
                stored = {"levels": f"{key}_levels", "scales": f"{key}_scales"}
            elif weight.weight is not None and (group.sparse24 or weight.weight.size <= SAVE_VALUES_LIMIT):
                arrays[f"{key}_weight"] = weight.weight.astype(np.float16)
                stored = {"weight": f"{key}_weight"}
            else:
                shape_only += 1
            groups.append({"k": group.k, "n": group.n, "sparse24": group.sparse24, "int4": group.int4,
                           "int4_block": group.int4_block, "layers": group.layers, "name": weight.name,
                           "op": weight.op, "source": weight.source, "block": weight.block, "path": weight.path,
                           "notes": weight.notes, "arrays": stored})
        manifest.append({"label": label, "facts": prep.facts, "summary": prep.summary,
                         "skipped": prep.skipped, "groups": groups})
    text = json.dumps({"version": 1, "sources": manifest}, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(handle, manifest=np.array(text), **arrays)
    return {"path": str(path), "bytes": path.stat().st_size, "groups": sum(len(m["groups"]) for m in manifest),
            "shape_only": shape_only}


def saved_labels(path: Path) -> list[str]:
    """The source labels a ``--groups`` file holds."""
    with np.load(path, allow_pickle=False) as archive:
        return [source["label"] for source in json.loads(str(archive["manifest"]))["sources"]]


def load_groups(path: Path, index: int) -> Prepared:
    """Source ``index`` of a file written by :func:`save_groups`, as groups holding their one saved weight."""
    with np.load(path, allow_pickle=False) as archive:
        source = json.loads(str(archive["manifest"]))["sources"][index]
        groups = []
        for entry in source["groups"]:
            stored = entry["arrays"]
            weight = GemmWeight(entry["name"], entry["op"], entry["k"], entry["n"], None, entry["sparse24"],
                                entry["source"], entry["int4"], entry["block"], path=entry["path"],
                                notes=list(entry["notes"]))
            if "levels" in stored:
                weight.levels, weight.scales = archive[stored["levels"]], archive[stored["scales"]]
                weight.weight = weight.levels * np.repeat(weight.scales, entry["int4_block"], axis=1)
            elif "weight" in stored:
                weight.weight = archive[stored["weight"]].astype(np.float32)
            else:
                weight.notes.append("values not saved (dense only): timed on random values")
            groups.append(Group(entry["k"], entry["n"], entry["sparse24"], entry["int4"], entry["int4_block"],
                                [weight], list(entry["layers"])))
    facts = {**source["facts"], "groups_file": str(path), "saved_label": source["label"]}
    return Prepared(groups, facts, source["summary"], [tuple(item) for item in source["skipped"]])


def sparse_constraints(backend: str) -> tuple[int, int, str]:
    """float16 ``(min rows, min cols)`` of the sparse operand ``W [N, K]`` for ``backend`` (``cuSPARSELt`` or
    ``CUTLASS``), read from torch's semi-structured class, and where they came from."""
    try:
        import torch
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cuSPARSELt" else SparseSemiStructuredTensorCUTLASS
        config = cls._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
        return config.sparse_min_rows, config.sparse_min_cols, f"{cls.__name__}._DTYPE_SHAPE_CONSTRAINTS"
    except Exception:  # noqa: BLE001 - an older torch: the documented torch 2.13 figures
        rows, cols = FALLBACK_SPARSE_MIN[backend]
        return rows, cols, "torch 2.13 figures (this torch has no class to read)"


def sparse_reason(group: Group, backend: str) -> str | None:
    """Why the 2:4 sparse path cannot take ``group`` on ``backend``, or None."""
    if not group.sparse24:
        return "not 2:4 along K"
    rows, cols, _ = sparse_constraints(backend)
    for label, size, unit in (("N", group.n, rows), ("K", group.k, cols)):
        if size < unit or size % unit:
            return f"{label} = {size} is not a multiple of {unit} ({backend} float16)"
    return None


def int4_plan(group: Group) -> tuple[int | None, str | None]:
    """``(inner_k_tiles, None)`` when ``_weight_int4pack_mm`` can take ``group``, else ``(None, reason)``."""
    weight = group.weights[0]
    if not group.int4:
        return None, "not INT4 in this file"
    if group.int4_block is None:
        return None, "; ".join(weight.notes) or "INT4 levels not usable"
    if group.int4_block not in INT4PACK_GROUPS:
        return None, f"group size {group.int4_block} unsupported (torch takes {'/'.join(map(str, INT4PACK_GROUPS))})"
    if group.n % 8:
        return None, f"N = {group.n} is not a multiple of 8"
    for tiles in INNER_K_TILES:
        if group.k % (tiles * 16) == 0:
            return tiles, None
    return None, f"K = {group.k} is not a multiple of 32"


def int4pack_operands(levels: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int4pack kernels' operands from INT4 ``levels [N, K]`` (-8..7) and steps ``scales [N, K / group]``:
    unsigned nibbles ``levels + 8`` (uint8 ``[N, K]``) and ``scales_and_zeros`` float32 ``[K / group, N, 2]`` with
    zero 0, since tinygemm dequantizes ``(u - 8) * scale + zero``."""
    levels = np.asarray(levels)
    if levels.min() < -8 or levels.max() > 7:
        raise ValueError(f"levels must lie in -8..7, got [{levels.min()}, {levels.max()}]")
    unsigned = (levels.astype(np.int16) + 8).astype(np.uint8)
    steps = np.asarray(scales, dtype=np.float32).T  # [K / group, N]
    return unsigned, np.ascontiguousarray(np.stack([steps, np.zeros_like(steps)], axis=-1))


def pack_nibbles_cuda(unsigned: np.ndarray) -> np.ndarray:
    """``[N, K]`` values 0..15 as the uint8 ``[N, K / 2]`` that CUDA's ``_convert_weight_to_int4pack`` reads (torch
    >= 2.5): the even K index in the high nibble, the odd one in the low nibble (torch's own tests do
    ``out[:, ::2] << 4 | out[:, 1::2]``; the reverse of ONNX's INT4 order)."""
    unsigned = np.asarray(unsigned, dtype=np.uint8)
    if unsigned.shape[1] % 2:
        raise ValueError(f"K = {unsigned.shape[1]} must be even")
    if unsigned.max(initial=0) > 15:
        raise ValueError("values must lie in 0..15")
    return np.ascontiguousarray((unsigned[:, 0::2] << 4) | unsigned[:, 1::2])


# ----------------------------------------------------------------------------------------------------------------
# Timing (torch; CUDA, or CPU as a smoke test)


@dataclass
class Backend:
    """The torch device timing runs on and its facts."""

    torch: Any
    device: Any
    facts: dict[str, Any]
    sparse_backend: str | None
    """``cuSPARSELt``, ``CUTLASS`` or None (no semi-structured sparsity on this device)."""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def cuda_status() -> tuple[bool, str]:
    """Whether a CUDA GPU is usable by torch here, and why not."""
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({one_line(exc)})"
    if not torch.cuda.is_available():
        return False, f"torch.cuda.is_available() is false (torch {torch.__version__})"
    return True, torch.cuda.get_device_name()


def make_backend(device: str) -> Backend:
    """The torch backend for ``device`` (``cuda`` or ``cpu``) and its facts for the JSON."""
    import torch

    facts: dict[str, Any] = {"device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    cusparselt = getattr(torch.backends, "cusparselt", None)
    facts["cusparselt_module"] = cusparselt is not None
    sparse_backend = None
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        available = bool(cusparselt is not None and cusparselt.is_available())
        facts["cusparselt_available"] = available
        facts["cusparselt_version"] = cusparselt.version() if available else None
        try:
            from torch.sparse import SparseSemiStructuredTensor

            SparseSemiStructuredTensor._FORCE_CUTLASS = not available
            sparse_backend = "cuSPARSELt" if available else "CUTLASS"
        except ImportError as exc:
            facts["sparse_error"] = one_line(exc)
    else:
        facts["cusparselt_available"] = bool(cusparselt is not None and cusparselt.is_available())
        facts["note"] = "CPU smoke test of the pipeline: no semi-structured sparsity, torch's CPU int4 kernel"
    facts["sparse_backend"] = sparse_backend
    return Backend(torch, torch.device(device), facts, sparse_backend)


def median_ms(backend: Backend, fn: Callable[[], Any], runs: int, reps: int, warmup: int) -> float:
    """Median over ``runs`` samples of ``fn``'s time per call (ms): CUDA events (or ``perf_counter`` on the CPU)
    around ``reps`` back-to-back calls, after ``warmup`` calls and a synchronize (``harness.torch_median_ms``)."""
    return torch_median_ms(backend.torch, fn, runs, reps, warmup, cuda=backend.cuda)


def relative_error(torch: Any, value: Any, reference: Any) -> float:
    """``max |value - reference| / max |reference|`` in float32."""
    value, reference = value.float(), reference.float()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def int4_function(backend: Backend, weight: GemmWeight, inner_k_tiles: int) -> tuple[Callable[[Any], Any], str]:
    """``x_bf16 -> x @ W^T`` through torch's int4pack kernel from ``weight``'s levels and steps, and how the weight
    was converted."""
    torch = backend.torch
    unsigned, scales_and_zeros = int4pack_operands(weight.levels, weight.scales)
    group = weight.int4_block
    sz = torch.from_numpy(scales_and_zeros).to(backend.device, torch.bfloat16)
    if backend.cuda:
        try:
            packed = torch._convert_weight_to_int4pack(
                torch.from_numpy(pack_nibbles_cuda(unsigned)).to(backend.device), inner_k_tiles)
            how = "uint8 [N, K/2]"
        except RuntimeError as first:  # torch < 2.5 took int32 [N, K]
            try:
                packed = torch._convert_weight_to_int4pack(
                    torch.from_numpy(unsigned.astype(np.int32)).to(backend.device), inner_k_tiles)
                how = "int32 [N, K] (torch < 2.5)"
            except RuntimeError:
                raise first from None
        mm = torch._weight_int4pack_mm
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(unsigned.astype(np.int32)), inner_k_tiles)
        how, mm = "CPU int32 [N, K]", torch._weight_int4pack_mm_for_cpu
    return (lambda x: mm(x, packed, group, sz)), how


@dataclass
class Timing:
    """One group at one token count: ms per call, ratios to dense, max relative errors, or why a path is absent."""

    m: int
    dense_ms: float | None = None
    sparse_ms: float | None = None
    sparse_ratio: float | None = None
    sparse_err: float | None = None
    sparse_ok: bool = False
    sparse_note: str = ""
    int4_ms: float | None = None
    int4_ratio: float | None = None
    int4_err: float | None = None
    int4_ok: bool = False
    int4_note: str = ""
    error: str = ""


def time_group(backend: Backend, group: Group, tokens: Sequence[int], args: argparse.Namespace,
               generator: Any) -> tuple[list[Timing], dict[str, Any]]:
    """Dense, sparse and int4 timings of ``group`` at every token count (see the module docstring)."""
    torch = backend.torch
    F = torch.nn.functional
    info: dict[str, Any] = {}
    sparse_why = "needs CUDA" if backend.sparse_backend is None else sparse_reason(group, backend.sparse_backend)
    inner_k_tiles, int4_why = int4_plan(group)
    dense, sparse, int4, bf16 = [], [], [], []
    try:
        with torch.no_grad():
            for weight in group.weights:
                if weight.weight is None:  # saved without values: a dense-only group, timed on random values
                    w16 = torch.randn(group.n, group.k, generator=generator, device=backend.device).half()
                    dense.append(w16)
                    continue
                w16 = torch.from_numpy(weight.weight).to(backend.device, torch.float16).contiguous()
                dense.append(w16)
                if sparse_why is None:
                    from torch.sparse import to_sparse_semi_structured

                    try:
                        sparse.append(to_sparse_semi_structured(w16))
                    except Exception as exc:  # noqa: BLE001 - a shape or build the backend refuses
                        sparse_why, sparse = f"to_sparse_semi_structured: {one_line(exc)}", []
                if int4_why is None:
                    try:
                        fn, info["int4_conversion"] = int4_function(backend, weight, inner_k_tiles)
                        int4.append(fn)
                        bf16.append(torch.from_numpy(weight.weight).to(backend.device, torch.bfloat16))
                    except Exception as exc:  # noqa: BLE001 - a kernel this build lacks
                        int4_why, int4 = f"int4pack: {one_line(exc)}", []
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the group's rows say so
        return [Timing(m, error=one_line(exc)) for m in tokens], info
    if inner_k_tiles is not None and int4_why is None:
        info["inner_k_tiles"] = inner_k_tiles
    rows = []
    for m in tokens:
        row = Timing(m, sparse_note=sparse_why or "", int4_note=int4_why or "")
        try:
            with torch.no_grad():
                x = torch.randn(m, group.k, generator=generator, device=backend.device)
                x16, xb = x.half().contiguous(), x.bfloat16().contiguous()
                if sparse:
                    row.sparse_err = max(relative_error(torch, F.linear(x16, s), F.linear(x16, d))
                                         for s, d in zip(sparse, dense))
                    row.sparse_ok = row.sparse_err <= args.tolerance
                if int4:
                    row.int4_err = max(relative_error(torch, fn(xb), F.linear(xb, w)) for fn, w in zip(int4, bf16))
                    row.int4_ok = row.int4_err <= args.tolerance
                timed = (args.runs, args.reps, args.warmup)
                row.dense_ms = median_ms(backend, lambda: F.linear(x16, dense[0]), *timed)
                if sparse:
                    row.sparse_ms = median_ms(backend, lambda: F.linear(x16, sparse[0]), *timed)
                    row.sparse_ratio = row.sparse_ms / row.dense_ms
                if int4:
                    row.int4_ms = median_ms(backend, lambda: int4[0](xb), *timed)
                    row.int4_ratio = row.int4_ms / row.dense_ms
        except Exception as exc:  # noqa: BLE001 - keep the other token counts
            row.error = one_line(exc)
        rows.append(row)
        print(f"  {group.shape} x{group.count} M={m}: dense {row.dense_ms} sparse {row.sparse_ms} int4 {row.int4_ms}"
              f" {row.error}", file=sys.stderr, flush=True)
    for tensors in (dense, sparse, int4, bf16):
        tensors.clear()
    if backend.cuda:
        torch.cuda.empty_cache()
    return rows, info


def totals(groups: Sequence[Group], timings: Sequence[Sequence[Timing]], tokens: Sequence[int]) -> list[dict]:
    """Per token count: sum over groups of count x ms, dense and with each fast path where it ran right."""
    result = []
    for index, m in enumerate(tokens):
        rows = [(group.count, group_rows[index]) for group, group_rows in zip(groups, timings)]
        if any(row.dense_ms is None for _, row in rows):
            result.append({"m": m, "error": "some groups have no dense time"})
            continue
        entry: dict[str, Any] = {"m": m, "dense_ms": sum(count * r.dense_ms for count, r in rows),
                                 "layers": sum(count for count, _ in rows)}
        for path in ("sparse", "int4"):
            fast = [getattr(r, f"{path}_ok") and getattr(r, f"{path}_ms") is not None for _, r in rows]
            entry[f"{path}_layers"] = sum(count for (count, _), ok in zip(rows, fast) if ok)
            if any(fast):
                total = sum(count * (getattr(r, f"{path}_ms") if ok else r.dense_ms)
                            for (count, r), ok in zip(rows, fast))
                entry[f"{path}_ms"], entry[f"{path}_ratio"] = total, total / entry["dense_ms"]
        result.append(entry)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def shape_table(groups: Sequence[Group], backend_name: str) -> str:
    """Shape, count, weight form, 2:4 along K, which fast paths qualify and why not, example layers."""
    lines = []
    for group in groups:
        why = sparse_reason(group, backend_name)
        tiles, int4_why = int4_plan(group)
        names = group.layers
        layers = ", ".join(names[:2]) + (f", … (+{len(names) - 2})" if len(names) > 2 else "")
        lines.append([group.shape, str(group.count), _cell(group.sources), "yes" if group.sparse24 else "no",
                      "yes" if why is None else f"no: {why}",
                      f"yes (group {group.int4_block}, {tiles} k-tiles)" if int4_why is None else f"no: {int4_why}",
                      _cell(layers)])
    return markdown_table(["K x N", "count", "weight", "2:4 on K", f"sparse ({backend_name})", "int4pack", "layers"],
                          lines)


def timing_table(groups: Sequence[Group], timings: Sequence[Sequence[Timing]], tolerance: float) -> str:
    """One row per group and token count: ms, ratio to dense, max relative error of each fast path."""

    def fast(ms: float | None, ratio: float | None, err: float | None, ok: bool, note: str) -> tuple[str, str]:
        if ms is None:
            return "—", _cell(note) if note else "—"
        flag = "" if ok else f" WRONG (err > {tolerance:g})"
        return _fmt(ms), f"{_fmt(ratio, 2)}{flag}"

    lines = []
    for group, rows in zip(groups, timings):
        for row in rows:
            sparse_ms, sparse_ratio = fast(row.sparse_ms, row.sparse_ratio, row.sparse_err, row.sparse_ok,
                                           row.sparse_note)
            int4_ms, int4_ratio = fast(row.int4_ms, row.int4_ratio, row.int4_err, row.int4_ok, row.int4_note)
            errors = f"{_fmt(row.sparse_err, 5) if row.sparse_err is not None else '—'} / " \
                     f"{_fmt(row.int4_err, 5) if row.int4_err is not None else '—'}"
            lines.append([group.shape, str(group.count), str(row.m), _fmt(row.dense_ms), sparse_ms, sparse_ratio,
                          int4_ms, int4_ratio, errors, _cell(row.error)])
    return markdown_table(["K x N", "count", "M", "dense ms", "sparse ms", "sparse/dense", "int4 ms", "int4/dense",
                           "max rel err sparse / int4", "error"], lines)


def totals_table(entries: Sequence[dict]) -> str:
    lines = []
    for entry in entries:
        if "error" in entry:
            lines.append([str(entry["m"]), entry["error"], "", "", "", "", "", ""])
            continue
        lines.append([str(entry["m"]), _fmt(entry["dense_ms"]),
                      _fmt(entry.get("sparse_ms")), _fmt(entry.get("sparse_ratio"), 2),
                      f"{entry['sparse_layers']}/{entry['layers']}",
                      _fmt(entry.get("int4_ms")), _fmt(entry.get("int4_ratio"), 2),
                      f"{entry['int4_layers']}/{entry['layers']}"])
    return markdown_table(["M", "dense ms (sum count x ms)", "with sparse ms", "sparse/dense", "sparse layers",
                           "with int4 ms", "int4/dense", "int4 layers"], lines)


LEGEND = ("K x N: reduction x outputs of W [N, K]; count: GEMMs of that shape and kind in the file; ratios are time "
          "/ dense FP16 time (below 1 = faster); max rel err: max |y_fast - y_dense| / max |y_dense| on the same "
          "inputs, max over the group's weights; totals: sum over groups of count x ms, the fast path where it ran "
          "and was within the tolerance, dense elsewhere")


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    """What is measured: a zoo model optimized with a recipe, a given ONNX file, or one source of a ``--groups``
    file."""

    label: str
    model: str | None = None
    recipe: str | None = None
    onnx: Path | None = None
    saved: tuple[Path, int] | None = None


@dataclass(eq=False)
class Prepared:
    """A source's groups, how it was made, its GEMM counts and the GEMMs not timed (node, reason)."""

    groups: list[Group]
    facts: dict[str, Any]
    summary: dict[str, int]
    skipped: list[tuple[str, str]]


def prepare(source: Source, args: argparse.Namespace, workdir: Path) -> Prepared:
    """Build (or load) the source and extract its groups."""
    if source.saved is not None:
        return load_groups(*source.saved)
    model, facts = build_model(source, args, workdir)
    skipped: list[tuple[str, str]] = []
    weights = gemm_weights(model, skipped)
    del model
    summary = {"gemms": len(weights), "sparse24": sum(w.sparse24 for w in weights),
               "int4": sum(w.int4 for w in weights), "int4_usable": sum(w.levels is not None for w in weights)}
    return Prepared(group_weights(weights), facts, summary, skipped)


def build_model(source: Source, args: argparse.Namespace, workdir: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The source's ONNX model (optimized into ``workdir`` for zoo sources) and facts about how it was made."""
    if source.onnx is not None:
        return onnx.load(str(source.onnx)), {"onnx": str(source.onnx)}
    from onnxsmith.models.zoo import get_zoo_model, zoo_model_path

    options = dict(args.recipe_options.get(source.recipe, {}))
    feeds = get_zoo_model(source.model).calibration_feeds(args.calib)
    output = workdir / f"{source.model}-{source.recipe}.onnx"
    start = time.perf_counter()
    result = optimize_model(zoo_model_path(source.model), output, source.recipe, feeds, options)
    seconds = time.perf_counter() - start
    changes = {record.name: record.changes for record in result.records if getattr(record, "changes", None)}
    return onnx.load(str(output)), {"recipe": source.recipe, "pass_options": options, "calibration_feeds": len(feeds),
                                    "optimize_seconds": seconds, "pass_changes": changes}


def run_source(source: Source, prep: Prepared, args: argparse.Namespace, backend: Backend | None,
               tokens: Sequence[int]) -> dict[str, Any]:
    """Print the shape table and, with a backend, time every group; the source's JSON entry."""
    groups, skipped = prep.groups, prep.skipped
    sparse_name = backend.sparse_backend if backend is not None and backend.sparse_backend else "cuSPARSELt"
    entry: dict[str, Any] = {
        "label": source.label, "model": source.model, "recipe": source.recipe, **prep.facts, **prep.summary,
        "not_timed": [{"node": name, "reason": reason} for name, reason in skipped],
        "groups": []}
    print(f"\n### {source.label}\n")
    print(shape_table(groups, sparse_name))
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"\n- {prep.summary['gemms']} GEMMs with a constant weight in {len(groups)} groups; "
          f"{prep.summary['sparse24']} are 2:4 along K, {prep.summary['int4']} INT4 ({prep.summary['int4_usable']} "
          "with levels for int4pack)")
    if source.saved is not None:
        print(f"- from {source.saved[0]}: one saved weight per group (timed and checked); "
              f"{sum(g.weights[0].weight is None for g in groups)} group(s) saved as shape only")
    if reasons:
        print("- not timed: " + "; ".join(f"{count} x {reason}" for reason, count in reasons.items()))
    timings: list[list[Timing]] = []
    for group in groups:
        why = sparse_reason(group, sparse_name)
        tiles, int4_why = int4_plan(group)
        entry["groups"].append({
            "k": group.k, "n": group.n, "count": group.count, "sources": group.sources, "sparse24": group.sparse24,
            "int4_block": group.int4_block, "sparse_path": why or "ok", "int4_path": int4_why or "ok",
            "inner_k_tiles": tiles, "layers": group.layers,
            "paths": sorted({w.path for w in group.weights}),
            "notes": sorted({note for w in group.weights for note in w.notes})})
    if backend is not None:
        generator = backend.torch.Generator(device=backend.device).manual_seed(0)
        for group, group_entry in zip(groups, entry["groups"]):
            rows, info = time_group(backend, group, tokens, args, generator)
            timings.append(rows)
            group_entry.update(info)
            group_entry["timings"] = [vars(row) for row in rows]
        entry["totals"] = totals(groups, timings, tokens)
        print(f"\n#### {source.label}: timings ({backend.facts.get('gpu', backend.device.type)}, "
              f"sparse {backend.sparse_backend or 'n/a'})\n")
        print(timing_table(groups, timings, args.tolerance))
        print(f"\n#### {source.label}: weighted totals\n")
        print(totals_table(entry["totals"]))
    sys.stdout.flush()
    return entry


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_list(parser: argparse.ArgumentParser, text: str, what: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        parser.error(f"no {what} given")
    return names


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None,
                        help=f"comma-separated zoo models among {', '.join(MODEL_CHOICES)} (default "
                             f"{','.join(DEFAULT_MODELS)}; none when --onnx or --groups is given)")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help="comma-separated onnxsmith recipes run on every model (default "
                             f"{','.join(DEFAULT_RECIPES)})")
    parser.add_argument("--onnx", action="append", type=Path, default=[], metavar="PATH",
                        help="an existing onnxsmith output to measure as it is (repeatable)")
    parser.add_argument("--groups", action="append", type=Path, default=[], metavar="PATH",
                        help="a .npz written by --save-groups: its sources' groups, one weight each (repeatable)")
    parser.add_argument("--save-groups", type=Path, default=None, metavar="PATH",
                        help="write every source's groups (the timed weight of each) to this .npz, e.g. on a CPU "
                             "machine for a GPU machine without the zoo")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                        help=f"comma-separated token counts M (default {','.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed samples, median (default {DEFAULT_RUNS})")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help=f"back-to-back calls per sample (default {DEFAULT_REPS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed calls first (default {DEFAULT_WARMUP})")
    parser.add_argument("--calib", type=int, default=DEFAULT_CALIBRATION, metavar="N",
                        help=f"calibration feeds for the recipes (default {DEFAULT_CALIBRATION})")
    parser.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE,...",
                        help="pass options for one recipe, e.g. int4-wo:block_size=128 (values as JSON, else text)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest max relative error of a fast path counted as right (default "
                             f"{DEFAULT_TOLERANCE})")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available, else shapes only; cpu: a smoke test of the timing pipeline")
    parser.add_argument("--dry-run", action="store_true", help="shapes and qualifying weights only, no timing")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.models is None:
        args.models = [] if args.onnx or args.groups else list(DEFAULT_MODELS)
    else:
        args.models = parse_list(parser, args.models, "models")
        unknown = [name for name in args.models if name not in MODEL_CHOICES]
        if unknown:
            parser.error(f"unknown models {unknown}; known: {', '.join(MODEL_CHOICES)}")
    args.recipes = parse_list(parser, args.recipes, "recipes")
    try:
        args.tokens = [int(text) for text in parse_list(parser, args.tokens, "tokens")]
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if min(args.tokens) < 1 or args.runs < 1 or args.reps < 1 or args.warmup < 0 or args.calib < 1:
        parser.error("--tokens, --runs, --reps and --calib must be at least 1, --warmup at least 0")
    for option, paths in (("--onnx", args.onnx), ("--groups", args.groups)):
        for path in paths:
            if not path.is_file():
                parser.error(f"{option} {path}: no such file")
    args.recipe_options = {}
    for text in args.set:
        recipe, _, assignments = text.partition(":")
        if not recipe or not assignments:
            parser.error(f"--set {text!r}: expected RECIPE:KEY=VALUE,...")
        for assignment in assignments.split(","):
            key, equals, value = assignment.partition("=")
            if not equals or not key.strip():
                parser.error(f"--set {text!r}: expected KEY=VALUE, got {assignment!r}")
            args.recipe_options.setdefault(recipe.strip(), {})[key.strip()] = parse_value(value.strip())


def sources_of(args: argparse.Namespace) -> list[Source]:
    sources = [Source(f"{model} / {recipe}", model, recipe) for model in args.models for recipe in args.recipes]
    sources += [Source(path.name, onnx=path) for path in args.onnx]
    for path in args.groups:
        sources += [Source(f"{label} [{path.name}]", saved=(path, index))
                    for index, label in enumerate(saved_labels(path))]
    return sources


def run(args: argparse.Namespace, report: Report) -> None:
    backend, why_not = None, ""
    if args.device == "cpu" and not args.dry_run:
        backend = make_backend("cpu")
    elif not args.dry_run:
        has_cuda, detail = cuda_status()
        if has_cuda:
            backend = make_backend("cuda")
        else:
            why_not = detail
    document = report.document
    document["environment"]["timing"] = backend.facts if backend else None
    document.update({
        "settings": {"models": args.models, "recipes": args.recipes, "onnx": [str(p) for p in args.onnx],
                     "groups": [str(p) for p in args.groups], "save_groups": args.save_groups and str(args.save_groups),
                     "recipe_options": args.recipe_options, "tokens": args.tokens, "runs": args.runs,
                     "reps": args.reps, "warmup": args.warmup, "calibration_feeds": args.calib,
                     "tolerance": args.tolerance, "device": args.device, "dry_run": args.dry_run},
        "timed": backend is not None,
        "sources": [],
    })
    if backend is None:
        document["no_timing_reason"] = "--dry-run" if args.dry_run else why_not
    else:
        print(f"- timing on {backend.facts.get('gpu', 'the CPU (smoke test, not a GPU figure)')}: torch "
              f"{backend.facts['torch']}, CUDA {backend.facts['torch_cuda']}, sparse backend "
              f"{backend.sparse_backend or 'none'}, cuSPARSELt available {backend.facts['cusparselt_available']}")
    to_save: list[tuple[str, Prepared]] = []
    for source in sources_of(args):
        print(f"{source.label}: preparing", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu_gemm.") as tmp:
            try:
                prep = prepare(source, args, Path(tmp))
                document["sources"].append(run_source(source, prep, args, backend, args.tokens))
                if args.save_groups is not None:
                    to_save.append((source.label, prep))
            except Exception as exc:  # noqa: BLE001 - a source that cannot be built must not stop the run
                print(f"\n- {source.label}: error: {one_line(exc)}")
                document["sources"].append({"label": source.label, "error": one_line(exc)})
        report.save()
    print()
    if args.save_groups is not None:
        document["saved_groups"] = save_groups(args.save_groups, to_save)
        print(f"- groups of {len(to_save)} source(s) saved to {args.save_groups} "
              f"({document['saved_groups']['bytes'] / 1e6:.1f} MB; {document['saved_groups']['shape_only']} "
              "group(s) as shape only); time them elsewhere with --groups")
    if backend is None:
        if args.dry_run:
            print("- dry run: shapes only, no timings")
        else:
            print(f"- {NO_GPU_LINE} ({why_not})")
    report.finish(LEGEND)


BENCHMARK = Benchmark("gpu_gemm", __doc__, run, add_arguments, check_arguments,
                      quick={"models": "minilm", "recipes": "sparse24", "calib": 1, "tokens": "1,16", "runs": 5,
                             "reps": 2, "warmup": 2})
parse_args, main = BENCHMARK.parse_args, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
