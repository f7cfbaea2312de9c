"""Channel permutations that raise the importance kept by N:M sparsity (E-Sparse's shuffles, apex's search).

N:M sparsity keeps the ``n`` best of every ``m`` consecutive input channels per output column, so which channels
share a group decides what survives: two important channels in one 2:4 group with two more important ones lose
one of them. A permutation ``p`` of the input channels (new channel ``i`` = old channel ``p[i]``) regroups them;
absorbing it into the graph without changing the function is the caller's job.

The layers sharing a permutation are given as score matrices ``S_k`` of shape ``[C, cols_k]`` (row ``c`` = input
channel ``c``, non-negative entries, e.g. ``|W|`` times a channel factor, a Conv's taps as extra columns). The
objective is ``kept = mean_k(kept_k / total_k)``: the fraction of each layer's score that the N:M mask on the
permuted rows keeps, averaged over layers.

Methods (:data:`SHUFFLES`):

- ``"global"``: E-Sparse's global naive shuffle. Channels sorted by their summed normalised score are dealt
  snake-wise over the groups, so each group holds one channel of every importance tier.
- ``"local"``: the global shuffle, then E-Sparse's local block shuffle: inside blocks of ``block`` consecutive
  channels, greedy channel swaps between groups, the best non-overlapping improving swaps first, until no swap
  improves (or ``rounds`` passes).
- ``"apex"`` (2:4 only, as NVIDIA apex's ``permutation_search``): the local search, then exhaustive regrouping of
  every pair of groups in a block (all 35 ways to split 8 channels into two groups of 4), applied greedily,
  alternated with the swaps until neither improves.

Every method returns the identity when it does not raise ``kept`` (ties keep the identity), so a shuffle never
lowers the kept score. With ``group`` (attention heads) channels only move inside consecutive ``group``-channel
groups; ``group`` must then be a multiple of ``m``, else only the identity is possible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHUFFLES = ("none", "global", "local", "apex")
MIN_GAIN = 1e-12
"""Relative gain below which a move is float noise and is not taken."""


@dataclass(frozen=True)
class ShuffleChoice:
    """The permutation (new ``i`` = old ``permutation[i]``), the method that produced it (``"identity"`` when none
    improved) and the kept fraction of the score before and after."""

    permutation: np.ndarray
    method: str
    kept_before: float
    kept_after: float


def joint_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The layers' score matrices, each divided by its total, side by side: one ``[C, sum cols]`` matrix whose
    kept sum is the objective times the number of layers."""
    if not scores:
        raise ValueError("need at least one score matrix")
    channels = {s.shape[0] for s in scores}
    if len(channels) != 1:
        raise ValueError(f"score matrices disagree on the channel count: {sorted(channels)}")
    parts = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64).reshape(s.shape[0], -1)
        if (s < 0).any():
            raise ValueError("scores must be non-negative")
        total = s.sum()
        parts.append(s / total if total > 0 else s)
    return np.concatenate(parts, axis=1)


def kept_fraction(scores: Sequence[np.ndarray], n: int, m: int, permutation: np.ndarray | None = None) -> float:
    """``mean_k(kept_k / total_k)`` of the layers' scores under N:M after ``permutation`` (identity if None)."""
    joint = joint_scores(scores)
    rows = joint if permutation is None else joint[permutation]
    return _kept(rows, n, m) / len(scores)


def choose_nm_permutation(
    scores: Sequence[np.ndarray],
    n: int,
    m: int,
    method: str = "local",
    group: int | None = None,
    block: int = 64,
    rounds: int = 50,
) -> ShuffleChoice:
    """The permutation of the input channels shared by the layers of ``scores``; see the module docstring."""
    if method not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {list(SHUFFLES)}, got {method!r}")
    if not (0 < n < m):
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    if method == "apex" and (n, m) != (2, 4):
        raise ValueError("the apex search regroups 2:4 stripes only; use 'local' for other patterns")
    if block < 2 * m or block % m:
        raise ValueError(f"block must be a multiple of m = {m} holding at least two groups, got {block}")
    joint = joint_scores(scores)
    channels = joint.shape[0]
    group = channels if group is None else group
    if channels % m or channels % group:
        raise ValueError(f"{channels} channels do not split into groups of m = {m} (and of {group})")
    identity = np.arange(channels)
    before = _kept(joint, n, m)
    best, best_method, best_kept = identity, "identity", before
    if method != "none" and group % m == 0:
        candidate = np.concatenate([start + _shuffle(joint[start:start + group], n, m, method, block, rounds)
                                    for start in range(0, channels, group)])
        kept = _kept(joint[candidate], n, m)
        if kept > before * (1 + MIN_GAIN):
            best, best_method, best_kept = candidate, method, kept
    layers = len(scores)
    return ShuffleChoice(best, best_method, before / layers, best_kept / layers)


def _shuffle(joint: np.ndarray, n: int, m: int, method: str, block: int, rounds: int) -> np.ndarray:
    """The method's permutation of one free group of channels (rows of ``joint``)."""
    order = _global_shuffle(joint, m)
    if _kept(joint[order], n, m) <= _kept(joint, n, m):
        order = np.arange(joint.shape[0])
    if method == "global":
        return order
    for start in range(0, len(order), block):
        window = order[start:start + block]
        if len(window) < 2 * m:
            continue
        local = _local_search(joint[window], n, m, rounds)
        if method == "apex":
            local = _apex_search(joint[window], local, n, m, rounds)
        order[start:start + block] = window[local]
    return order


def _global_shuffle(joint: np.ndarray, m: int) -> np.ndarray:
    """Deal the channels, most important first, snake-wise over the ``C / m`` groups."""
    groups = joint.shape[0] // m
    ranked = np.argsort(-joint.sum(axis=1), kind="stable")
    tiers = ranked.reshape(m, groups).copy()
    tiers[1::2] = tiers[1::2, ::-1]
    return tiers.T.reshape(-1)


