"""`make demo` does what the README promises: Downpour on MNIST-1D reaching >= 0.95."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_command() -> list[str]:
    """The demo recipe of the Makefile, as an argument list (continuation lines joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(r"^demo:.*\n\t(.+)$", text, re.MULTILINE).group(1)
    args = shlex.split(recipe)
    assert args[0] == "$(BIN)/distbelief", args
    return [sys.executable, "-m", "distbelief.cli", *args[1:]]


def test_demo_reaches_95_percent_on_mnist1d(tmp_path):
    command = demo_command()
    assert "--algorithm" in command and "downpour" in command and "mnist1d" in command
    result = subprocess.run([*command, "--run-dir", str(tmp_path / "run")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["replicas"], summary["shards"], summary["config"]["rule"]) == (2, 2, "adagrad")
    assert summary["test_samples"] == 10_000
    assert summary["test_accuracy"] >= 0.95
    assert f"test accuracy {summary['test_accuracy']:.4f}" in result.stdout
    assert "run directory:" in result.stdout
    # progress was shown while it ran: step, loss, samples/s, staleness
    assert re.search(r"step \d+/\d+ +loss [\d.]+ +[\d,]+ samples/s +staleness [\d.]+",
                     result.stdout)
