"""Language-model figures shared by the decoder zoo models: next-token NLL, perplexity, top-1 agreement."""

from __future__ import annotations

import numpy as np

from onnxsmith.core.feeds import Outputs


def next_token_summary(logits: np.ndarray, input_ids: np.ndarray) -> Outputs:
    """Reduce ``logits [batch, seq, vocab]`` for ``input_ids [batch, seq]`` to what scoring needs.

    Returns ``nll`` (float64 ``[batch, seq-1]``: negative log-likelihood of each next token, computed in float64)
    and ``argmax`` (int64 ``[batch, seq]``: the predicted token at every position).
    """
    logits = np.asarray(logits, dtype=np.float64)
    predicting = logits[:, :-1]
    targets = input_ids[:, 1:]
    peak = predicting.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(predicting - peak).sum(axis=-1)) + peak[..., 0]
    target_logits = np.take_along_axis(predicting, targets[..., None], axis=-1)[..., 0]
    return {"nll": log_norm - target_logits, "argmax": logits.argmax(axis=-1).astype(np.int64)}


def perplexity_scores(reference: list[Outputs], candidate: list[Outputs]) -> dict[str, float]:
    """``perplexity`` and ``perplexity_fp`` (exp of the mean NLL over every predicted token) and
    ``top1_agreement`` (share of positions whose argmax matches the reference) from :func:`next_token_summary`
    results aligned feed by feed."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need equally many, non-zero outputs; got {len(reference)} and {len(candidate)}")
    ref_nll = np.concatenate([out["nll"].ravel() for out in reference])
    cand_nll = np.concatenate([out["nll"].ravel() for out in candidate])
    agree = np.concatenate([(r["argmax"] == c["argmax"]).ravel() for r, c in zip(reference, candidate)])
    return {
        "perplexity": float(np.exp(cand_nll.mean())),
        "perplexity_fp": float(np.exp(ref_nll.mean())),
        "top1_agreement": float(agree.mean()),
    }
