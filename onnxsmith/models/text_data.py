"""Deterministic English prose shipped with CPython (``pydoc_data.topics``), for calibration and evaluation."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    """All pydoc topics, concatenated in sorted-key order (about 465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@lru_cache(maxsize=1)
def pydoc_sentences() -> tuple[str, ...]:
    """Prose sentences of 8 to 60 words from the pydoc topics, in text order, whitespace-normalised.

    Lines that look like code (indented, or containing '>>>') and heading underlines are dropped first, so the sentences are English.
    """
    prose_lines = [
        line.strip()
        for line in pydoc_text().splitlines()
        if line.strip()
        and not line.startswith((" ", "\t"))
        and ">>>" not in line
        and not re.fullmatch(r"[*=~^-]+", line.strip())
    ]
    text = re.sub(r"\s+", " ", " ".join(prose_lines))
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return tuple(s for s in sentences if 8 <= len(s.split()) <= 60)
