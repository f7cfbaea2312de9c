"""Train the ``moe-tiny`` zoo model and write its weights: ``python -m onnxsmith.models.train_moe_tiny``.

A next-byte language model on the pydoc text, trained deterministically (fixed seed, deterministic torch
algorithms, one CPU thread) from :func:`onnxsmith.models.moe_tiny.initial_model`. Training windows come only
from :data:`TRAIN_RANGES`, which avoid the evaluation bytes ``[0, 32 * 128)`` and the calibration bytes
``[200_000, 200_000 + 16 * 128)``. The loss is next-byte cross-entropy plus a Switch-Transformer
load-balancing term per MoE layer (``ROUTED_EXPERTS * sum_e f_e * P_e``, ``f_e`` the share of tokens routed to
expert ``e``, ``P_e`` its mean router probability), which keeps every expert in use. The script prints the
training time, the evaluation perplexity and each layer's expert token shares on the evaluation windows, and
writes float32 arrays keyed by ``state_dict`` names to :data:`onnxsmith.models.moe_tiny.WEIGHTS_PATH`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from onnxsmith.models.moe_tiny import (
    EVAL_WINDOWS,
    HIDDEN,
    ROUTED_EXPERTS,
    VOCAB,
    WEIGHTS_PATH,
    WINDOW,
    MoE,
    MoeTinyLM,
    _text_bytes,
    expert_token_counts,
    initial_model,
    window_ids,
)

SEED = 0
STEPS = 1500
BATCH = 16
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.1
BALANCE_COEFFICIENT = 0.01
CLIP_NORM = 1.0
TRAIN_RANGES = ((8_192, 199_000), (204_800, None))
"""Byte ranges ``[start, end)`` (``None``: end of text) that training windows lie entirely inside."""


def _window_starts() -> torch.Tensor:
    """Every start byte of a ``WINDOW + 1``-byte training window (inputs plus shifted targets) inside a range."""
    size = len(_text_bytes())
    spans = [torch.arange(start, (size if end is None else end) - WINDOW) for start, end in TRAIN_RANGES]
    return torch.cat(spans)


def _batch(starts: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH`` random training windows: input ids and next-byte targets, both int64 ``[BATCH, WINDOW]``."""
    data = torch.from_numpy(_text_bytes().astype(np.int64))
    picked = starts[torch.randint(len(starts), (BATCH,), generator=generator)]
    chunks = data[picked[:, None] + torch.arange(WINDOW + 1)]
    return chunks[:, :-1], chunks[:, 1:]


def _balance_recorder(model: MoeTinyLM) -> tuple[list[torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Hooks appending each MoE layer's Switch load-balancing loss to the returned list on every forward."""
    losses: list[torch.Tensor] = []

    def hook(module: MoE, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        probs = module.router_probs(inputs[0].reshape(-1, HIDDEN))
        routed = F.one_hot(probs.argmax(dim=-1), ROUTED_EXPERTS).float().mean(dim=0)
        losses.append(ROUTED_EXPERTS * (routed * probs.mean(dim=0)).sum())

    return losses, [layer.mlp.register_forward_hook(hook) for layer in model.layers]


def evaluation_perplexity(model: MoeTinyLM) -> float:
    """Exp of the mean next-byte NLL over the 32 evaluation windows (positions 1..127 of each)."""
    ids = torch.from_numpy(window_ids(0, EVAL_WINDOWS))
    with torch.no_grad():
        logits, _ = model(ids)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), ids[:, 1:].reshape(-1))
    return float(nll.exp())


def train(steps: int = STEPS, log: Callable[[str], None] | None = None) -> MoeTinyLM:
    """Train :func:`initial_model` for ``steps`` AdamW steps (one-cycle schedule); return it in eval mode.

    ``log``, when given, receives a progress line every 100 steps.
    """
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    starts = _window_starts()
    model = initial_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    balance, handles = _balance_recorder(model)
    try:
        for step in range(steps):
            inputs, targets = _batch(starts, generator)
            balance.clear()
            logits, _ = model(inputs)
            lm_loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            loss = lm_loss + BALANCE_COEFFICIENT * torch.stack(balance).sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            scheduler.step()
            if log is not None and (step + 1) % 100 == 0:
                log(f"step {step + 1}: next-byte loss {lm_loss.item():.3f}")
    finally:
        for handle in handles:
            handle.remove()
    return model.eval()


def main() -> None:
    """Train, print time, evaluation perplexity and expert shares, and save the weights."""
    started = time.perf_counter()
    model = train(log=print)
    elapsed = time.perf_counter() - started
    print(f"trained {STEPS} steps of {BATCH} x {WINDOW} bytes in {elapsed:.1f} s")
    print(f"evaluation perplexity {evaluation_perplexity(model):.3f} ({EVAL_WINDOWS} x {WINDOW} bytes)")
    counts = expert_token_counts(model, torch.from_numpy(window_ids(0, EVAL_WINDOWS)))
    shares = counts / counts.sum(axis=1, keepdims=True)
    for layer, row in enumerate(shares):
        print(f"layer {layer} expert token shares: " + " ".join(f"{share:.3f}" for share in row))
    print(f"min expert share {shares.min():.3f}")
    WEIGHTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: value.detach().numpy().astype(np.float32) for key, value in model.state_dict().items()}
    np.savez(WEIGHTS_PATH, **arrays)
    print(f"wrote {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
