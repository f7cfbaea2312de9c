"""Expert-aware observation: each routed expert's statistics come only from the tokens routed to it."""

from __future__ import annotations

import numpy as np

from onnxsmith.calibration.observers import Observer


class RoutedObserver:
    """Feeds ``inner`` the rows of ``tensor`` that belong to tokens routed to ``expert``, and counts those tokens.

    ``choice`` names the router's chosen-expert tensor (ArgMax output or TopK indices: ``top_k`` experts per token,
    any leading shape). ``select_rows=True`` (dense form): ``tensor`` has one row (its last axis is the feature
    axis) per token and only the rows whose token chose ``expert`` are observed. ``select_rows=False`` (dispatch
    form): ``tensor`` already holds exactly the routed rows; their number is checked against the choice.
    A feed routing no token to the expert adds nothing (and does not fail).
    """

    def __init__(self, inner: Observer, tensor: str, choice: str, expert: int, *, top_k: int = 1,
                 select_rows: bool) -> None:
        self.inner = inner
        self.watches = (tensor, choice)
        self.expert = expert
        self.top_k = top_k
        self.select_rows = select_rows
        self.tokens = 0
        """Tokens routed to the expert over every observed feed."""

    @property
    def name(self) -> str:
        return f"{self.watches[0]} (expert {self.expert})"

    def observe(self, values: np.ndarray, choice: np.ndarray) -> None:
        """Observe one feed's ``tensor`` values given the same feed's ``choice`` values."""
        routed = (np.asarray(choice).reshape(-1, self.top_k) == self.expert).any(axis=1)
        rows = np.asarray(values).reshape(-1, values.shape[-1]) if np.ndim(values) else np.asarray(values)
        expected = routed.size if self.select_rows else int(routed.sum())
        if len(rows) != expected:
            form = "every token" if self.select_rows else f"the {expected} tokens routed to expert {self.expert}"
            raise ValueError(f"{self.name}: {len(rows)} rows, expected one per token ({form})")
        self.inner.observe(rows[routed] if self.select_rows else rows)
        self.tokens += int(routed.sum())
