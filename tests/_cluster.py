"""Helpers for tests that run `distbelief train` as a subprocess and kill its roles
(the `cli_job` fixture that starts it is in conftest.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "distbelief.cli"]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); read its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def role_pid(run_dir: Path, kind: str, ident: int) -> int | None:
    """The PID of a role from the run's cluster.json, or None before it is written."""
    if not (run_dir / "cluster.json").exists():
        return None
    roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
    return next(r["pid"] for r in roles if r["kind"] == kind and r["id"] == ident)
