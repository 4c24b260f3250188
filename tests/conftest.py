"""Shared pytest fixtures."""

import json
import os
import signal
import subprocess

from distbelief.runtime.launch import QUICK_RESOLVER

# this process hosts and joins many stores, each connection asking DNS for the name of
# loopback: with a DNS server that sometimes drops a query, 1 s lost instead of 10
os.environ.setdefault("RES_OPTIONS", QUICK_RESOLVER)
# a job's curves.png costs a second of CPU (matplotlib's import and a PNG): the few tests
# that look at it ask for it (the `curves` fixture); the suite's other jobs skip it
os.environ.setdefault("DISTBELIEF_CURVES", "0")

import numpy as np
import pytest
import torch

from _cluster import CLI


# The files that take longest (each >= ~1 minute of a worker's time on 2 cores), longest
# first. `make test` hands whole files to two workers in collection order
# (--no-loadscope-reorder: xdist would otherwise order files by their number of tests),
# each taking the next when it is done: started last, one of these would leave the other
# worker idle at the end; started first, the many short files fill both workers' tails.
LONGEST_FIRST = ("test_benchmarks.py", "test_liveness.py", "test_stranger.py",
                 "test_namespaces.py", "test_staleness.py", "test_checkpoint_resume.py",
                 "test_admm.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the LONGEST_FIRST files first (the same order on every worker)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: within a file, and among the rest, the order is kept


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed torch and numpy (seed 0) before every test so results are reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def curves(monkeypatch) -> None:
    """Jobs started by this test draw curves.png (DISTBELIEF_CURVES, off in the suite)."""
    monkeypatch.setenv("DISTBELIEF_CURVES", "1")


@pytest.fixture
def cli_job(tmp_path):
    """Start `distbelief train` in tmp_path; always kill it and its roles (run dir "run") by PID."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*CLI, "train", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        run_dir = tmp_path / "run"
        pids = []
        if (run_dir / "cluster.json").exists():
            pids = [r["pid"] for r in json.loads((run_dir / "cluster.json").read_text())["roles"]]
        for pid in [proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        proc.wait(10)


@pytest.fixture
def store():
    """A job store hosted on 127.0.0.1 by this process, closed afterwards."""
    from distbelief.runtime.store import JobStore, new_token

    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=30)
    try:
        yield store
    finally:
        store.close()

