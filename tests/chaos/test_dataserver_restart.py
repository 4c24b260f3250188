"""A data server that dies (SIGKILL) is replaced: the coordinator starts a new one, the
replica connects to it and asks for its stream from the first step it had not
received, and training completes on exactly the batches it would have had: the
parameters equal one process's with the same augmented batches."""

from __future__ import annotations

import json
import os
import signal

import torch

import distbelief
from distbelief.metrics.log import read_metrics

from _cluster import alive, role_pid, wait_until
from _dataserve import AUGMENT, BATCH, LR, SEED, reference

STEPS = 300


def trained_to(run_dir, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(e["event"] == "train" and e["step"] >= step
                                 for e in read_metrics(path))


def test_killed_data_server_is_replaced_and_the_stream_goes_on_exactly(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text("[augment]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                              for k, v in AUGMENT.items()))
    proc = cli_job(str(config), "--data-servers", "1", "--dataset", "digits", "--model", "mlp",
                   "--replicas", "1", "--shards", "1", "--n-fetch", "1", "--n-push", "1",
                   "--rule", "sgd", "--lr", str(LR), "--batch-size", str(BATCH), "--seed",
                   str(SEED), "--steps", str(STEPS), "--log-every", "10", "--timeout", "60",
                   "--run-dir", str(run_dir), "--quiet")
    wait_until(lambda: trained_to(run_dir, 30), 120, "the replica to train 30 steps")
    victim = role_pid(run_dir, "dataserver", 0)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    data = summary["data"]
    [replaced] = data["servers_replaced"]
    assert (replaced["server"], replaced["generation"]) == (0, 1)
    assert data["replica_failovers"] == {"0": 1}
    assert 0 < data["batches_served"][0] <= STEPS + 1  # a batch in flight may be sent again
    assert summary["total_steps"] == STEPS and summary["replicas_lost"] == 0
    assert any(e["event"] == "dataserver_lost" for e in read_metrics(run_dir / "metrics.jsonl"))
    assert not alive(victim)
    trained = [p.detach() for p in distbelief.load_model(run_dir).parameters()]
    for got, want in zip(trained, reference(AUGMENT, STEPS)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
