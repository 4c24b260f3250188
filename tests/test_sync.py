"""Synchronous training (`--algorithm sync`): oracle, Project Adam's quorum, the Group."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distbelief
from distbelief.algorithms.schedule import quorum_size
from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
from distbelief.metrics.log import read_metrics
from distbelief.model.zoo import build_model
from distbelief.runtime.channel import ChannelClosed, Group

REPLICAS, STEPS, BATCH, SEED = 3, 20, 16, 5

OPTIMIZERS = {  # rule: (lr, torch.optim factory, shards of the distributed run)
    "sgd": (0.1, lambda params, lr: torch.optim.SGD(params, lr=lr), 2),
    "adagrad": (0.05, lambda params, lr: torch.optim.Adagrad(params, lr=lr), 1),
}


def reference_parameters(rule: str, replicas: int = REPLICAS) -> list[torch.Tensor]:
    """One process, torch.optim, each step on the concatenation of the first `replicas`
    replicas' batches."""
    lr, make, _ = OPTIMIZERS[rule]
    data = load_dataset("digits", seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", data.input_shape, data.num_classes)
    streams = [BatchStream(data.x_train, data.y_train,
                           replica_indices(len(data.x_train), r, REPLICAS, SEED), BATCH,
                           seed=SEED * 1000 + r)
               for r in range(REPLICAS)]
    optimizer = make(model.parameters(), lr)
    for _ in range(STEPS):
        batches = [s.next() for s in streams[:replicas]]
        xb = torch.cat([x for x, _ in batches])
        yb = torch.cat([y for _, y in batches])
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory):
    """One sync run per rule (shared by the oracle and its sharpness check)."""
    runs = {}
    for rule, (lr, _, shards) in OPTIMIZERS.items():
        summary = distbelief.train(algorithm="sync", dataset="digits", model="mlp",
                                   replicas=REPLICAS, shards=shards, rule=rule, lr=lr,
                                   batch_size=BATCH, steps=STEPS, seed=SEED, log_every=5,
                                   run_dir=str(tmp_path_factory.mktemp(rule) / "run"))
        runs[rule] = summary
    return runs


@pytest.mark.parametrize("rule", sorted(OPTIMIZERS))
def test_replicas_equal_one_process_with_their_batches_combined(sync_runs, rule):
    summary = sync_runs[rule]
    _assert_clean_exits(summary, shards=OPTIMIZERS[rule][2])
    trained = distbelief.load_model(summary["run_dir"])
    for got, want in zip(trained.parameters(), reference_parameters(rule)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    events = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert {(e["replica"], e["step"]) for e in train} == {
        (r, s) for r in range(REPLICAS) for s in (5, 10, 15, 20)}
    assert all(e["dropped"] == 0 and e["samples"] == 5 * BATCH for e in train)
    # every replica reports the loss of the same synchronous step
    assert len({round(e["loss"], 6) for e in train if e["step"] == 20}) == 1


@pytest.mark.parametrize("wrong", ["one replica's batches", "another rule"])
def test_oracle_is_sharp(sync_runs, wrong):
    """The runs do not match a reference that skips the all-reduce or uses another rule."""
    if wrong == "another rule":
        run, reference = sync_runs["adagrad"], reference_parameters("sgd")
    else:
        run, reference = sync_runs["sgd"], reference_parameters("sgd", replicas=1)
    trained = distbelief.load_model(run["run_dir"])
    assert any((got - want).abs().max() > 1e-3
               for got, want in zip(trained.parameters(), reference))


def _assert_clean_exits(summary: dict, shards: int) -> None:
    """Every role ended cleanly (the coordinator waits for all of them before it looks)."""
    codes = summary["exit_codes"]
    assert all(codes[f"shard{s}"] == 0 for s in range(shards)), codes
    assert all(codes[f"replica{r}"] == 0 for r in range(REPLICAS)), codes


def test_quorum_is_the_fastest_fraction_rounded_up():
    table = [(1.0, 3, 3), (2 / 3, 3, 2), (0.5, 3, 2), (0.1, 3, 1), (0.75, 4, 3), (0.9, 4, 4),
             (0.7, 10, 7), (1.0, 1, 1), (0.01, 1, 1)]
    assert [quorum_size(f, r) for f, r, _ in table] == [k for _, _, k in table]


def test_a_quorum_drops_the_slow_replica_and_still_learns(tmp_path):
    summary = distbelief.train(algorithm="sync", sync_fraction=2 / 3, slow_worker="2:8",
                               dataset="digits", model="mlp", replicas=3, shards=1,
                               rule="adagrad", lr=0.05, batch_size=32, steps=150, log_every=10,
                               run_dir=str(tmp_path / "run"))
    _assert_clean_exits(summary, shards=1)
    events = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    dropped = {r: sum(e["dropped"] for e in train if e["replica"] == r) for r in range(3)}
    samples = {r: sum(e["samples"] for e in train if e["replica"] == r) for r in range(3)}
    assert dropped[2] > 0, dropped
    # every step combined exactly two gradients (the replicas check it), so 150 * 2 batches
    assert sum(samples.values()) == 150 * 2 * 32
    assert samples[2] < samples[0] and samples[2] < samples[1], samples
    assert {e["step"] for e in train} == set(range(10, 151, 10))
    assert summary["test_accuracy"] >= 0.85
    # the coordinator trims the quorum keys (2 per step) and the events it has read
    assert summary["store_keys"] < 80, summary["store_keys"]


# ---- Group -------------------------------------------------------------------------

def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=20))


