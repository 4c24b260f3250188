"""A parameter shard that dies is restarted from its last checkpoint: the coordinator
notices, starts a replacement that restores the slice and its Adagrad state, the
replicas connect to it again and training completes; summary.json says which shard was
lost and about how many of its updates."""

from __future__ import annotations

import json
import os
import signal
import time

from distbelief.checkpoint import read_manifest
from distbelief.errors import UserError
from distbelief.metrics.log import read_metrics

from _cluster import alive, role_pid, wait_until

STEPS = 3000


def test_killed_shard_restarts_from_its_checkpoint_and_the_job_completes(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "2", "--shards", "2",
                   "--steps", str(STEPS), "--log-every", "20", "--checkpoint-every", "200",
                   "--run-dir", str(run_dir), "--quiet")

    def checkpointed():
        try:
            return read_manifest(run_dir)["checkpoint"] >= 2
        except (UserError, json.JSONDecodeError):
            return False

    wait_until(checkpointed, 120, "two checkpoints")
    victim = role_pid(run_dir, "shard", 1)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    [lost] = summary["shards_lost"]
    assert lost["shard"] == 1 and lost["checkpoint"] >= 2
    assert lost["updates_lost"] >= 0 and lost["restored_version"] >= 400
    assert summary["replicas_lost"] == 0
    assert summary["total_steps"] == 2 * STEPS
    assert summary["test_accuracy"] >= 0.9
    events = read_metrics(run_dir / "metrics.jsonl")
    assert any(e["event"] == "shard_lost" and e["shard"] == 1 for e in events)
    assert not alive(victim)


def test_a_checkpoint_under_way_is_abandoned_at_once_when_a_shard_dies(tmp_path):
    """A replica blocked on a dead shard cannot pause, and the shard is restarted only once
    the checkpoint ends: waiting for it out would stall the job for the whole timeout."""
    from distbelief.checkpoint import CheckpointDriver
    from distbelief.runtime.store import JobStore, new_token

    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=30)
    messages: list[str] = []
    try:
        driver = CheckpointDriver(store, tmp_path, "10", shards=2, timeout=30, meta={},
                                  message=messages.append)
        began = time.monotonic()
        written = driver.take(lambda number: ["1"], lambda number: {"0": 10, "1": 7},
                              lost_shard=lambda: 1)
        assert written is None and time.monotonic() - began < 5
        assert messages == ["checkpoint 1 abandoned: shard 1 was lost"]
        assert store.has("ckpt/1/go")  # the replicas that did pause go on
    finally:
        store.close()
