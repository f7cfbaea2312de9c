"""Channel regions: where a permutation of channels between layers can be applied without changing the function.

A *region* is a set of tensors that carry one channel axis from its *producers* (MatMul/Gemm with a constant
weight, Conv with group 1: their output channels) to its *consumers* (MatMul/Gemm/Conv with a constant weight
reading the region: their input channels). Permuting the producers' output channels, every per-channel constant
on the way and the consumers' input channels the same way leaves the model's function unchanged.

Between them a region may pass through unary elementwise ops, elementwise ops whose other inputs are constants,
channel-invariant tensors (size 1 or no axis at the channel axis) or tensors of the region (a residual ``Add``
of two producers makes them share one permutation, so does SwiGLU's ``silu(gate) * up``), BatchNormalization,
depthwise Conv, and the attention path ``V -> Reshape [.., H, D] -> Transpose -> MatMul(P, V) -> Transpose ->
Reshape [.., H * D] -> O-proj``; a region that splits channels into heads may only permute within heads. A region
that reaches a graph input or output, any other op, a non-constant weight or channel counts that disagree is
left untouched and reported as skipped with the reason. Static shapes come from the model's ``value_info`` (run
``shape-inference`` with ``symbolic=True`` first); where a rank or size the rewrite depends on is unknown the
region is skipped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxsmith.calibration.channel_order import GemmWeight
from onnxsmith.core.graph import unique_name
from onnxsmith.core.pass_base import Tolerance

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity", "Clip", "Cast",
})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"})
SHAPE_READERS = frozenset({"Shape", "Size"})
"""Ops that read only a tensor's shape, which a permutation keeps."""
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class Layout:
    """Where a region tensor holds its channels: negative ``axes``, either ``(channel,)`` or ``(head, dim)`` with
    channel ``= head * D + dim``, and the ``sizes`` of those axes."""

    axes: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def channels(self) -> int:
        return math.prod(self.sizes)

    @property
    def group(self) -> int:
        """Channels a permutation may move among: all of them, or one head's ``D``."""
        return self.sizes[-1] if len(self.sizes) == 2 else self.channels


@dataclass(frozen=True)
class Site:
    """A constant input ``node.inputs[index]`` whose own ``axes`` hold the region's channels."""

    node: gs.Node
    index: int
    axes: tuple[int, ...]


@dataclass
class Layer:
    """A producer or consumer: its weight in GEMM form and where the permutation writes into it."""

    node: gs.Node
    weight: GemmWeight
    sites: list[Site]


@dataclass
class Region:
    """A grown region; ``refusal`` is None when the permutation can be carried through all of it."""

    channels: int
    producers: list[Layer] = field(default_factory=list)
    consumers: list[Layer] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    group: int = 0
    refusal: str | None = None


PERMUTATION_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)
"""Exact up to float summation order: permuted contractions add the same products in another order."""


class Refused(Exception):
    """The region cannot carry a permutation; the message says why in one line."""


class Shapes:
    """Static tensor shapes (ints, symbols or None per dim) from the model's ``value_info``; constants have their
    values' shape. Run ``shape-inference`` with ``symbolic=True`` first: its merged symbols tell, e.g., that
    attention probabilities and values share the sequence length."""

    def of(self, tensor: gs.Tensor) -> list[int | str | None] | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
        return None if tensor.shape is None else list(tensor.shape)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.of(tensor)
        return None if shape is None else len(shape)


