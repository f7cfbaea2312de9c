"""``moe-tiny``: a tiny Hunyuan-Large-style mixture-of-experts decoder over raw UTF-8 bytes, trained on pydoc text.

Architecture (weights trained by :mod:`onnxsmith.models.train_moe_tiny`, shipped in ``weights/moe_tiny.npz``):

* byte embedding (256 x 64), 4 decoder layers, final RMSNorm, untied LM head -> logits ``[batch, seq, 256]``;
* attention: grouped-query (4 query heads, 2 KV heads, head dim 16), causal, rotary position embedding, and
  Cross-Layer Attention with share factor 2: odd layers own no k/v projection and attend over the (rotated)
  K/V of the preceding even layer;
* KV cache: each KV-owning layer (:data:`CACHE_LAYERS`) takes its past rotated keys and values, appends the new
  tokens' K/V and returns the concatenation as its present, so one call is either a prefill (empty past) or a
  decode step;
* feed-forward: a shared SiLU-gated expert (hidden 128) applied to every token plus 4 routed experts of the
  same shape; the router ``gate`` (Linear 64 -> 4) runs in fp32, each token goes to its top-1 expert and that
  expert's output is scaled by the expert's softmax probability (not renormalised); no token is dropped.

``moe-tiny`` exports routing as real per-token dispatch (``ArgMax`` -> ``NonZero`` -> ``Gather`` -> expert ->
``ScatterElements``-add), so each routed expert's MatMuls only see the tokens routed to it. ``moe-tiny-dense``
holds the same weights but runs every routed expert on every token and masks their outputs with a ``OneHot``
gate scaled by the router probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from onnxsmith.models.base import ZooModel
from onnxsmith.core.feeds import Feed, Outputs
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
"""Standard deviation of the initial router logits for a unit-RMS input: the softmax is neither flat nor saturated."""

CACHE_LAYERS = tuple(range(0, LAYERS, CLA_SHARE))
"""The KV-owning layers (0 and 2): the only layers with KV-cache inputs and outputs."""

WEIGHTS_PATH = Path(__file__).parent / "weights" / "moe_tiny.npz"
"""Trained ``MoeTinyLM`` weights: one float32 array per ``state_dict`` key."""

WINDOW = 128
EVAL_WINDOWS = 32
CALIBRATION_WINDOWS = 16
CALIBRATION_OFFSET = 200_000


def past_names() -> list[str]:
    """KV-cache graph inputs, in order: ``past_key.L``, ``past_value.L`` for each ``L`` in :data:`CACHE_LAYERS`."""
    return [f"past_{kind}.{layer}" for layer in CACHE_LAYERS for kind in ("key", "value")]


def present_names() -> list[str]:
    """KV-cache graph outputs, in the order of :func:`past_names`: ``present_key.L``, ``present_value.L``."""
    return [f"present_{kind}.{layer}" for layer in CACHE_LAYERS for kind in ("key", "value")]


def empty_past(batch: int = 1) -> Feed:
    """Zero-length past for a prefill: each :func:`past_names` input float32 ``[batch, KV_HEADS, 0, HEAD_DIM]``."""
    return {name: np.zeros((batch, KV_HEADS, 0, HEAD_DIM), dtype=np.float32) for name in past_names()}


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (epsilon 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables ``[seq, HEAD_DIM]`` for rotate-half rotary embedding at int64 ``positions [seq]``."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=positions.device) / HEAD_DIM)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., seq, HEAD_DIM]`` by the tables from :func:`rotary_tables`."""
    half = HEAD_DIM // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


