"""N:M sparsity primitives: masks, pattern checks and per-input-channel importance scores.

A weight is N:M sparse along an axis when every ``m`` consecutive entries along it hold at most ``n`` non-zeros.
Scores rank the entries of a weight for pruning: ``|W|`` times a per-input-channel factor from calibration
statistics (:func:`channel_factors`).
"""

from __future__ import annotations

import numpy as np

SCORES = ("magnitude", "wanda", "esparse")


def check_pattern(n: int, m: int) -> None:
    """Raise ValueError unless ``n`` and ``m`` are integers with ``0 < n < m``."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"need integers 0 < n < m, got n={n!r}, m={m!r}")


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest ``scores`` of every ``m`` consecutive entries along ``axis``.

    ``scores.shape[axis]`` must be a multiple of ``m``; ties keep the earlier entry.
    """
    moved = np.moveaxis(scores, axis, 0)
    if moved.shape[0] % m:
        raise ValueError(f"{moved.shape[0]} channels along axis {axis} are not a multiple of m = {m}")
    groups = moved.reshape(moved.shape[0] // m, m, -1)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), 0, axis)


def satisfies_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Whether every ``m`` consecutive entries of ``weight`` along ``axis`` hold at most ``n`` non-zeros."""
    moved = np.moveaxis(np.asarray(weight), axis, 0)
    if moved.shape[0] % m:
        return False
    return bool(((moved.reshape(moved.shape[0] // m, m, -1) != 0).sum(axis=1) <= n).all())


def channel_factors(score: str, norms: np.ndarray | None = None, entropy: np.ndarray | None = None,
                    alpha: float = 100.0) -> np.ndarray | None:
    """The per-input-channel factor that multiplies ``|W|`` (None for ``"magnitude"``: no factor).

    ``"wanda"``: ``‖X_j‖₂``. ``"esparse"``: ``H_j / mean(H) + alpha * ‖X_j‖₂ / mean(‖X‖₂)``, the channel's
    entropy and norm each normalised by its mean over the channels so that ``alpha`` weighs two unitless terms
    (``alpha = 0`` ranks by entropy alone, a large ``alpha`` approaches Wanda). A term whose mean is 0 counts 0.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if score == "magnitude":
        return None
    if norms is None:
        raise ValueError(f"score {score!r} needs the input channels' norms")
    if score == "wanda":
        return np.asarray(norms, dtype=np.float64)
    if entropy is None:
        raise ValueError("score 'esparse' needs the input channels' entropy")
    return _normalised(entropy) + alpha * _normalised(norms)


def _normalised(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean()
    return values / mean if mean > 0 else np.zeros_like(values)
