"""INT4 layers: which MatMul/Gemm weights blocked INT4 quantization treats, with the block size each gets, and
the selection options ``int4-weight`` and ``awq-scale`` declare alike."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxsmith.analysis.weights import FLOAT_TYPES, weight_site
from onnxsmith.calibration.int4 import BLOCK_SIZES, TENSORRT_BLOCK_SIZES
from onnxsmith.core.graph import SUBGRAPH_SKIP_REASON, subgraph_node_names
from onnxsmith.core.options import PassOptions, check_patterns, option

TARGETS = ("tensorrt", "onnxruntime")
INDIVISIBLE = ("fallback", "error", "skip")


@dataclass(frozen=True)
class Int4SelectionOptions(PassOptions):
    """The block size, target form and excluded layers of an INT4 weight pass."""

    block_size: int = option(64, "input channels per INT4 step (TensorRT: 64 or 128)", choices=BLOCK_SIZES)
    target: str = option("tensorrt", "INT4 form: DequantizeLinear INT4 (TensorRT) or MatMulNBits (onnxruntime)",
                         choices=TARGETS)
    exclude_nodes: tuple[str, ...] = option((), "node names kept float")
    exclude_regex: tuple[str, ...] = option((), "node-name patterns kept float", check=check_patterns)

    def check(self) -> None:
        if self.target == "tensorrt" and self.block_size not in TENSORRT_BLOCK_SIZES:
            raise ValueError(f"TensorRT's INT4 DequantizeLinear takes block sizes {list(TENSORRT_BLOCK_SIZES)}, "
                             f"got {self.block_size} (use target 'onnxruntime' for other sizes)")

    def selection(self, indivisible: str = "fallback") -> Int4Selection:
        return Int4Selection(self.block_size, self.target, indivisible, self.exclude_nodes, self.exclude_regex)


@dataclass
class Int4Layer:
    """A MatMul/Gemm with a constant 2-D weight, its weight in GEMM form ``[K, N]`` and the block size used."""

    node: gs.Node
    weight: gs.Constant
    block: int
    transposed: bool
    """Whether the stored weight is ``[N, K]`` (Gemm ``transB=1``)."""
    notes: list[str] = field(default_factory=list)

    @property
    def w(self) -> np.ndarray:
        values = np.asarray(self.weight.values, dtype=np.float32)
        return values.T if self.transposed else values

    @property
    def input(self) -> gs.Variable:
        return self.node.inputs[0]


@dataclass(frozen=True)
class Int4Selection:
    """The layer rules: a constant 2-D float weight read by this node only, ``block_size`` dividing K (else, by
    ``indivisible``, the largest smaller allowed block, or the layer is skipped), not excluded."""

    block_size: int
    target: str
    indivisible: str = "fallback"
    exclude_nodes: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()

    def layers(self, graph: gs.Graph) -> tuple[list[Int4Layer], dict[str, str]]:
        """The layers to quantize in graph order, and the skipped candidates with the reason."""
        layers, skipped = [], {}
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            site = weight_site(node)
            if site is None:
                continue
            if site[0] is not node:
                skipped[node.name] = "weight is a Transpose of a constant (a tied embedding?), not a constant"
                continue
            weight = node.inputs[1]
            reason = self._skip_reason(node, weight)
            if reason is None:
                transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
                k = weight.values.shape[1 if transposed else 0]
                block, reason, notes = self._block_for(k)
                if block is not None:
                    layers.append(Int4Layer(node, weight, block, transposed, notes))
                    continue
            skipped[node.name] = reason
        for name in subgraph_node_names(graph, ("MatMul", "Gemm")):
            skipped[name] = SUBGRAPH_SKIP_REASON
        return layers, skipped

    def _skip_reason(self, node: gs.Node, weight: gs.Constant) -> str | None:
        if node.name in self.exclude_nodes or any(re.search(p, node.name) for p in self.exclude_regex):
            return "excluded"
        if weight.values.ndim != 2:
            return f"weight is {weight.values.ndim}-D (INT4 blocks need a 2-D weight)"
        if np.dtype(weight.values.dtype) not in FLOAT_TYPES:
            return f"weight dtype {weight.values.dtype} is not float32/float16"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA"
        if any(reader is not node for reader in weight.outputs):
            return "weight is shared with other nodes"
        return None

    def _block_for(self, k: int) -> tuple[int | None, str | None, list[str]]:
        if k % self.block_size == 0:
            return self.block_size, None, []
        if self.indivisible == "error":
            return None, f"block size {self.block_size} does not divide K = {k}", []
        allowed = TENSORRT_BLOCK_SIZES if self.target == "tensorrt" else BLOCK_SIZES
        smaller = [b for b in allowed if b < self.block_size and k % b == 0]
        if self.indivisible == "fallback" and smaller:
            return max(smaller), None, [f"block {max(smaller)}: {self.block_size} does not divide K = {k}"]
        return None, f"block size {self.block_size} does not divide K = {k}" + (
            f" and no allowed smaller block ({list(allowed)}) does" if self.indivisible == "fallback" else ""), []