@pytest.fixture
def master():
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=20))
    yield store
    del store


def _run_members(target, count: int, timeout: float) -> dict:
    """Run target(rank, results) in `count` threads; every join is bounded."""
    results: dict = {}
    threads = [threading.Thread(target=target, args=(rank, results), daemon=True)
               for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a group member hung"
    return results


def test_group_all_reduce_sums_over_members(master):
    def member(rank, results):
        group = Group(_client(master.port), "pg/test", rank, 3, timeout=10)
        try:
            tensor = torch.arange(5, dtype=torch.float32) * (rank + 1)
            group.all_reduce_sum(tensor)
            results[rank] = tensor
        finally:
            group.close()

    results = _run_members(member, 3, timeout=30)
    for rank in range(3):
        torch.testing.assert_close(results[rank], torch.arange(5, dtype=torch.float32) * 6)


def test_group_member_that_stays_away_times_out_the_others(master):
    def member(rank, results):
        group = Group(_client(master.port), "pg/away", rank, 3, timeout=1)
        try:
            if rank == 2:
                time.sleep(2.5)  # alive, but never enters the collective
                return
            start = time.monotonic()
            with pytest.raises(ChannelClosed, match="pg/away"):
                group.all_reduce_sum(torch.ones(4))
            results[rank] = time.monotonic() - start
        finally:
            group.close()

    results = _run_members(member, 3, timeout=30)
    assert sorted(results) == [0, 1] and all(t < 5 for t in results.values()), results


MEMBER = """
import datetime, os, sys, torch, torch.distributed as dist
from distbelief.runtime.channel import Group
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), None, False,
                      timeout=datetime.timedelta(seconds=20))
group = Group(store, "pg/dies", 2, 3, timeout=20)
group.all_reduce_sum(torch.ones(4))
os._exit(3)  # dies without closing anything
"""


def test_group_member_that_dies_breaks_the_collective_at_once(master):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.Popen([sys.executable, "-c", MEMBER, str(master.port)], env=env)
    try:
        def member(rank, results):
            group = Group(_client(master.port), "pg/dies", rank, 3, timeout=20)
            try:
                tensor = torch.ones(4)
                group.all_reduce_sum(tensor)
                results[rank, "first"] = tensor
                start = time.monotonic()
                with pytest.raises(ChannelClosed, match="went away"):
                    group.all_reduce_sum(torch.ones(4))
                results[rank] = time.monotonic() - start
            finally:
                group.close()

        results = _run_members(member, 2, timeout=40)
        assert proc.wait(10) == 3
    finally:
        proc.kill()
        proc.wait()
    assert all(torch.equal(results[r, "first"], torch.full((4,), 3.0)) for r in (0, 1))
    # the peer's connection closed: no waiting for the 20 s timeout
    assert results[0] < 5 and results[1] < 5, results