def as_producer(node: gs.Node) -> tuple[Layout, Layer] | None:
    """The output layout and layer of a MatMul/Gemm/Conv(group 1) with a constant weight (and a constant bias,
    broadcastable per channel), else None."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op not in ("MatMul", "Gemm", "Conv") or not isinstance(weight, gs.Constant):
        return None
    bias = node.inputs[2] if node.op != "MatMul" and _has_input(node, 2) else None
    if bias is not None and not isinstance(bias, gs.Constant):
        return None
    w = weight.values
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1 or w.ndim < 3:
            return None
        sites = [Site(node, 1, (0,))] + ([Site(node, 2, (0,))] if bias is not None else [])
        gemm = GemmWeight(w.reshape(w.shape[0], -1).T, math.prod(w.shape[2:]))
        return Layout((1 - w.ndim,), (w.shape[0],)), Layer(node, gemm, sites)
    if w.ndim != 2:
        return None
    out_axis = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1
    layout = Layout((-1,), (w.shape[out_axis],))
    sites = [Site(node, 1, (out_axis,))]
    if bias is not None:
        role = _broadcast_role(list(bias.values.shape), layout)
        if role == "mismatch":
            return None
        sites += [Site(node, 2, (bias.values.ndim - 1,))] if role == "channels" else []
    return layout, Layer(node, GemmWeight(w.T if out_axis == 0 else w), sites)


def regions(graph: gs.Graph) -> Iterator[Region]:
    """Every region of ``graph`` once, grown from its first producer in node order (refused ones included).

    Regions are grown lazily, so a caller may permute one region before the next is grown."""
    shapes = Shapes()
    claimed: set[int] = set()
    for node in list(graph.nodes):
        if id(node) in claimed or as_producer(node) is None:
            continue
        region = grow_region(graph, node, shapes)
        claimed.update(id(layer.node) for layer in region.producers)
        yield region


def grow_region(graph: gs.Graph, start: gs.Node, shapes: Shapes) -> Region:
    """The region grown from producer ``start``'s output; its ``refusal`` says why it cannot be reordered."""
    growth = _Growth(graph, start, shapes)
    try:
        growth.run()
    except Refused as exc:
        growth.region.refusal = str(exc)
    return growth.region


