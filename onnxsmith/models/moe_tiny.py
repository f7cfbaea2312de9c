"""``moe-tiny``: a tiny Hunyuan-Large-style mixture-of-experts decoder over raw UTF-8 bytes.

Architecture (fixed-seed weights, untrained):

* byte embedding (256 x 64), 4 decoder layers, final RMSNorm, untied LM head -> logits ``[batch, seq, 256]``;
* attention: grouped-query (4 query heads, 2 KV heads, head dim 16), causal, rotary position embedding, and
  Cross-Layer Attention with share factor 2: odd layers own no k/v projection and attend over the (rotated)
  K/V computed by the preceding even layer;
* feed-forward: a shared SiLU-gated expert (hidden 128) applied to every token plus 4 routed experts of the
  same shape; the router ``gate`` (Linear 64 -> 4) runs in fp32, each token goes to its top-1 expert and that
  expert's output is scaled by the expert's softmax probability (not renormalised); no token is dropped.

Routing is exported as real per-token dispatch (``ArgMax`` -> ``NonZero`` -> ``Gather`` -> expert ->
``ScatterElements``-add), so each routed expert's MatMuls only see the tokens routed to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from onnxsmith.models.base import Feed, Outputs, ZooModel
from onnxsmith.models.lm_metrics import next_token_summary, perplexity_scores
from onnxsmith.models.text_data import pydoc_text

VOCAB = 256
HIDDEN = 64
LAYERS = 4
QUERY_HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN_HIDDEN = 128
ROUTED_EXPERTS = 4
CLA_SHARE = 2
ROPE_BASE = 10000.0
SEED = 0
ROUTER_LOGIT_STD = 2.0
"""Standard deviation of the router logits for a unit-RMS input: the softmax is neither flat nor saturated."""

WINDOW = 128
EVAL_WINDOWS = 32
CALIBRATION_WINDOWS = 16
CALIBRATION_OFFSET = 200_000


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (epsilon 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables ``[seq, HEAD_DIM]`` for rotate-half rotary embedding at positions ``0..seq-1``."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=device) / HEAD_DIM)
    angles = torch.arange(seq, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., seq, HEAD_DIM]`` by the tables from :func:`rotary_tables`."""
    half = HEAD_DIM // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


KV = tuple[torch.Tensor, torch.Tensor]
"""Shared keys and values, each ``[batch, KV_HEADS, 1, seq, HEAD_DIM]``; keys already rotated."""


class Attention(nn.Module):
    """Causal grouped-query attention; with ``owns_kv=False`` it has no k/v projection and reads the given K/V."""

    def __init__(self, owns_kv: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, QUERY_HEADS * HEAD_DIM, bias=False)
        if owns_kv:
            self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
            self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(QUERY_HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.owns_kv = owns_kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KV | None) -> tuple[torch.Tensor, KV]:
        """Attend ``x [batch, seq, HIDDEN]``; returns the output and the K/V it used (its own or ``kv``)."""
        batch, seq = x.shape[0], x.shape[1]
        group = QUERY_HEADS // KV_HEADS
        # Query head h reads KV head h // group: [batch, KV_HEADS, group, seq, HEAD_DIM].
        q = self.q_proj(x).view(batch, seq, KV_HEADS, group, HEAD_DIM).permute(0, 2, 3, 1, 4)
        q = apply_rotary(q, cos, sin)
        if self.owns_kv:
            k = self.k_proj(x).view(batch, seq, KV_HEADS, 1, HEAD_DIM).permute(0, 2, 3, 1, 4)
            v = self.v_proj(x).view(batch, seq, KV_HEADS, 1, HEAD_DIM).permute(0, 2, 3, 1, 4)
            kv = (apply_rotary(k, cos, sin), v)
        elif kv is None:
            raise ValueError("a layer without k/v projections needs the previous layer's K/V")
        keys, values = kv
        scores = torch.matmul(q, keys.transpose(-1, -2)) * HEAD_DIM**-0.5
        positions = torch.arange(seq, device=x.device)
        future = positions[None, :] > positions[:, None]
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out = torch.matmul(probs, values).permute(0, 3, 1, 2, 4).reshape(batch, seq, QUERY_HEADS * HEAD_DIM)
        return self.o_proj(out), kv


class Expert(nn.Module):
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))`` with hidden size ``FFN_HIDDEN``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.down_proj = nn.Linear(FFN_HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Shared expert on every token plus top-1 routed experts, dispatched per token (no dense expert product)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_expert = Expert()
        self.experts = nn.ModuleList(Expert() for _ in range(ROUTED_EXPERTS))
        self.gate = nn.Linear(HIDDEN, ROUTED_EXPERTS, bias=False)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 routing of ``tokens [n, HIDDEN]`` in fp32: (chosen expert ``[n]`` int64, its probability ``[n]``)."""
        probs = torch.softmax(self.gate(tokens.float()), dim=-1)
        weight, choice = probs.max(dim=-1)
        return choice, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, HIDDEN)
        choice, weight = self.route(tokens)
        out = self.shared_expert(tokens)
        for index, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == index).squeeze(1)
            routed = expert(tokens.index_select(0, rows)) * weight.index_select(0, rows).unsqueeze(1)
            out = out.scatter_add(0, rows.unsqueeze(1).expand(-1, HIDDEN), routed)
        return out.reshape(x.shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + moe(norm(x))``."""

    def __init__(self, owns_kv: bool) -> None:
        super().__init__()
        self.input_norm = RMSNorm(HIDDEN)
        self.attn = Attention(owns_kv)
        self.post_attention_norm = RMSNorm(HIDDEN)
        self.mlp = MoE()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KV | None) -> tuple[torch.Tensor, KV]:
        attended, kv = self.attn(self.input_norm(x), cos, sin, kv)
        x = x + attended
        return x + self.mlp(self.post_attention_norm(x)), kv


