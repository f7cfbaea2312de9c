"""onnxsmith: an ONNX graph-rewriting optimizer with verified passes.

``onnxsmith.optimize`` and ``onnxsmith.export_and_optimize`` (see :mod:`onnxsmith.api`) are loaded on first use,
so ``import onnxsmith`` stays cheap and imports neither torch nor onnxruntime.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("optimize", "export_and_optimize", "OptimizeOutput", "OptimizeReport")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from onnxsmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxsmith' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
