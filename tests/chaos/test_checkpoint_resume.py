"""Checkpoints that resume: kill the coordinator (and with it every role) mid-run, then
``--resume`` the run directory; a deterministic job ends with exactly the parameters of
the same job run without interruption.

One-replica Downpour with fetch = push = 1 is deterministic: every step's gradient
is computed on the parameters after all earlier pushes. The shards checkpoint
their slices and the rule's state (AdamW here, with the update count its cosine
learning-rate schedule follows) at a pause in which every push was applied; the
replica resumes at the checkpoint's step with the data stream at the same
position. Synchronous training is deterministic too: the replicas agree through
their all-reduce on the step to pause at, and replica 0 checkpoints the
parameters (into the shards) and the rule's state. So is consensus ADMM with
every replica in every round: its replicas pause while they wait for a round's
answer, each writing its x, u, z and local rule's state; the shards hold z and
the contributions, the manifest the round closer's round and rho.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import distbelief
from distbelief.runtime.shm import SHM_DIR
from distbelief.checkpoint import read_manifest, write_atomic
from distbelief.errors import UserError
from distbelief.metrics.log import read_metrics

from _cluster import alive, wait_until

COMMON = dict(dataset="digits", model="mlp", shards=2, steps=200, checkpoint_every="40",
              log_every=5, seed=3)
# a learning-rate schedule is part of the state that must come back: the shards' (downpour)
# or the replicas' (sync) update counts are saved with the rule's state
SCHEDULED = dict(rule="adamw", lr=0.003, weight_decay=0.05, lr_schedule="cosine", warmup_steps=10)
# and so are BatchNorm's running statistics, each replica's, kept in the manifest
BATCHNORM = dict(model=f"{Path(__file__).resolve().parent.parent / '_models.py'}:mlp_bn")
JOBS = {"downpour-1-replica": dict(algorithm="downpour", replicas=1, **SCHEDULED, **BATCHNORM),
        "sync-2-replicas": dict(algorithm="sync", replicas=2, **SCHEDULED, **BATCHNORM),
        "admm-2-replicas": dict(algorithm="admm", replicas=2, local_steps=10)}


def cli_args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]


def final_params(run_dir) -> torch.Tensor:
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return torch.cat([v.reshape(-1) for v in state.values()])


@pytest.mark.parametrize("job", list(JOBS.values()), ids=list(JOBS))
def test_resumed_run_ends_with_the_uninterrupted_parameters(tmp_path, cli_job, job):
    options = {**COMMON, **job}
    whole = distbelief.train(**options, run_dir=str(tmp_path / "whole"))
    assert whole["steps"] == 200
    # per-step keys (events, sync quorums, the paused/go keys of older checkpoints) are
    # trimmed: untrimmed this job would leave well over 100
    assert whole["store_keys"] < 70, whole["store_keys"]
    run_dir = tmp_path / "run"
    # replica 0 three times slower (it sleeps; the maths is the same): the whole job runs in
    # about a second, and under load it had ended before the kill could come (at == 200)
    proc = cli_job(*cli_args({**options, "slow_worker": "0:3"}), "--run-dir", str(run_dir),
                   "--quiet")

    def checkpointed():
        try:
            return read_manifest(run_dir)["replica_steps"]["0"] >= 80
        except (UserError, KeyError, json.JSONDecodeError):
            return False

    wait_until(checkpointed, 120, "a checkpoint at step 80 or later")
    cluster = json.loads((run_dir / "cluster.json").read_text())
    roles, killed_job = cluster["roles"], cluster["job_id"]
    os.kill(proc.pid, signal.SIGKILL)  # the coordinator: its children must follow it
    proc.wait(30)
    wait_until(lambda: not any(alive(r["pid"]) for r in roles if r["pid"]), 20,
               "every role to die with the coordinator")
    assert not (run_dir / "summary.json").exists()
    manifest = read_manifest(run_dir)
    at = manifest["replica_steps"]["0"]
    assert 80 <= at < 200

    # resumed from the command line (the fixture reaps it and its roles by PID too)
    left = sorted(SHM_DIR.glob(f"distbelief-{killed_job}-*"))  # no one removed them
    again = cli_job("--resume", str(run_dir), "--quiet")
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    assert not any(p.exists() for p in left), left  # the resumed run did
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from"] == manifest["checkpoint"]
    assert resumed["total_steps"] == 200 * job["replicas"]
    torch.testing.assert_close(final_params(run_dir), final_params(tmp_path / "whole"),
                               rtol=0, atol=1e-6)
    assert resumed["test_accuracy"] == pytest.approx(whole["test_accuracy"])
    # the metrics go on in the same file: the resumed steps follow the checkpoint's
    steps = [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert steps[-1] == 200 and any(at < s <= at + 5 for s in steps)


def test_a_checkpoint_whose_rename_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    """A crash between the temporary file and the rename leaves the old file whole: the
    rename fails inside a checkpoint write, after the new file was written in full."""
    path = tmp_path / "shard0.pt"
    write_atomic(path, {"params": torch.ones(4)})
    renamed = []

    def failing_replace(src, dst):
        renamed.append(os.fspath(dst))
        assert torch.equal(torch.load(src, weights_only=True)["params"], torch.zeros(4))
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed before the rename"):
        write_atomic(path, {"params": torch.zeros(4)})
    monkeypatch.undo()
    assert renamed == [str(path)]  # the write got as far as the rename
    assert torch.equal(torch.load(path, weights_only=True)["params"], torch.ones(4))
    assert os.listdir(tmp_path) == ["shard0.pt"]  # and left no temporary file


def test_resume_refuses_a_run_without_checkpoints_and_extra_options(tmp_path):
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=1, steps=10,
                               run_dir=str(tmp_path / "run"))
    with pytest.raises(UserError, match="no checkpoint.*--checkpoint-every"):
        distbelief.train(resume=summary["run_dir"])
    with pytest.raises(UserError, match="--resume continues a run with its own config.*--lr"):
        distbelief.train(resume=summary["run_dir"], lr=0.1)
    with pytest.raises(UserError, match="not a run directory"):
        distbelief.train(resume=str(tmp_path / "nothing"))
