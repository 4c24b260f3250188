"""Downpour with model-parallel replicas, run as real processes.

One replica of K = 2 partitions must end with exactly the parameters of the same job
with an unpartitioned replica: with one replica, fetch = push = 1 and one thread per
process both runs are deterministic, and with one micro-batch a partition computes
every gradient with the same operations as the whole model (with more micro-batches
the sums' order depends on timing, tests/test_partition_oracle.py holds those to
1e-5). Every partition of every replica must have talked only to the shards that
hold its own parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distbelief
from distbelief.metrics.log import read_metrics

JOB = dict(dataset="mnist1d", model="mlp", replicas=1, lr=0.01, steps=750, seed=0, threads=1)


def final_params(run_dir) -> torch.Tensor:
    state = torch.load(Path(run_dir) / "model.pt", weights_only=True)
    return torch.cat([v.reshape(-1) for v in state.values()])


def own_shards_only(summary: dict) -> None:
    part = summary["partition"]
    for k, shards in enumerate(part["shards"]):
        for s in shards:
            clients = set(part["shard_clients"][s]) - {"coordinator"}
            assert clients == {f"replica{r}.part{k}" for r in range(summary["replicas"])}, (s, clients)


def test_a_partitioned_replica_ends_with_the_unpartitioned_parameters(tmp_path):
    whole = distbelief.train(**JOB, shards=2, run_dir=str(tmp_path / "whole"))
    parted = distbelief.train(**JOB, shards=3, partitions=2, split="layers", micro_batches=1,
                              run_dir=str(tmp_path / "parted"))
    assert parted["total_steps"] == whole["total_steps"] == 750
    assert torch.equal(final_params(parted["run_dir"]), final_params(whole["run_dir"]))
    assert parted["test_accuracy"] == whole["test_accuracy"]
    assert whole["test_accuracy"] > 0.4  # well above chance (0.1): it really learned
    part = parted["partition"]
    assert part["partitions"] == 2 and sum(part["balance"]) == 6
    assert sorted(s for group in part["shards"] for s in group) == [0, 1, 2]
    own_shards_only(parted)
    # each partition's shards applied every push
    assert parted["shard_pushes"] == [parted["total_steps"]] * 3
    assert all(code == 0 for code in parted["exit_codes"].values()), parted["exit_codes"]
    # the checkpoint is the whole model, loadable without any partitioning
    model = distbelief.load_model(parted["run_dir"])
    assert sum(p.numel() for p in model.parameters()) == parted["model"]["parameters"]


def test_units_split_of_a_locally_connected_model_trains(tmp_path):
    summary = distbelief.train(dataset="mnist1d", num_samples=4_000, model="lcnn", replicas=2,
                               shards=3, partitions=2, split="units", steps=60,
                               run_dir=str(tmp_path / "run"))
    own_shards_only(summary)  # with two replicas: both replicas' partition k, no other
    assert summary["partition"]["split"] == "units"
    assert summary["total_steps"] == 2 * 60
    assert summary["shard_pushes"] == [summary["total_steps"]] * 3
    assert summary["test_accuracy"] > 0.2
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    run = Path(summary["run_dir"])
    for r in range(2):
        for k in range(2):
            assert (run / "logs" / f"replica{r}.part{k}.log").is_file()
    # the train events come from the partition that sees the loss, one stream per replica
    train = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    assert {e["replica"] for e in train} == {0, 1}
    roles = json.loads((run / "cluster.json").read_text())["roles"]
    assert sorted((r["id"], r["part"]) for r in roles if r["kind"] == "replica") == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    # the checkpoint is in the whole model's order: it reproduces the reported accuracy
    model = distbelief.load_model(summary["run_dir"])
    data = distbelief.data.datasets.load_dataset("mnist1d", seed=0, num_samples=4_000)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(summary["test_accuracy"])