class _Growth:
    """Breadth-first closure over region tensors: each tensor's producer node and all its readers must carry
    the channel layout; tensors they tie in join the region."""

    def __init__(self, graph: gs.Graph, start: gs.Node, shapes: Shapes) -> None:
        self.start = start
        self.start_layout = as_producer(start)[0]
        self.shapes = shapes
        self.graph_inputs = {t.name for t in graph.inputs}
        self.graph_outputs = {t.name for t in graph.outputs}
        self.subgraph_reads = _subgraph_reads(graph)
        self.region = Region(self.start_layout.channels)
        self.layouts: dict[str, Layout] = {}
        self.sources: set[int] = set()
        self.readers: dict[int, set[int]] = {}
        self.queue: deque[gs.Tensor] = deque()
        self.group = self.start_layout.group

    def run(self) -> None:
        self._producer(self.start, self.start.outputs[0], self.start_layout)
        while self.queue:
            tensor = self.queue.popleft()
            self._source(tensor)
            for node in {id(n): n for n in tensor.outputs}.values():
                for index, value in enumerate(node.inputs):
                    if value is tensor:
                        self._reader(node, index)
        if not self.region.consumers:
            raise Refused("the region has no consumer")
        self.region.group = math.gcd(self.group, self.region.channels)

    def _add(self, tensor: gs.Tensor, layout: Layout) -> None:
        """Make ``tensor`` a region tensor with ``layout`` (checking it against what is known of it)."""
        if layout.channels != self.region.channels:
            raise Refused(f"channel counts disagree: {layout.channels} at {tensor.name!r}, "
                          f"{self.region.channels} at the start")
        known = self.layouts.get(tensor.name)
        if known is not None:
            if known != layout:
                raise Refused(f"tensor {tensor.name!r} carries the channels in two layouts")
            return
        if tensor.name in self.graph_outputs or tensor.name in self.graph_inputs:
            kind = "output" if tensor.name in self.graph_outputs else "input"
            raise Refused(f"reaches graph {kind} {tensor.name!r}")
        if tensor.name in self.subgraph_reads:
            raise Refused(f"tensor {tensor.name!r} is read inside a subgraph")
        if _broadcast_role(self.shapes.of(tensor), layout) != "channels":
            raise Refused(f"tensor {tensor.name!r} of shape {self.shapes.of(tensor)} does not hold the channels "
                          f"{layout.sizes} on axes {layout.axes}")
        self.layouts[tensor.name] = layout
        self.group = math.gcd(self.group, layout.group)
        self.queue.append(tensor)

    def _source(self, tensor: gs.Tensor) -> None:
        """Visit the node that writes ``tensor``: a producer or a layout-preserving pass-through node."""
        node = tensor.inputs[0]
        if id(node) in self.sources:
            return
        layout = self.layouts[tensor.name]
        if as_producer(node) is not None:
            self._producer(node, tensor, layout)
        elif _preserves_layout(node):
            self._through(node, layout)
        else:
            raise Refused(f"reaches {_describe(node)} backwards")

    def _producer(self, node: gs.Node, tensor: gs.Tensor, layout: Layout) -> None:
        produced, layer = as_producer(node)
        if produced != layout:
            raise Refused(f"{_describe(node)} writes channels as {produced}, the region needs {layout}")
        self.sources.add(id(node))
        self.region.producers.append(layer)
        self.region.sites += layer.sites
        self._add(tensor, layout)

    def _reader(self, node: gs.Node, index: int) -> None:
        """Visit a node reading a region tensor at ``index``: a consumer or a pass-through node."""
        accepted = self.readers.get(id(node))
        if accepted is not None:
            if index not in accepted:
                raise Refused(f"the region reaches {_describe(node)} at a second input")
            return
        layout = self.layouts[node.inputs[index].name]
        if node.op in SHAPE_READERS:
            self._visited(node, [index])
        elif _is_consumer(node, index):
            self._consumer(node, layout)
        elif node.op in ("MatMul", "Gemm", "Conv") and index == 0 and not isinstance(node.inputs[1], gs.Constant):
            raise Refused(f"reaches {_describe(node)} whose weight is not constant")
        elif node.op == "MatMul" and index == 1:
            self._attention_matmul(node, layout)
        elif node.op in ("Reshape", "Transpose") and index == 0:
            self._reshape_or_transpose(node, layout)
        elif _preserves_layout(node):
            self._through(node, layout)
        else:
            raise Refused(f"reaches {_describe(node)}")

    def _consumer(self, node: gs.Node, layout: Layout) -> None:
        w = node.inputs[1].values
        if node.op == "Conv":
            wanted, channel_axis = (1 - w.ndim,), 1
            gemm = GemmWeight(w.reshape(w.shape[0], -1).T, math.prod(w.shape[2:]))
        else:
            wanted = (-1,)
            channel_axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
            gemm = GemmWeight(w.T if channel_axis == 1 else w)
        if layout.axes != wanted:
            raise Refused(f"{_describe(node)} reads the channels on another axis ({layout.axes})")
        if w.shape[channel_axis] != self.region.channels:
            raise Refused(f"channel counts disagree: {_describe(node)} reads {w.shape[channel_axis]}, "
                          f"the region has {self.region.channels}")
        layer = Layer(node, gemm, [Site(node, 1, (channel_axis,))])
        self.readers[id(node)] = {0}
        self.region.consumers.append(layer)
        self.region.sites += layer.sites

    def _attention_matmul(self, node: gs.Node, layout: Layout) -> None:
        """``MatMul(A, B)`` with ``B`` in the region: the channels (or a head's dims) must be ``B``'s last axis and
        the head axis a batch axis; ``A`` stays outside and both must be at least 2-D."""
        a, b = node.inputs[:2]
        ranks = (self.shapes.rank(a), self.shapes.rank(b))
        if a.name in self.layouts or None in ranks or min(ranks) < 2:
            raise Refused(f"reaches {_describe(node)} with an operand that is not at least 2-D")
        if layout.axes[-1] != -1 or (len(layout.axes) == 2 and layout.axes[0] > -3):
            raise Refused(f"reaches {_describe(node)} on its contracted axis")
        self._visited(node, [1])
        self._add(node.outputs[0], layout)

    def _reshape_or_transpose(self, node: gs.Node, layout: Layout) -> None:
        if node.op == "Reshape":
            moved = _reshaped(layout, self.shapes.of(node.inputs[0]), _reshape_target(node, self.shapes))
        else:
            moved = _transposed(layout, node.attrs.get("perm"), self.shapes.rank(node.inputs[0]))
        if moved is None:
            raise Refused(f"reaches {_describe(node)}, which does not carry the channel layout")
        self._visited(node, [0])
        self._add(node.outputs[0], moved)

    def _through(self, node: gs.Node, layout: Layout) -> None:
        """A node whose output keeps ``layout``: its channel-carrying inputs join the region with it, its
        per-channel constants are permuted."""
        if any(out.outputs or out.name in self.graph_outputs for out in node.outputs[1:]):
            raise Refused(f"reaches {_describe(node)} with more than one output in use")
        carried, sites = self._through_inputs(node, layout)
        self.region.sites += sites
        self._visited(node, carried)
        for index in carried:
            self._add(node.inputs[index], layout)
        self._add(node.outputs[0], layout)

    def _through_inputs(self, node: gs.Node, layout: Layout) -> tuple[list[int], list[Site]]:
        """For a layout-preserving node: the variable inputs that carry the channels and the sites of its
        per-channel constants; Refused when an input can be neither."""
        if node.op in ELEMENTWISE:
            carried, sites = [], []
            for index, tensor in enumerate(node.inputs):
                role = _broadcast_role(self.shapes.of(tensor), layout)
                if isinstance(tensor, gs.Constant) and role == "channels":
                    sites.append(Site(node, index, tuple(tensor.values.ndim + a for a in layout.axes)))
                elif role == "mismatch":
                    raise Refused(f"reaches {_describe(node)}: input {tensor.name!r} of shape {self.shapes.of(tensor)} "
                                  f"does not broadcast per channel {layout.sizes}")
                elif not isinstance(tensor, gs.Constant) and role == "channels":
                    carried.append(index)
            return carried, sites
        if node.op == "BatchNormalization":
            return [0], _batchnorm_sites(node, layout, self.shapes.rank(node.inputs[0]))
        if node.op == "Conv":
            return [0], _depthwise_sites(node, layout)
        if node.op == "Clip" and not all(isinstance(t, gs.Constant) and t.values.size == 1
                                         for t in node.inputs[1:] if t.name != ""):
            raise Refused(f"reaches {_describe(node)} whose bounds are not constant scalars")
        if node.op == "Cast" and node.attrs.get("to") not in FLOAT_TYPES:
            raise Refused(f"reaches {_describe(node)} to a non-float type")
        return [0], []

    def _visited(self, node: gs.Node, region_inputs: list[int]) -> None:
        self.sources.add(id(node))
        self.readers[id(node)] = set(region_inputs)


