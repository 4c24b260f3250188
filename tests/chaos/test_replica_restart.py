"""Replicas that die are replaced: with --restart-replicas the coordinator starts a new
process for a SIGKILLed replica, which joins through the store, pulls fresh parameters
and takes over the lost replica's remaining steps. Three kills in one run still finish
the job, with every replica's steps done and no process left behind."""

from __future__ import annotations

import json
import os
import signal

import psutil

from distbelief.metrics.log import read_metrics

from _cluster import alive, wait_until

STEPS = 4000


def replica_pid(coordinator: psutil.Process, run_dir, r: int) -> int | None:
    """The PID of the running process of replica `r`: a process of the job writing its log."""
    log = str(run_dir / "logs" / f"replica{r}.log")
    for child in coordinator.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE \
                    and any(f.path == log for f in child.open_files()):
                return child.pid
        except psutil.Error:
            continue
    return None


def trained_since(run_dir, r: int, since: float) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    return any(e["event"] == "train" and e["replica"] == r and e["time"] > since
               for e in read_metrics(path))


def test_three_replica_kills_are_replaced_and_the_job_finishes(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "3", "--shards", "2",
                   "--steps", str(STEPS), "--log-every", "20", "--restart-replicas",
                   "--run-dir", str(run_dir), "--quiet")
    coordinator = psutil.Process(proc.pid)
    killed: list[int] = []
    since = 0.0
    for victim in (1, 2, 1):
        def ready():
            pid = replica_pid(coordinator, run_dir, victim)
            return pid if pid not in killed and trained_since(run_dir, victim, since) else None

        pid = wait_until(ready, 120, f"replica {victim} (a fresh process) to train")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        since = max(e["time"] for e in read_metrics(run_dir / "metrics.jsonl"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replica_restarts"] == {"1": 2, "2": 1}
    assert summary["replicas_lost"] == 0
    assert summary["test_accuracy"] >= 0.9
    events = read_metrics(run_dir / "metrics.jsonl")
    restarted = [e["replica"] for e in events if e["event"] == "replica_restarted"]
    assert restarted == [1, 2, 1]
    # every replica, replaced or not, reached the last step
    last = {}
    for e in events:
        if e["event"] == "train":
            last[e["replica"]] = e["step"]
    assert last == {0: STEPS, 1: STEPS, 2: STEPS}
    assert not any(alive(pid) for pid in killed)
