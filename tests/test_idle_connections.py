"""A role that goes quiet for longer than --timeout is not lost: a shard closes a
connection that sent nothing for the timeout (it cannot tell a quiet client from a dead
one), and the client makes a new one when it next needs the shard.

Regression: a job that ran longer than --timeout without evaluating failed at its end
("coordinator's pull from shard 0 got no answer within 4 s"), since the coordinator's
connection had been idle the whole run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from _cluster import CLI


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_job_longer_than_the_timeout_ends_with_its_evaluation(tmp_path, transport):
    run = tmp_path / "run"
    env_fault = {"DISTBELIEF_FAULTS": "replica.step/*/*=sleep:0.05"}  # ~10 s of steps
    done = subprocess.run(
        [*CLI, "train", "--dataset", "digits", "--model", "mlp", "--replicas", "1",
         "--shards", "1", "--steps", "200", "--timeout", "4", "--progress-timeout", "30",
         "--transport", transport, "--quiet", "--run-dir", str(run)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env_fault})
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_seconds"] > 8  # well past the 4 s timeout
    assert summary["test_accuracy"] > 0.8
    assert "sent nothing for the timeout" in (run / "logs" / "shard0.log").read_text()
