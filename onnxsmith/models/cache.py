"""Where onnxsmith keeps exported zoo models: ``$ONNXSMITH_CACHE`` or ``~/.cache/onnxsmith``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created on demand by writers, never inside the repository)."""
    configured = os.environ.get("ONNXSMITH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "onnxsmith"
