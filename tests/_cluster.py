"""Helpers for tests that run `distbelief train` as a subprocess and kill its roles
(the `cli_job` fixture that starts it is in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "distbelief.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rank_processes(args: list[str], world: int, cwd, token: str = "test-secret",
                   port: int | None = None):
    """`distbelief` started once per rank with RANK/WORLD_SIZE/MASTER_* set, as torchrun
    or SLURM would on many hosts (here all on 127.0.0.1, at `port` or a free one); yields
    the processes (rank order, stdout and stderr piped as text) and kills any still running
    on exit."""
    port, procs = port or free_port(), []
    try:
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "DISTBELIEF_TOKEN": token}
            procs.append(subprocess.Popen([*CLI, *args], cwd=cwd, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


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


def train_steps(run_dir: Path) -> dict[int, int]:
    """The last step each replica reported in the run's metrics.jsonl so far ({} before it
    exists)."""
    from distbelief.metrics.log import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {e["replica"]: e["step"] for e in read_metrics(run_dir / "metrics.jsonl")
            if e["event"] == "train"}


def kill_when(run_dir: Path, ready, kind: str, ident: int, timeout: float) -> None:
    """SIGKILL role `kind` `ident` of the job in `run_dir` once ``ready(train_steps(run_dir))``
    holds (AssertionError after `timeout` s)."""
    import signal

    def victim():
        return role_pid(run_dir, kind, ident) if ready(train_steps(run_dir)) else None

    os.kill(wait_until(victim, timeout, f"{kind} {ident}'s moment to be killed"), signal.SIGKILL)


def job_summary(proc: subprocess.Popen, run_dir: Path, timeout: float) -> dict:
    """Wait up to `timeout` s for a `distbelief train` started by the `cli_job` fixture to end;
    its summary.json (AssertionError with the end of its stderr if it failed or ran over)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not end within {timeout} s") from None
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    return json.loads((run_dir / "summary.json").read_text())
