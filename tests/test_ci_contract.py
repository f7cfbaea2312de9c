"""CI runs what README.md tells a new user to run: its test command, verbatim, in a fresh virtual environment."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The command lines of README.md's first bash block (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_in_a_new_venv():
    main_job, tests = readme_commands()
    assert "optimize zoo:" in main_job and tests.endswith("python -m pytest -q")
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in script
    venv_line = next(i for i, line in enumerate(script) if "python3 -m venv" in line)
    activate_line = next(i for i, line in enumerate(script) if "/bin/activate" in line)
    assert venv_line < activate_line < script.index(tests)
    assert tests.index("torch==2.13.0") < tests.index("pip install -e")


def test_the_dynamo_exporter_dependency_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("onnxscript") for dep in project["dependencies"])
