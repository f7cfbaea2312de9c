"""The model zoo registry: names, lazy construction, and cached ONNX exports."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

from onnxsmith.core.errors import UserError
from onnxsmith.models.base import ZooModel
from onnxsmith.models.cache import cache_dir

_REGISTRY: dict[str, str] = {
    "vit-digits": "onnxsmith.models.vit_digits:VitDigits",
    "minilm": "onnxsmith.models.minilm:MiniLM",
    "smollm2": "onnxsmith.models.smollm2:SmolLM2",
    "moe-tiny": "onnxsmith.models.moe_tiny:MoeTiny",
    "moe-tiny-dense": "onnxsmith.models.moe_tiny:MoeTinyDense",
}

DEFAULT_ZOO_MODEL = "vit-digits"

_INSTALL_HINT = "pip install 'onnxsmith[zoo]'"


def zoo_names() -> list[str]:
    """Names of every zoo model, in registry order."""
    return list(_REGISTRY)


def get_zoo_model(name: str) -> ZooModel:
    """Instantiate the zoo model ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    if name not in _REGISTRY:
        raise UserError(f"unknown zoo model {name!r}; known: {', '.join(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"zoo model {name!r} needs packages that are not installed ({exc.name}); install them with: "
            f"{_INSTALL_HINT}"
        ) from exc
    return getattr(module, class_name)()


def zoo_model_path(name: str) -> Path:
    """Path of the cached FP32 ONNX export of ``name``, exporting it first if the cache lacks it.

    The export is written into a temporary folder inside the cache and renamed into place, so an interrupted
    export never leaves a half-written model behind.
    """
    model = get_zoo_model(name)
    target_dir = cache_dir() / "zoo" / f"{name}-v{model.version}"
    target = target_dir / "model.onnx"
    if target.exists():
        return target
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target_dir.parent))
    try:
        model.export(staging / "model.onnx")
        staging.chmod(0o755)
        try:
            staging.rename(target_dir)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
