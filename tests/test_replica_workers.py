"""Downpour with `--replica-workers T` (Project Adam's multi-threaded replica)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import distbelief
from distbelief.algorithms.downpour.workers import ReplicaWorkers
from distbelief.job import JobConfig, apply_options
from distbelief.data.datasets import BatchStream
from distbelief.errors import UserError
from distbelief.model.flat import FlatModel


def _stream(seed: int = 0) -> BatchStream:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    return BatchStream(x, y, torch.arange(64), batch_size=4, seed=seed)


class Recorder(torch.nn.Module):
    """A linear model that records every batch its forward pass sees."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)
        self.seen: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            self.seen.append(x.clone())
        return self.linear(x)


def test_workers_batches_together_are_the_replicas_batch_sequence():
    model = Recorder()
    flat = FlatModel(model, grads=1)
    expected = _stream()
    with ReplicaWorkers(flat, threads=2, lr=0.01, timeout=30) as workers:
        stream = _stream()
        for _ in range(5):
            before = len(model.seen)
            loss, samples = workers.step(stream, flat.grads[0])
            assert samples == 8 and math.isfinite(loss)
            step_batches = model.seen[before:]
            wanted = [expected.next()[0] for _ in range(2)]  # the step's two batches, in order
            assert len(step_batches) == 2
            assert any(torch.equal(step_batches[0], w) for w in wanted)
            assert any(torch.equal(step_batches[1], w) for w in wanted)
            assert not torch.equal(step_batches[0], step_batches[1])


def test_one_worker_adds_its_gradient_and_takes_a_plain_sgd_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    flat = FlatModel(model, grads=1)
    push = flat.grads[0]
    push.fill_(1.0)  # what earlier steps of the push window left there
    ref_stream, optimizer = _stream(), torch.optim.SGD(reference.parameters(), lr=0.05)
    summed = [torch.ones_like(p) for p in reference.parameters()]
    with ReplicaWorkers(flat, threads=1, lr=0.05, timeout=30) as workers:
        stream = _stream()
        for _ in range(3):
            workers.step(stream, push)
            xb, yb = ref_stream.next()
            optimizer.zero_grad()
            F.cross_entropy(reference(xb), yb).backward()
            for s, p in zip(summed, reference.parameters()):
                s.add_(p.grad)
            optimizer.step()
    torch.testing.assert_close(flat.params, torch.cat([p.detach().reshape(-1)
                                                       for p in reference.parameters()]))
    torch.testing.assert_close(push, torch.cat([s.reshape(-1) for s in summed]))


def test_replica_workers_is_refused_with_partitions():
    with pytest.raises(UserError, match="--replica-workers 2 does not work with --partitions 2"):
        apply_options(JobConfig(), {"replica_workers": 2, "partitions": 2}).validate()
    with pytest.raises(UserError, match="--replica-workers must be >= 1"):
        apply_options(JobConfig(), {"replica_workers": 0}).validate()


def test_two_threads_per_replica_train_and_push_as_scheduled(tmp_path):
    replicas, shards, n_push, batch = 2, 2, 2, 64
    summary = distbelief.train(dataset="mnist1d", model="mlp", replicas=replicas, shards=shards,
                               replica_workers=2, n_fetch=2, n_push=n_push, rule="adagrad",
                               lr=0.02, batch_size=batch, epochs=0.5, log_every=20,
                               run_dir=str(tmp_path / "run"))
    # a step takes one batch per thread: half an epoch of each replica's 20,000 samples
    steps = math.ceil(0.5 * 20_000 / (2 * batch))
    assert summary["steps"] == steps and summary["total_steps"] == replicas * steps
    pushes = replicas * math.ceil(steps / n_push)
    assert summary["shard_pushes"] == [pushes] * shards
    assert summary["pushes_acked"] == pushes * shards
    assert summary["test_accuracy"] > 0.4  # chance is 0.10
