"""Tiny torch MoE and cached-attention modules exported to ONNX, with routing the tests choose."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HIDDEN = 8
FFN = 16
EXPERTS = 3
ROUTER_GAIN = 10.0


class Expert(nn.Module):
    """SiLU-gated MLP ``down(silu(gate(x)) * up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.inner(x))


class ToyMoE(nn.Module):
    """``x [tokens, HIDDEN]`` -> shared expert + top-1 routed experts; token t goes to ``argmax(x[t, :EXPERTS])``
    (chosen by ``ArgMax``, or by ``TopK(1)`` with ``topk=True``).

    ``dense=False`` dispatches rows (NonZero / Gather / ScatterElements); ``dense=True`` runs every expert on every
    token and masks by ``one_hot(choice) * probability``.
    """

    def __init__(self, dense: bool, topk: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.dense, self.topk = dense, topk
        self.shared_expert = Expert()
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
            self.gate.weight.zero_()
            self.gate.weight[:, :EXPERTS] = torch.eye(EXPERTS) * ROUTER_GAIN

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x), dim=-1)
        if self.topk:
            weight, choice = probs.topk(1, dim=-1)
            return choice.squeeze(1), weight.squeeze(1)
        weight, choice = probs.max(dim=-1)
        return choice, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice, weight = self.route(x)
        out = self.shared_expert(x)
        if self.dense:
            gates = F.one_hot(choice, EXPERTS).to(x.dtype) * weight.unsqueeze(1)
            for index, expert in enumerate(self.experts):
                out = out + expert(x) * gates[:, index : index + 1]
            return out
        for index, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == index).squeeze(1)
            routed = expert(x.index_select(0, rows)) * weight.index_select(0, rows).unsqueeze(1)
            out = out.scatter_add(0, rows.unsqueeze(1).expand(-1, HIDDEN), routed)
        return out


def export_moe(path: Path, dense: bool, topk: bool = False) -> Path:
    """Export :class:`ToyMoE` (input ``x``, output ``y``, dynamic token axis) to ``path``."""
    tokens = torch.from_numpy(moe_tokens(16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ToyMoE(dense, topk).eval(), (tokens,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}})
    return path


def moe_tokens(count: int, seed: int = 0, idle_expert: int | None = None) -> np.ndarray:
    """``count`` random tokens; with ``idle_expert`` no token routes to that expert."""
    x = np.random.default_rng(seed).standard_normal((count, HIDDEN)).astype(np.float32)
    if idle_expert is not None:
        x[:, idle_expert] = -10.0
    return x


def routed_to(x: np.ndarray, expert: int) -> np.ndarray:
    """The rows of ``x`` routed to ``expert``."""
    return x[np.argmax(x[:, :EXPERTS], axis=1) == expert]


KV_HEADS = 2
HEAD_DIM = 4


class CachedCla(nn.Module):
    """Two attention layers with a KV cache; layer 1 owns no K/V and reads layer 0's (cross-layer attention).

    Inputs ``x [batch, seq, HIDDEN]``, ``past_key`` / ``past_value [batch, KV_HEADS, past, HEAD_DIM]``; outputs
    ``y`` and ``present_key`` / ``present_value`` (past + new along axis 2).
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        width = KV_HEADS * HEAD_DIM
        self.q0, self.q1 = nn.Linear(HIDDEN, width, bias=False), nn.Linear(HIDDEN, width, bias=False)
        self.k, self.v = nn.Linear(HIDDEN, width, bias=False), nn.Linear(HIDDEN, width, bias=False)
        self.o0, self.o1 = nn.Linear(width, HIDDEN, bias=False), nn.Linear(width, HIDDEN, bias=False)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], KV_HEADS, HEAD_DIM).transpose(1, 2)

    def _attend(self, q: nn.Linear, o: nn.Linear, x: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self._heads(q(x)), keys.transpose(-1, -2)) * HEAD_DIM**-0.5
        mixed = torch.matmul(torch.softmax(scores, dim=-1), values).transpose(1, 2)
        return o(mixed.reshape(x.shape[0], x.shape[1], KV_HEADS * HEAD_DIM))

    def forward(self, x: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = torch.cat([past_key, self._heads(self.k(x))], dim=2)
        values = torch.cat([past_value, self._heads(self.v(x))], dim=2)
        x = x + self._attend(self.q0, self.o0, x, keys, values)
        return x + self._attend(self.q1, self.o1, x, keys, values), keys, values


def export_cached_cla(path: Path) -> Path:
    """Export :class:`CachedCla` with dynamic batch, sequence and past axes."""
    x = torch.from_numpy(cla_feed(5, 3)["x"])
    past = torch.zeros(1, KV_HEADS, 3, HEAD_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CachedCla().eval(), (x, past, past), str(path), dynamo=False, opset_version=17,
                          input_names=["x", "past_key", "past_value"],
                          output_names=["y", "present_key", "present_value"],
                          dynamic_axes={"x": {1: "seq"}, "past_key": {2: "past"}, "past_value": {2: "past"},
                                        "y": {1: "seq"}, "present_key": {2: "total"}, "present_value": {2: "total"}})
    return path


def cla_feed(seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for :func:`export_cached_cla` with ``seq`` new tokens and ``past`` cached ones."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32),
            "past_key": rng.standard_normal((1, KV_HEADS, past, HEAD_DIM)).astype(np.float32),
            "past_value": rng.standard_normal((1, KV_HEADS, past, HEAD_DIM)).astype(np.float32)}