def _local_search(joint: np.ndarray, n: int, m: int, rounds: int) -> np.ndarray:
    """Greedy swaps of single channels between groups of one block; returns the block's permutation.

    The score of group ``g`` with its slot ``i`` replaced by channel ``c`` is ``A[i] + Σ max(0, S[c] - θ[i])``,
    where ``A[i]`` is the kept sum of the group's other ``m - 1`` channels and ``θ[i]`` their ``n``-th largest
    value per column: the newcomer replaces the ``n``-th best when it beats it.
    """
    channels = joint.shape[0]
    order = np.arange(channels)
    group_of = np.arange(channels) // m
    scale = max(_kept(joint, n, m), np.finfo(float).tiny)
    for _ in range(rounds):
        rows = joint[order]
        grouped = rows.reshape(-1, m, rows.shape[1])
        kept_groups = _topn_sum(grouped, n).sum(axis=1)
        others_kept, threshold = _without_each_slot(grouped, n)
        replaced = others_kept[:, None] + _gains_over(threshold, rows)
        base = kept_groups[group_of]
        gain = (replaced - base[:, None]) + (replaced - base[:, None]).T
        gain[group_of[:, None] == group_of[None, :]] = -np.inf
        swaps = _disjoint_best(gain, group_of, scale)
        if not swaps:
            break
        for i, j in swaps:
            order[i], order[j] = order[j], order[i]
    return order


def _apex_search(joint: np.ndarray, order: np.ndarray, n: int, m: int, rounds: int) -> np.ndarray:
    """Alternate exhaustive two-group regroupings (greedy, disjoint pairs) with the swap search."""
    splits = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    firsts = np.array(splits)
    seconds = np.array([[s for s in range(2 * m) if s not in c] for c in splits])
    scale = max(_kept(joint, n, m), np.finfo(float).tiny)
    for _ in range(rounds):
        rows = joint[order]
        grouped = rows.reshape(-1, m, rows.shape[1])
        groups = grouped.shape[0]
        kept_groups = _topn_sum(grouped, n).sum(axis=1)
        moves = []
        for a, b in itertools.combinations(range(groups), 2):
            pair = np.concatenate([grouped[a], grouped[b]])
            candidates = _topn_sum(pair[firsts], n).sum(axis=1) + _topn_sum(pair[seconds], n).sum(axis=1)
            best = int(np.argmax(candidates))
            gain = candidates[best] - kept_groups[a] - kept_groups[b]
            if gain > MIN_GAIN * scale:
                moves.append((gain, a, b, best))
        used: set[int] = set()
        changed = False
        for _, a, b, best in sorted(moves, reverse=True):
            if a in used or b in used:
                continue
            used.update((a, b))
            slots = np.concatenate([a * m + np.arange(m), b * m + np.arange(m)])
            order[slots] = order[slots][np.concatenate([firsts[best], seconds[best]])]
            changed = True
        refined = _local_search(joint[order], n, m, rounds)
        changed |= not np.array_equal(refined, np.arange(len(order)))
        order = order[refined]
        if not changed:
            break
    return order


def _gains_over(threshold: np.ndarray, rows: np.ndarray, chunk: int = 16) -> np.ndarray:
    """``out[i, c] = Σ_cols max(0, rows[c] - threshold[i])`` (float32 terms, float64 sums), in chunks of slots
    to bound memory; a swap taken on a rounding-level gain is caught by the caller's final kept comparison."""
    out = np.empty((threshold.shape[0], rows.shape[0]))
    rows32, threshold32 = rows.astype(np.float32), threshold.astype(np.float32)
    for start in range(0, threshold.shape[0], chunk):
        part = threshold32[start:start + chunk]
        out[start:start + chunk] = np.maximum(0.0, rows32[None, :, :] - part[:, None, :]).sum(axis=2, dtype=np.float64)
    return out


def _disjoint_best(gain: np.ndarray, group_of: np.ndarray, scale: float) -> list[tuple[int, int]]:
    """Improving swaps ``(i, j)`` in order of gain, each group used at most once."""
    upper = np.triu(gain, 1)
    candidates = np.argwhere(upper > MIN_GAIN * scale)
    if not len(candidates):
        return []
    ranked = candidates[np.argsort(-upper[candidates[:, 0], candidates[:, 1]], kind="stable")]
    used: set[int] = set()
    swaps = []
    for i, j in ranked:
        gi, gj = int(group_of[i]), int(group_of[j])
        if gi in used or gj in used:
            continue
        used.update((gi, gj))
        swaps.append((int(i), int(j)))
    return swaps


def _without_each_slot(grouped: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every slot ``i`` (flattened ``group * m + slot``): the kept sum of the other ``m - 1`` channels of its
    group, and their ``n``-th largest value per column."""
    groups, m, cols = grouped.shape
    others = np.stack([np.delete(grouped, slot, axis=1) for slot in range(m)], axis=1)
    descending = -np.sort(-others, axis=2)
    kept = descending[:, :, :n].sum(axis=(2, 3)).reshape(groups * m)
    threshold = descending[:, :, n - 1].reshape(groups * m, cols)
    return kept, threshold


def _topn_sum(grouped: np.ndarray, n: int) -> np.ndarray:
    """Sum of the ``n`` largest entries along axis -2 (the group's channels), per column."""
    m = grouped.shape[-2]
    return np.partition(grouped, m - n, axis=-2)[..., m - n:, :].sum(axis=-2)


def _kept(rows: np.ndarray, n: int, m: int) -> float:
    return float(_topn_sum(rows.reshape(-1, m, rows.shape[1]), n).sum())
