"""The package's layers import one way: the walk below reads every module's imports (function-level ones
included, ``if TYPE_CHECKING:`` blocks excluded) and fails on any import against the rule."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import onnxsmith

ROOT = Path(onnxsmith.__file__).parent

ALLOWED = {
    "core": {"core"},
    "analysis": {"core", "analysis"},
    "backends": {"core", "analysis", "backends"},
    "calibration": {"core", "analysis", "backends", "calibration"},
    "rewrite": {"core", "analysis", "calibration", "rewrite"},
    "passes": {"core", "analysis", "calibration", "rewrite", "passes"},
    "models": {"core", "models"},
    "optimizer": {"core", "analysis", "backends", "calibration", "rewrite", "passes", "optimizer"},
    "testing": {"core", "analysis", "backends", "calibration", "rewrite", "passes", "optimizer", "testing"},
}
"""Which layers each layer may import (``onnxsmith`` itself, for ``__version__``, is allowed above core); a pass
module imports no other pass module."""

FACE = {"onnxsmith", "onnxsmith.api", "onnxsmith.optimizer.cli", "onnxsmith.optimizer.pipeline"}
"""The entry points: the only modules that may import the zoo (``onnxsmith.models``)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """onnxsmith modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if (ROOT.parent / base.replace(".", "/")
                                                                             / f"{alias.name}.py").exists())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "onnxsmith" or name.startswith("onnxsmith.")}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        own = layer(module)
        for imported in sorted(runtime_imports(path)):
            target = layer(imported)
            if imported == "onnxsmith":
                if own == "core":
                    found.append(f"{module} (core) imports onnxsmith")
            elif imported.startswith("onnxsmith.models") and module not in FACE and own != "models":
                found.append(f"{module} imports the zoo ({imported}); only {sorted(FACE)} may")
            elif own is None or target is None or target == "models":
                continue
            elif target not in ALLOWED[own]:
                found.append(f"{module} ({own}) imports {imported} ({target})")
            elif own == "passes" and target == "passes" and imported not in (module, "onnxsmith.passes"):
                found.append(f"pass {module} imports another pass ({imported})")
    return found


def test_imports_follow_the_layer_rule():
    assert violations() == []


@pytest.mark.parametrize("folder, source, expected", [
    ("core", "def f():\n    from onnxsmith.passes.qdq_int8 import QuantizeInt8\n",
     "onnxsmith.core._layer_probe (core) imports onnxsmith.passes.qdq_int8 (passes)"),
    ("passes", "from onnxsmith.passes import prune_nm\n",
     "pass onnxsmith.passes._layer_probe imports another pass (onnxsmith.passes.prune_nm)"),
    ("analysis", "from onnxsmith.models.zoo import zoo_names\n",
     "onnxsmith.analysis._layer_probe imports the zoo (onnxsmith.models.zoo); only " + str(sorted(FACE)) + " may"),
])
def test_the_walk_catches_a_broken_rule(folder, source, expected):
    probe = ROOT / folder / "_layer_probe.py"
    probe.write_text(source)
    try:
        assert violations() == [expected]
    finally:
        probe.unlink()


def test_manager_and_a_cleanup_run_leave_torch_unimported(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper, save
        import onnxsmith.optimizer.manager
        from onnxsmith.optimizer.cli import main
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {str(tmp_path / "m.onnx")!r})
        assert main([{str(tmp_path / "m.onnx")!r}, "--recipe", "cleanup", "-q"]) == 0
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