KV = tuple[torch.Tensor, torch.Tensor]
"""Keys and values, each ``[batch, KV_HEADS, length, HEAD_DIM]``; keys already rotated."""


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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, future: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """Attend ``x [batch, seq, HIDDEN]``; returns the output and the K/V it attended over.

        A KV-owning layer gets its past as ``kv`` and attends over (and returns) the past followed by the new
        tokens' K/V; any other layer attends over ``kv`` (the preceding layer's) and returns it unchanged.
        ``future [seq, length]`` is true where a query must not see a key.
        """
        batch, seq = x.shape[0], x.shape[1]
        group = QUERY_HEADS // KV_HEADS
        # Query head h reads KV head h // group: [batch, KV_HEADS, group, seq, HEAD_DIM].
        q = self.q_proj(x).view(batch, seq, KV_HEADS, group, HEAD_DIM).permute(0, 2, 3, 1, 4)
        q = apply_rotary(q, cos, sin)
        if self.owns_kv:
            k = self.k_proj(x).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = self.v_proj(x).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
            kv = (torch.cat([kv[0], apply_rotary(k, cos, sin)], dim=2), torch.cat([kv[1], v], dim=2))
        keys, values = kv[0].unsqueeze(2), kv[1].unsqueeze(2)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * HEAD_DIM**-0.5
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
    """Shared expert on every token plus top-1 routed experts.

    ``dense=False`` dispatches each token to its expert only; ``dense=True`` runs every routed expert on every
    token and masks the outputs with ``one_hot(choice) * probs``. Both compute the same function.
    """

    def __init__(self, dense: bool = False) -> None:
        super().__init__()
        self.shared_expert = Expert()
        self.experts = nn.ModuleList(Expert() for _ in range(ROUTED_EXPERTS))
        self.gate = nn.Linear(HIDDEN, ROUTED_EXPERTS, bias=False)
        self.dense = dense

    def router_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Softmax router probabilities ``[n, ROUTED_EXPERTS]`` of ``tokens [n, HIDDEN]``, computed in fp32."""
        return torch.softmax(self.gate(tokens.float()), dim=-1)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-1 routing of ``tokens [n, HIDDEN]``.

        Returns the chosen expert ``[n]`` int64, its probability ``[n]`` and all probabilities ``[n, ROUTED_EXPERTS]``.
        """
        probs = self.router_probs(tokens)
        weight, choice = probs.max(dim=-1)
        return choice, weight, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, HIDDEN)
        choice, weight, probs = self.route(tokens)
        out = self.shared_expert(tokens)
        if self.dense:
            gates = F.one_hot(choice, ROUTED_EXPERTS).to(probs.dtype) * probs
            for index, expert in enumerate(self.experts):
                out = out + expert(tokens) * gates[:, index : index + 1]
            return out.reshape(x.shape)
        for index, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == index).squeeze(1)
            routed = expert(tokens.index_select(0, rows)) * weight.index_select(0, rows).unsqueeze(1)
            out = out.scatter_add(0, rows.unsqueeze(1).expand(-1, HIDDEN), routed)
        return out.reshape(x.shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + moe(norm(x))``."""

    def __init__(self, owns_kv: bool, dense: bool = False) -> None:
        super().__init__()
        self.input_norm = RMSNorm(HIDDEN)
        self.attn = Attention(owns_kv)
        self.post_attention_norm = RMSNorm(HIDDEN)
        self.mlp = MoE(dense)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, future: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        attended, kv = self.attn(self.input_norm(x), cos, sin, future, kv)
        x = x + attended
        return x + self.mlp(self.post_attention_norm(x)), kv


class MoeTinyLM(nn.Module):
    """The whole decoder: ``(input_ids [batch, seq] int64, past) -> (logits [batch, seq, VOCAB], presents)``.

    ``past`` holds one (rotated keys, values) pair ``[batch, KV_HEADS, past_len, HEAD_DIM]`` per layer of
    :data:`CACHE_LAYERS` (``None``: empty); the new tokens sit at positions ``past_len..past_len+seq-1``.
    ``presents`` holds the same pairs extended by the new tokens (``past_len + seq`` long).
    """

    def __init__(self, dense: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(DecoderLayer(i in CACHE_LAYERS, dense) for i in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, past: Sequence[KV] | None = None) -> tuple[torch.Tensor, tuple[KV, ...]]:
        x = self.embed(input_ids)
        if past is None:
            empty = x.new_zeros(input_ids.shape[0], KV_HEADS, 0, HEAD_DIM)
            past = [(empty, empty)] * len(CACHE_LAYERS)
        past_len = past[0][0].shape[2]
        positions = torch.arange(past_len, past_len + input_ids.shape[1], device=x.device)
        cos, sin = rotary_tables(positions)
        future = torch.arange(past_len + input_ids.shape[1], device=x.device)[None, :] > positions[:, None]
        caches = dict(zip(CACHE_LAYERS, past, strict=True))
        presents: list[KV] = []
        kv = caches[0]  # a KV-owning layer reads its own past, the next layer what that layer returned
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, future, caches.get(index, kv))
            if index in caches:
                presents.append(kv)
        return self.lm_head(self.norm(x)), tuple(presents)


def initial_model(dense: bool = False) -> MoeTinyLM:
    """The fixed-seed untrained ``MoeTinyLM`` (train mode) that training starts from; global RNG state untouched.

    Init (after ``torch.manual_seed(0)``): embedding N(0, 1); every projection N(0, 1/fan_in), with the
    residual-writing ones (``o_proj``, ``down_proj``) further scaled by 1/sqrt(2 * LAYERS) so the residual stream
    stays near unit RMS; router ``gate`` N(0, ROUTER_LOGIT_STD^2 / HIDDEN) so router logits have std about
    ROUTER_LOGIT_STD.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MoeTinyLM(dense)
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
    return model


def build_torch_model(dense: bool = False) -> MoeTinyLM:
    """The trained ``moe-tiny`` module (weights from :data:`WEIGHTS_PATH`) in eval mode; global RNG untouched.

    ``dense`` picks the dense one-hot MoE (``moe-tiny-dense``) instead of per-token dispatch; same weights.
    """
    model = initial_model(dense)
    with np.load(WEIGHTS_PATH) as arrays:
        model.load_state_dict({key: torch.from_numpy(arrays[key]) for key in arrays.files})
    return model.eval()


def expert_token_counts(model: MoeTinyLM, input_ids: torch.Tensor) -> np.ndarray:
    """Tokens routed to each expert by each layer for ``input_ids``: int64 array ``[LAYERS, ROUTED_EXPERTS]``."""
    counts = np.zeros((LAYERS, ROUTED_EXPERTS), dtype=np.int64)

    def recorder(layer: int) -> Callable[[MoE, tuple[torch.Tensor], torch.Tensor], None]:
        def hook(module: MoE, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
            choice, _, _ = module.route(inputs[0].reshape(-1, HIDDEN))
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


def window_ids(offset: int, count: int) -> np.ndarray:
    """``count`` consecutive ``WINDOW``-byte windows of the text from byte ``offset``: int64 ``[count, WINDOW]``."""
    return _text_bytes()[offset : offset + count * WINDOW].astype(np.int64).reshape(count, WINDOW)


def _windows(offset: int, count: int) -> list[Feed]:
    """``count`` prefill feeds: ``input_ids [1, WINDOW]`` from :func:`window_ids` plus :func:`empty_past`."""
    return [{"input_ids": row[None, :], **empty_past()} for row in window_ids(offset, count)]


class MoeTiny(ZooModel):
    """Tiny Hunyuan-Large-style MoE decoder (GQA + CLA + KV cache + shared/routed top-1 experts) over UTF-8 bytes.

    Graph inputs: ``input_ids`` int64 ``[batch, seq]`` and the :func:`past_names` caches float32
    ``[batch, KV_HEADS, past, HEAD_DIM]``; outputs: ``logits`` ``[batch, seq, 256]`` and the
    :func:`present_names` caches ``[batch, KV_HEADS, past + seq, HEAD_DIM]``.

    Feeds are prefills: ``input_ids`` ``[1, 128]`` byte windows of the pydoc text with an empty past;
    evaluation = the first 32 windows, calibration = windows from byte 200,000 on (disjoint, and neither is
    trained on). ``reduce_outputs`` keeps ``nll`` (float64 ``[batch, seq-1]``, negative log-likelihood of each
    next byte) and ``argmax`` (int64 ``[batch, seq]``) from ``logits``.

    Score keys: ``perplexity`` (exp of the candidate's mean next-byte NLL), ``perplexity_fp`` (the same for the
    FP32 reference) and ``top1_agreement`` (fraction of positions whose argmax byte matches the reference).
    """

    name = "moe-tiny"
    task = "causal-lm"
    description = (
        "trained tiny Hunyuan-Large-style MoE byte decoder (GQA + cross-layer KV sharing + KV cache, "
        "shared + 4 top-1 experts dispatched per token)"
    )
    metric = "next-byte perplexity and top-1 agreement on pydoc text"
    version = "2"
    extra = None
    dense = False
    """Whether the export computes every routed expert densely (one-hot gate) instead of per-token dispatch."""

    def export(self, path: Path) -> None:
        """Export with the TorchScript exporter (opset 17); dynamic batch, sequence and past axes.

        The legacy exporter is used deliberately (it traces the data-dependent routing into plain ``NonZero``
        dispatch without extra shape guards), so its deprecation warnings are silenced. The trace runs a
        decode over a non-empty past so that no shape is specialised to zero.
        """
        model = build_torch_model(self.dense)
        ids = torch.from_numpy(window_ids(0, 1))
        with torch.no_grad():
            _, past = model(ids[:, : WINDOW // 2])
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        dynamic |= {name: {0: "batch", 2: "past"} for name in past_names()}
        dynamic |= {name: {0: "batch", 2: "total"} for name in present_names()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (ids[:, WINDOW // 2 :], past),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids", *past_names()],
                output_names=["logits", *present_names()],
                dynamic_axes=dynamic,
            )

    def calibration_feeds(self, count: int | None = None) -> list[Feed]:
        """Up to ``count`` (default 16) prefill windows from byte 200,000 on."""
        return _windows(CALIBRATION_OFFSET, CALIBRATION_WINDOWS if count is None else min(count, CALIBRATION_WINDOWS))

    def evaluation_feeds(self, count: int | None = None) -> list[Feed]:
        """The first ``count`` (default all 32) prefill windows from the start of the text."""
        return _windows(0, EVAL_WINDOWS if count is None else min(count, EVAL_WINDOWS))

    def reduce_outputs(self, index: int, outputs: Outputs) -> Outputs:
        """Per-token next-byte NLL and argmax ids of evaluation feed ``index`` (from ``logits`` only)."""
        return next_token_summary(outputs["logits"], window_ids(index * WINDOW, 1))

    def score(self, reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
        """Perplexities of candidate and reference, and their top-1 agreement (see the class docstring)."""
        return perplexity_scores(reference, candidate)


class MoeTinyDense(MoeTiny):
    """``moe-tiny`` with a dense MoE: every routed expert runs on every token, masked by ``OneHot(choice) * probs``.

    Same weights, graph inputs/outputs, feeds and score keys as :class:`MoeTiny`; its logits equal the dispatch
    model's up to float rounding.
    """

    name = "moe-tiny-dense"
    description = (
        "moe-tiny with dense experts: all 4 routed experts on every token, combined through a one-hot gate"
    )
    dense = True
