"""Pattern detection shared by passes: which tensors are post-Softmax or post-GELU inputs of GEMMs.

Tolerates what exporters put in between (Identity, Cast, Dropout in inference, the ``Where(IsNaN(p), 0, p)``
guard of SDPA exports) and both GELU forms: the opset-20
``Gelu`` op and the Erf decomposition ``x · 0.5 · (1 + erf(x / √2))`` in any association order. A SiLU-gated
product (``silu(gate) · up``, LLaMA-style MLPs) is reported as its own kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

GEMM_OPS = ("MatMul", "Gemm")
PASS_THROUGH = ("Identity", "Cast", "Dropout")
ELEMENTWISE = ("Add", "Mul", "Div")


@dataclass
class ActivationSite:
    """A tensor of a known distribution that GEMMs read: ``kind`` is 'softmax', 'gelu' or 'silu-gated'.

    ``consumers`` lists (GEMM node, input index) pairs reading it (through pass-through nodes, whose output is
    then ``tensor``).
    """

    tensor: gs.Tensor
    kind: str
    consumers: list[tuple[gs.Node, int]] = field(default_factory=list)


def find_activation_sites(graph: gs.Graph) -> list[ActivationSite]:
    """Every post-Softmax, post-GELU and SiLU-gated tensor that feeds a MatMul or Gemm, in graph order.

    Post-Softmax sites count only where the tensor is the *first* MatMul input (attention probabilities @ V).
    """
    sites = []
    for node in graph.nodes:
        kind_and_output = _classify(node)
        if kind_and_output is None:
            continue
        kind, output = kind_and_output
        output = _skip_pass_through(output)
        consumers = [
            (consumer, index)
            for consumer in output.outputs
            if consumer.op in GEMM_OPS
            for index, tensor in enumerate(consumer.inputs[:2])
            if tensor is output and (kind != "softmax" or (consumer.op == "MatMul" and index == 0))
        ]
        if consumers:
            sites.append(ActivationSite(output, kind, consumers))
    return sites


def _classify(node: gs.Node) -> tuple[str, gs.Tensor] | None:
    if node.op == "Softmax":
        return "softmax", node.outputs[0]
    if node.op == "Gelu":
        return "gelu", node.outputs[0]
    if node.op == "Erf":
        output = _erf_gelu_output(node)
        return ("gelu", output) if output is not None else None
    if node.op == "Sigmoid":
        output = _silu_gated_output(node)
        return ("silu-gated", output) if output is not None else None
    return None


def _erf_gelu_output(erf: gs.Node) -> gs.Tensor | None:
    """The output of the Erf-decomposed GELU around ``erf``, or None if the chain does not close on its input."""
    scaled = erf.inputs[0]
    if len(scaled.inputs) != 1 or scaled.inputs[0].op not in ("Div", "Mul"):
        return None
    x = _variable_input(scaled.inputs[0])
    if x is None:
        return None
    tensor, used_x = erf.outputs[0], False
    for _ in range(4):  # Add(1), Mul(x), Mul(0.5) in some order, possibly with x·0.5 computed first
        if len(tensor.outputs) != 1 or tensor.outputs[0].op not in ELEMENTWISE:
            break
        step = tensor.outputs[0]
        other = [t for t in step.inputs if t is not tensor]
        if any(t is x or _derives_from(t, x) for t in other):
            used_x = True
        elif not all(_is_constant(t) for t in other):
            return None
        tensor = step.outputs[0]
    return tensor if used_x else None


def _silu_gated_output(sigmoid: gs.Node) -> gs.Tensor | None:
    """``Mul(Mul(g, Sigmoid(g)), up)``'s output for the Sigmoid of a SiLU, else None."""
    gate = sigmoid.inputs[0]
    silu = next((n for n in sigmoid.outputs[0].outputs if n.op == "Mul" and gate in n.inputs), None)
    if silu is None or len(silu.outputs[0].outputs) != 1:
        return None
    gated = silu.outputs[0].outputs[0]
    if gated.op != "Mul":
        return None
    return gated.outputs[0]


def _variable_input(node: gs.Node) -> gs.Tensor | None:
    variables = [t for t in node.inputs if not _is_constant(t)]
    return variables[0] if len(variables) == 1 else None


def _is_constant(tensor: gs.Tensor) -> bool:
    """An initializer, or the output of a ``Constant`` node (before constants-to-initializers ran)."""
    return isinstance(tensor, gs.Constant) or (len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant")


def _derives_from(tensor: gs.Tensor, x: gs.Tensor) -> bool:
    """True for ``x · c`` or ``x / c`` with a constant c (the '0.5 · x' half of some GELU exports)."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ("Mul", "Div"):
        return False
    producer = tensor.inputs[0]
    return x in producer.inputs and all(_is_constant(t) for t in producer.inputs if t is not x)


def _skip_pass_through(tensor: gs.Tensor) -> gs.Tensor:
    """Follow Identity/Cast/Dropout and NaN guards ``Where(IsNaN(t), c, t)`` (SDPA exports) downstream."""
    while True:
        consumers = tensor.outputs
        if len(consumers) == 1 and consumers[0].op in PASS_THROUGH:
            tensor = consumers[0].outputs[0]
            continue
        guard = _nan_guard(tensor)
        if guard is None:
            return tensor
        tensor = guard


def _nan_guard(tensor: gs.Tensor) -> gs.Tensor | None:
    """The output of ``Where(IsNaN(tensor), c, tensor)`` when that is all ``tensor`` feeds, else None."""
    ops = sorted(c.op for c in tensor.outputs)
    if ops != ["IsNaN", "Where"]:
        return None
    is_nan = next(c for c in tensor.outputs if c.op == "IsNaN")
    where = next(c for c in tensor.outputs if c.op == "Where")
    if where.inputs[0] is not is_nan.outputs[0] or where.inputs[2] is not tensor:
        return None
    return where.outputs[0]
