"""Tests for distbelief.data.samples (and the feed over it): the same rows from tensors, a
memory map and a torch Dataset; DataLoader streams with and without reader processes;
the worker rule; per-sample checks."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import torch

from distbelief.data.datasets import evaluate_split
from distbelief.data.feed import ReplicaFeed
from distbelief.data.samples import (SLOW_SAMPLE_SECONDS, ArraySamples, TensorSamples,
                                     TorchSamples)
from distbelief.errors import UserError
from distbelief.job import JobConfig
from distbelief.model.evaluate import evaluate
from distbelief.task import Targets

X = np.random.default_rng(1).standard_normal((40, 2, 3))  # float64: every source converts
Y = np.arange(40) % 3
ROWS = np.random.default_rng(2).permutation(40)[:30]  # a split: positions -> rows


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x=X, y=Y, delay: float = 0.0, workers: int | None = None):
        self.x, self.y, self.delay = x, y, delay
        if workers is not None:
            self.num_workers = workers

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return torch.from_numpy(self.x[i]), int(self.y[i])


def torch_samples(dataset=None, rows=ROWS, workers=None) -> TorchSamples:
    dataset = dataset if dataset is not None else Pairs()
    return TorchSamples(dataset, rows, input_shape=(2, 3), targets=Targets((), 3),
                        source="test data", workers=getattr(dataset, "num_workers", None) if workers is None else workers)


def all_sources(tmp_path) -> dict:
    np.save(tmp_path / "x.npy", X)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    return {"tensors": TensorSamples(torch.from_numpy(X[ROWS].astype(np.float32)),
                                     torch.from_numpy(Y[ROWS])),
            "memmap": ArraySamples(mapped, Y, ROWS),
            "dataset": torch_samples()}


def test_every_source_gathers_the_same_rows(tmp_path):
    sources = all_sources(tmp_path)
    positions = torch.tensor([5, 0, 29, 5, 17])
    want = sources["tensors"].gather(positions)
    assert want[0].dtype == torch.float32 and want[1].dtype == torch.int64
    for name, samples in sources.items():
        assert len(samples) == 30 and samples.input_shape == (2, 3), name
        x, y = samples.gather(positions)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1]), name
        assert torch.equal(samples.head(4)[0], want[0].new_tensor(X[ROWS[:4]].astype(np.float32)))
        batches = list(samples.in_order(7))
        assert [len(b[1]) for b in batches] == [7, 7, 7, 7, 2], name
        assert torch.equal(torch.cat([b[0] for b in batches]), sources["tensors"].x), name


def test_feed_and_evaluation_agree_across_sources(tmp_path):
    cfg = JobConfig.from_dict({"cluster": {"replicas": 2}, "data": {"batch_size": 4},
                               "train": {"seed": 5}})
    sources = all_sources(tmp_path)
    feeds = {name: ReplicaFeed(s, None, cfg, 1) for name, s in sources.items()}
    reference = ReplicaFeed(sources["tensors"].x, sources["tensors"].y, cfg, 1)  # tensors
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    try:
        for step in [0, 1, 2, 3, 4, 9, 2, 3]:  # in order, then jumps (a resumed stream)
            want = reference.batch(step)
            for name, feed in feeds.items():
                got = feed.batch(step)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (name, step)
        tensors = sources["tensors"]
        for name, samples in sources.items():
            assert evaluate_split(model, samples, batch_size=8) == \
                evaluate(model, tensors.x, tensors.y, batch_size=8), name
    finally:
        for feed in feeds.values():
            feed.close()


def test_reader_processes_give_the_same_batches_and_leave_the_global_generator_alone():
    order = [torch.tensor([3, 1, 4]), torch.tensor([15, 9, 2]), torch.tensor([6, 5, 3]),
             torch.tensor([5, 8, 9]), torch.tensor([7, 9, 3])]
    plain = list(torch_samples(workers=0).stream(order))
    state, before = torch.get_rng_state(), set(multiprocessing.active_children())
    with torch_samples(Pairs(workers=2)).stream(order, seed=1, timeout=30) as batches:
        served = list(batches)
        assert batches.workers == 2
    assert torch.equal(state, torch.get_rng_state())  # the model's init draws are untouched
    assert len(served) == len(plain) == 5
    for a, b in zip(plain, served):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(multiprocessing.active_children()) <= before  # closing stopped them


def test_a_slow_dataset_gets_reader_processes_and_closing_stops_them():
    before = set(multiprocessing.active_children())
    samples = torch_samples(Pairs(delay=2 * SLOW_SAMPLE_SECONDS))
    batches = samples.stream(iter(torch.arange(30).split(3)), timeout=30)
    first, second = next(batches), next(batches)
    assert batches.workers >= 1 and set(multiprocessing.active_children()) - before
    assert torch.equal(second[1], torch.from_numpy(Y[ROWS[3:6]]))
    batches.close()
    assert set(multiprocessing.active_children()) <= before
    fast = torch_samples().stream(torch.arange(30).split(3))
    next(fast)
    assert fast.workers == 0


@pytest.mark.parametrize("seconds, declared, want", [
    (1e-5, None, 0), (0.0, 3, 3), (1.0, 0, 0), (SLOW_SAMPLE_SECONDS, None, "some")])
def test_worker_rule(seconds, declared, want):
    got = torch_samples(workers=declared).workers_for(seconds)
    assert got >= 1 if want == "some" else got == want


@pytest.mark.parametrize("item, fragment", [
    (np.zeros(3), "return a pair"),
    ((np.zeros((2, 3)), 3), "outside 0..2"),
    ((np.zeros((2, 3)), -1), "has value -1"),
    ((np.zeros((2, 3)), 1.5), "class ids"),
    ((np.zeros((2, 3)), torch.tensor([0, 1, 0])), "not one-hot"),
    ((np.zeros((3, 2)), 1), "same shape"),
    ((np.array(["a", "b"]), 1), "not numeric"),
    ((np.float64(2.0), 1), "at least one dimension"),
])
def test_bad_samples_are_refused_in_one_line(item, fragment):
    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return item
    with pytest.raises(UserError, match=fragment) as info:
        torch_samples(One(), rows=None).gather(torch.tensor([0]))
    assert "\n" not in str(info.value)


def test_labels_as_numpy_and_0d_tensors_and_integral_floats_are_accepted():
    items = [(np.zeros((2, 3)), np.int64(2)), (torch.zeros(2, 3), torch.tensor(1)),
             (np.zeros((2, 3), dtype=np.float16), 0.0)]

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return items[i]
    x, y = torch_samples(Mixed(), rows=None).gather(torch.tensor([0, 1, 2]))
    assert y.tolist() == [2, 1, 0] and x.dtype == torch.float32
