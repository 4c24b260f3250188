"""The package's layering (pyproject's import-linter contracts) and the algorithm registry's
reach: nothing outside `distbelief.algorithms` compares an algorithm's name."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distbelief.algorithms.registry import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "distbelief"
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def lint(source_root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, str(config)], cwd=source_root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(source_root), "PATH": "/usr/bin:/bin"})


def test_the_layers_and_no_cycle_contracts_are_kept():
    result = lint(SRC.parent, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    ("config.py", "import distbelief.job\n"),                  # upwards across layers
    ("model/zoo.py", "import distbelief.data.datasets\n"),     # a cycle: data imports model
])
def test_an_upward_import_or_a_cycle_breaks_a_contract(tmp_path, module, line):
    shutil.copytree(SRC, tmp_path / "distbelief")
    with open(tmp_path / "distbelief" / module, "a") as f:
        f.write(line)
    result = lint(tmp_path, ROOT / "pyproject.toml")
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def _name_comparisons(path: Path, root: Path = SRC) -> list[str]:
    """`x == "downpour"`-like comparisons (and `in (...)` of names) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                values = ([operand] if isinstance(operand, ast.Constant)
                          else list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List,
                                                                           ast.Set)) else [])
                found += [f"{path.relative_to(root)}:{node.lineno} {v.value!r}" for v in values
                          if isinstance(v, ast.Constant) and v.value in ALGORITHMS]
    return found


def test_no_algorithm_name_is_compared_outside_the_algorithms():
    outside = [p for p in SRC.rglob("*.py") if "algorithms" not in p.relative_to(SRC).parts]
    assert len(outside) > 30
    assert [c for p in outside for c in _name_comparisons(p)] == []


def test_the_name_check_finds_a_comparison(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(cfg):\n    return cfg.algorithm == "hogwild" or cfg.x in ("sync",)\n')
    assert _name_comparisons(probe, tmp_path) == ["probe.py:2 'hogwild'", "probe.py:2 'sync'"]


def test_the_command_line_and_the_config_do_not_import_torch():
    # `distbelief train` starts its role launcher before it imports torch, so that the two
    # imports overlap (runtime/zygote.py): the registry and the config must stay light
    code = ("import sys, distbelief.cli, distbelief.job, distbelief.algorithms.registry; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