def _is_consumer(node: gs.Node, index: int) -> bool:
    """MatMul/Gemm(transA=0) reading the region as input 0 with a constant weight, or a group-1 Conv."""
    if index != 0 or node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        return False
    if node.op == "Conv":
        return node.attrs.get("group", 1) == 1 and w.values.ndim >= 3
    return w.values.ndim == 2 and not (node.op == "Gemm" and node.attrs.get("transA", 0))


def _preserves_layout(node: gs.Node) -> bool:
    """Whether the node's output holds the channels exactly where its channel-carrying inputs do."""
    if node.op in UNARY or node.op in ELEMENTWISE or node.op == "BatchNormalization":
        return True
    return node.op == "Conv" and _is_depthwise(node)


def _is_depthwise(node: gs.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    group = node.attrs.get("group", 1)
    return (isinstance(w, gs.Constant) and group > 1 and w.values.ndim >= 3 and w.values.shape[0] == group
            and w.values.shape[1] == 1)


def _broadcast_role(shape: list[int | str | None] | None, layout: Layout) -> str:
    """How a tensor of ``shape`` meets a region tensor elementwise: ``"invariant"`` when it broadcasts along the
    (head's) channel axis, ``"channels"`` when it holds the channels (or its shape is unknown), else
    ``"mismatch"``."""
    if shape is None:
        return "channels"
    dims = [(shape[a] if isinstance(shape[a], int) else None) if -a <= len(shape) else 1 for a in layout.axes]
    if dims[-1] == 1:
        return "invariant"
    if all(d is None or d == size for d, size in zip(dims, layout.sizes)):
        return "channels"
    return "mismatch"


def _batchnorm_sites(node: gs.Node, layout: Layout, rank: int | None) -> list[Site]:
    if rank is None or layout.axes != (1 - rank,):
        raise Refused(f"reaches {_describe(node)} whose input does not hold the channels on axis 1 (or has no rank)")
    if not all(isinstance(t, gs.Constant) and t.values.shape == layout.sizes for t in node.inputs[1:5]):
        raise Refused(f"reaches {_describe(node)} whose parameters are not constants of {layout.sizes}")
    return [Site(node, index, (0,)) for index in range(1, 5)]


def _depthwise_sites(node: gs.Node, layout: Layout) -> list[Site]:
    w = node.inputs[1].values
    if layout.axes != (1 - w.ndim,) or w.shape[0] != layout.channels:
        raise Refused(f"reaches {_describe(node)} whose channels do not match the region's")
    if not _has_input(node, 2):
        return [Site(node, 1, (0,))]
    if not isinstance(node.inputs[2], gs.Constant):
        raise Refused(f"reaches {_describe(node)} whose bias is not constant")
    return [Site(node, 1, (0,)), Site(node, 2, (0,))]


def _reshaped(layout: Layout, source: list | None, target: list | None) -> Layout | None:
    """The layout after a Reshape from ``source`` to ``target`` dims: unchanged when both are the same known
    shape; otherwise the channels must be the trailing block and are split into ``[H, D]``, merged from
    ``[H, D]`` into ``H * D`` or kept as the last axis. None when the Reshape does not carry them."""
    if source is not None and source == target and None not in source:
        return layout
    if target is None or layout.axes != tuple(range(-len(layout.axes), 0)):
        return None
    channels = layout.channels
    if target[-1] == channels:
        return Layout((-1,), (channels,))
    if len(target) >= 2 and all(isinstance(d, int) for d in target[-2:]) and target[-2] * target[-1] == channels:
        return Layout((-2, -1), (target[-2], target[-1]))
    return None


def _reshape_target(node: gs.Node, shapes: Shapes) -> list | None:
    """The Reshape's output dims: inferred, else read from a constant shape input (None for 0 and -1)."""
    inferred = shapes.of(node.outputs[0])
    if inferred:
        return inferred
    target = node.inputs[1]
    if isinstance(target, gs.Constant) and target.values.ndim == 1 and target.values.size:
        return [int(d) if d > 0 else None for d in target.values]
    return None


def _transposed(layout: Layout, perm: list[int] | None, rank: int | None) -> Layout | None:
    """The layout after a Transpose with ``perm`` (default: reversed, which needs the ``rank``)."""
    if perm is None and rank is not None:
        perm = list(range(rank - 1, -1, -1))
    if perm is None or -min(layout.axes) > len(perm):
        return None
    return Layout(tuple(list(perm).index(a + len(perm)) - len(perm) for a in layout.axes), layout.sizes)


def apply_permutation(region: Region, permutation: np.ndarray, graph: gs.Graph, names: set[str]) -> None:
    """Permute every site of the region. A constant used only by sites of this region with the same axes is
    rewritten in place; otherwise each site gets a permuted copy under a new name."""
    by_tensor: dict[int, list[Site]] = {}
    for site in region.sites:
        by_tensor.setdefault(id(site.node.inputs[site.index]), []).append(site)
    elsewhere = {t.name for t in graph.outputs} | _subgraph_reads(graph)
    for sites in by_tensor.values():
        tensor = sites[0].node.inputs[sites[0].index]
        owned = (len(sites) == len(tensor.outputs) and len({s.axes for s in sites}) == 1
                 and tensor.name not in elsewhere)
        if owned:
            tensor.values = permute(tensor.values, sites[0].axes, permutation)
            continue
        for site in sites:
            current = site.node.inputs[site.index]
            name = unique_name(names, f"{current.name}_reordered")
            site.node.inputs[site.index] = gs.Constant(name, permute(current.values, site.axes, permutation))


def permute(values: np.ndarray, axes: tuple[int, ...], permutation: np.ndarray) -> np.ndarray:
    """``values`` with the channels held on ``axes`` (one axis, or head and dim axes: channel = h * D + d)
    reordered so that new channel ``i`` is old channel ``permutation[i]``."""
    trailing = tuple(range(-len(axes), 0))
    moved = np.moveaxis(values, axes, trailing)
    flat = moved.reshape(*moved.shape[: moved.ndim - len(axes)], -1)
    taken = np.take(flat, permutation, axis=-1).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(taken, trailing, axes))


def _subgraph_reads(graph: gs.Graph) -> set[str]:
    """Names of the tensors nodes of nested subgraphs read (outer-scope reads are invisible to ``outputs``)."""
    return {t.name for sub in graph.subgraphs(recursive=True) for node in sub.nodes for t in node.inputs}


def _has_input(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index].name != ""


def _describe(node: gs.Node) -> str:
    return f"{node.op} {node.name!r}"
