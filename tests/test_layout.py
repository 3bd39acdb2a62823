"""The package's shape: modules use each other's public names only, and every command starts."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "mlx_blockpilot").rglob("*.py"), *(ROOT / "converters").rglob("*.py")])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_file(path: Path, node: ast.ImportFrom, name: str) -> bool:
    """Whether ``from <node.module> import name`` (relative to ``path``) names one of our modules."""
    base = path.parent
    for _ in range(max(node.level - 1, 0)):
        base = base.parent
    if node.module:
        base = base.joinpath(*node.module.split("."))
    return (base / f"{name}.py").is_file() or (base / name / "__init__.py").is_file()


def private_uses(path: Path):
    """``(line, what)`` for every underscore name this file takes from another module."""
    tree = ast.parse(path.read_text(), str(path))
    modules = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}"))
                if node.level and _module_file(path, node, alias.name):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}"))
                modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            if node.value.id in modules:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_the_checker_finds_private_imports(tmp_path):
    bad = tmp_path / "pkg" / "mod.py"
    bad.parent.mkdir()
    (bad.parent / "other.py").write_text("def _hidden(): pass\n")
    bad.write_text("from .other import _hidden\nfrom . import other\nimport os\nother._hidden()\nos._exit\n")
    assert sorted(w for _, w in private_uses(bad)) == ["from .other import _hidden", "os._exit", "other._hidden"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_uses(path) == []


def _scripts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_a_console_script_and_a_module():
    from mlx_blockpilot.cli.main import COMMANDS

    scripts = _scripts()
    for name, (module, _) in COMMANDS.items():
        assert scripts[f"mlx-blockpilot-{name.replace('_', '-')}"] == f"mlx_blockpilot.cli.{module}:main"
        assert (ROOT / "mlx_blockpilot" / f"{name}.py").is_file() or (ROOT / "mlx_blockpilot" / name / "__main__.py").is_file()
    assert scripts["mlx-blockpilot"] == "mlx_blockpilot.cli.main:main"


def _run(cmd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("script", sorted(_scripts()))
def test_every_console_script_starts(script):
    exe = Path(sys.executable).parent / script
    if not exe.is_file():
        pytest.skip(f"{script} is not installed next to {sys.executable} (pip install -e .)")
    proc = _run([str(exe), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and proc.stderr == ""


def test_python_m_commands_start_and_keep_the_api_names():
    from mlx_blockpilot.cli.main import COMMANDS

    for name in COMMANDS:
        proc = _run([sys.executable, "-m", f"mlx_blockpilot.{name}", "--help"])
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr)
        assert "RuntimeWarning" not in proc.stderr, (name, proc.stderr)
    import mlx_blockpilot
    import mlx_blockpilot.cli.generate  # noqa: F401

    assert callable(mlx_blockpilot.generate) and mlx_blockpilot.generate.__module__ == "mlx_blockpilot.api"


def test_dispatcher_runs_commands_and_rejects_unknown_ones():
    proc = _run([sys.executable, "-m", "mlx_blockpilot.cli.main", "generate", "--help"])
    assert proc.returncode == 0 and "--prompt" in proc.stdout
    proc = _run([sys.executable, "-m", "mlx_blockpilot.cli.main", "nonsense"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
