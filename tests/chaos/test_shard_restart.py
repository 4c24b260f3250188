"""A parameter shard that dies is restarted from its last checkpoint: the coordinator
notices, starts a replacement that restores the slice and its Adagrad state, the
replicas connect to it again and training completes; summary.json says which shard was
lost and how many of its updates (the version it last reported minus the version of
the checkpoint it was restored from)."""

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
REPORT_PERIOD = 0.2  # a shard reports its version this often (distbelief.ps.serve)


def shard_lost_events(run_dir) -> list[dict]:
    return [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "shard_lost"]


def test_killed_shard_restarts_from_its_checkpoint_and_the_job_completes(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "2", "--shards", "2",
                   "--steps", str(STEPS), "--log-every", "20", "--checkpoint-every", "500",
                   "--run-dir", str(run_dir), "--quiet")

    def settled_checkpoint() -> bool:
        """Checkpoint 2 or later, old enough that the shard has reported a version since
        (about 1.3 s pass between checkpoints here)."""
        try:
            manifest = read_manifest(run_dir)
        except (UserError, json.JSONDecodeError):
            return False
        return manifest["checkpoint"] >= 2 and time.time() - manifest["time"] >= REPORT_PERIOD + 0.3

    wait_until(settled_checkpoint, 120, "a second checkpoint, settled", poll=0.02)
    victim = role_pid(run_dir, "shard", 1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: shard_lost_events(run_dir), 60, "the restart of shard 1", poll=0.02)
    # what the replacement restored: no checkpoint completes until it is up and 500 more
    # steps are done (it cannot without shard 1, and the coordinator restarts the shard
    # from the manifest on disk before it goes on)
    manifest = read_manifest(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    [lost] = summary["shards_lost"]
    assert lost["shard"] == 1 and lost["checkpoint"] == manifest["checkpoint"] >= 2
    # restored from exactly the checkpoint's slice, and what it lost is measured from it
    assert lost["restored_version"] == manifest["shards"][1]["version"] >= 400
    assert lost["version_at_loss"] >= lost["restored_version"]  # reported after that checkpoint
    assert lost["updates_lost"] == lost["version_at_loss"] - lost["restored_version"]
    assert summary["replicas_lost"] == 0
    assert summary["total_steps"] == 2 * STEPS
    assert summary["test_accuracy"] >= 0.9
    [event] = shard_lost_events(run_dir)
    assert {k: v for k, v in event.items() if k not in ("event", "time")} == lost
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