class MoeTinyLM(nn.Module):
    """The whole decoder: ``input_ids [batch, seq] int64 -> logits [batch, seq, VOCAB]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(DecoderLayer(owns_kv=i % CLA_SHARE == 0) for i in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = rotary_tables(input_ids.shape[1], x.device)
        kv: KV | None = None
        for layer in self.layers:
            x, kv = layer(x, cos, sin, kv)
        return self.lm_head(self.norm(x))


def build_torch_model() -> MoeTinyLM:
    """The fixed-seed ``moe-tiny`` module in eval mode; identical on every call, global RNG state untouched.

    Init (after ``torch.manual_seed(0)``): embedding N(0, 1); every projection N(0, 1/fan_in), with the
    residual-writing ones (``o_proj``, ``down_proj``) further scaled by 1/sqrt(2 * LAYERS) so the residual stream
    stays near unit RMS; router ``gate`` N(0, ROUTER_LOGIT_STD^2 / HIDDEN) so router logits have std about
    ROUTER_LOGIT_STD. With this seed every expert of every layer gets at least 8% of the evaluation tokens.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MoeTinyLM()
        with torch.no_grad():
            nn.init.normal_(model.embed.weight, std=1.0)
            for name, module in model.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                std = module.in_features**-0.5
                if name.endswith(("o_proj", "down_proj")):
                    std /= (2 * LAYERS) ** 0.5
                elif name.endswith("mlp.gate"):
                    std *= ROUTER_LOGIT_STD
                nn.init.normal_(module.weight, std=std)
    return model.eval()


def expert_token_counts(model: MoeTinyLM, input_ids: torch.Tensor) -> np.ndarray:
    """Tokens routed to each expert by each layer for ``input_ids``: int64 array ``[LAYERS, ROUTED_EXPERTS]``."""
    counts = np.zeros((LAYERS, ROUTED_EXPERTS), dtype=np.int64)

    def recorder(layer: int) -> Callable[[MoE, tuple[torch.Tensor], torch.Tensor], None]:
        def hook(module: MoE, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
            choice, _ = module.route(inputs[0].reshape(-1, HIDDEN))
            counts[layer] += np.bincount(choice.numpy(), minlength=ROUTED_EXPERTS)

        return hook

    handles = [layer.mlp.register_forward_hook(recorder(i)) for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@lru_cache(maxsize=1)
def _text_bytes() -> np.ndarray:
    """The pydoc text as UTF-8 bytes (uint8)."""
    return np.frombuffer(pydoc_text().encode("utf-8"), dtype=np.uint8)


def _windows(offset: int, count: int) -> list[Feed]:
    """``count`` consecutive ``WINDOW``-byte windows starting at byte ``offset``, one ``[1, WINDOW]`` feed each."""
    data = _text_bytes()
    return [
        {"input_ids": data[offset + i * WINDOW : offset + (i + 1) * WINDOW].astype(np.int64)[None, :]}
        for i in range(count)
    ]


class MoeTiny(ZooModel):
    """Tiny Hunyuan-Large-style MoE decoder (GQA + CLA + shared/routed top-1 experts) over UTF-8 bytes.

    Feeds: ``input_ids`` int64 ``[1, 128]`` byte windows of the pydoc text; evaluation = the first 32 windows,
    calibration = windows from byte 200,000 on (disjoint). ``reduce_outputs`` keeps ``nll`` (float64
    ``[batch, seq-1]``, negative log-likelihood of each next byte) and ``argmax`` (int64 ``[batch, seq]``).

    Score keys: ``perplexity`` (exp of the candidate's mean next-byte NLL), ``perplexity_fp`` (the same for the
    FP32 reference) and ``top1_agreement`` (fraction of positions whose argmax byte matches the reference).
    """

    name = "moe-tiny"
    task = "causal-lm"
    description = "tiny Hunyuan-Large-style MoE byte decoder (GQA + cross-layer KV sharing, shared + 4 top-1 experts)"
    metric = "next-byte perplexity and top-1 agreement on pydoc text"
    version = "1"
    extra = None

    def export(self, path: Path) -> None:
        """Export with the TorchScript exporter (opset 17); dynamic batch and sequence axes.

        The legacy exporter is used deliberately (it traces the data-dependent routing into plain ``NonZero``
        dispatch without extra shape guards), so its deprecation warnings are silenced.
        """
        model = build_torch_model()
        example = torch.from_numpy(self.evaluation_feeds(1)[0]["input_ids"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
            )

    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """Up to ``count`` (default 16) windows from byte 200,000 on."""
        return _windows(CALIBRATION_OFFSET, CALIBRATION_WINDOWS if count is None else min(count, CALIBRATION_WINDOWS))

    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """The first ``count`` (default all 32) windows from the start of the text."""
        return _windows(0, EVAL_WINDOWS if count is None else min(count, EVAL_WINDOWS))

    def reduce_outputs(self, index: int, outputs: Outputs) -> Outputs:
        """Per-token next-byte NLL and argmax ids of evaluation feed ``index``."""
        return next_token_summary(outputs["logits"], _windows(index * WINDOW, 1)[0]["input_ids"])

    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Perplexities of candidate and reference, and their top-1 agreement (see the class docstring)."""
        return perplexity_scores(reference, candidate)
