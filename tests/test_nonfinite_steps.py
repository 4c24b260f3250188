"""A NaN step spoils only itself: with ``--n-push N > 1`` a replica sums N steps'
gradients, and a step whose loss or gradient is NaN/inf is left out of that sum alone.

The oracle: one replica, fetch every step, push every 4, on digits with one poisoned
training sample (finite but huge, so the forward pass overflows to a NaN loss) that
falls in step 5. The shards must end with the parameters of a single-process
torch.optim run that sums each window's finite gradients, leaving out exactly step
5's, and applies the rule to the sum. Today's bug would refuse the whole window
(steps 4-7). A model-parallel replica (two partitions) must agree on the step: the
NaN reaches both partitions' gradients. Without a cluster: the push window's
bookkeeping, the worker threads (``--replica-workers``), and ``--on-nonfinite stop``.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import distbelief
from distbelief.algorithms.downpour.replica import PushWindow, _nonfinite
from distbelief.algorithms.downpour.workers import ReplicaWorkers
from distbelief.algorithms.schedule import push_after
from distbelief.data.datasets import load_dataset
from distbelief.data.sampling import BatchStream, replica_indices
from distbelief.model.flat import FlatModel
from distbelief.model.zoo import build_model
from distbelief.ps.rules import all_finite

SEED, BATCH, STEPS, N_PUSH, BAD_STEP, TRAIN = 3, 32, 10, 4, 5, 1400
LR, MOMENTUM = 0.02, 0.9

FACTORY = """
from sklearn.datasets import load_digits


def make():
    digits = load_digits()
    x = (digits.images / 16.0).reshape(-1, 1, 8, 8)
    x[{poison}] = 3e38  # finite, so the loader takes it; the forward pass overflows to NaN
    return {{"x": x[:{train}], "y": digits.target[:{train}],
            "x_test": x[{train}:], "y_test": digits.target[{train}:]}}
"""


def _stream(x: torch.Tensor, y: torch.Tensor) -> BatchStream:
    """Replica 0's batches in a one-replica job seeded SEED (as the replica draws them)."""
    return BatchStream(x, y, replica_indices(len(x), 0, 1, SEED), BATCH, seed=SEED * 1000)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> str:
    """A dataset factory whose batch of step BAD_STEP (only) holds the poisoned sample."""
    ids = torch.arange(TRAIN)
    stream = _stream(ids[:, None], ids)  # batches of sample numbers
    poison = int([stream.next()[1] for _ in range(BAD_STEP + 1)][BAD_STEP][0])
    path = tmp_path_factory.mktemp("data") / "poisoned.py"
    path.write_text(FACTORY.format(poison=poison, train=TRAIN))
    return f"{path}:make"


def reference(dataset: str) -> tuple[list[torch.Tensor], list[int]]:
    """The same training in one process: each window's finite gradients summed at the
    window's parameters, one momentum step on the sum. (parameters, skipped steps)."""
    data = load_dataset(dataset, seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", data.input_shape, data.num_classes)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    stream = _stream(data.x_train, data.y_train)
    sums = [torch.zeros_like(p) for p in params]
    kept, skipped = 0, []
    for step in range(STEPS):
        xb, yb = stream.next()
        loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        if math.isfinite(loss.item()) and all(all_finite(g) for g in grads):
            kept += 1
            for s, g in zip(sums, grads):
                s.add_(g)
        else:
            skipped.append(step)
        if push_after(step, N_PUSH, STEPS) and kept:
            for p, s in zip(params, sums):
                p.grad = s.clone()
            optimizer.step()
            sums, kept = [torch.zeros_like(p) for p in params], 0
    return [p.detach().clone() for p in params], skipped


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_nan_step_is_left_out_of_its_push_window_alone(poisoned, tmp_path, partitions):
    expected, skipped = reference(poisoned)
    assert skipped == [BAD_STEP]  # the poison does make exactly that step's loss NaN
    parted = (dict(partitions=2, split="layers", micro_batches=1) if partitions > 1 else {})
    summary = distbelief.train(dataset=poisoned, model="mlp", replicas=1, shards=2,
                               n_fetch=1, n_push=N_PUSH, rule="momentum", lr=LR,
                               momentum=MOMENTUM, batch_size=BATCH, steps=STEPS, seed=SEED,
                               threads=1, run_dir=str(tmp_path / "run"), **parted)
    assert summary["nonfinite_skipped"] == 1
    # every window was pushed and applied, the poisoned one with its 3 finite steps;
    # no shard was sent a non-finite gradient
    assert summary["shard_pushes"] == [3, 3]
    assert summary["pushes_acked"] == 6
    assert summary["nonfinite_refused"] == [0, 0]
    trained = distbelief.load_model(summary["run_dir"])
    for got, want in zip(trained.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return model, x, y


def _grad(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(xb), yb)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])


@pytest.mark.parametrize("bad", [[], [0], [2], [3], [0, 1, 2, 3]])
def test_the_push_window_sums_the_finite_steps_only(bad):
    model, x, y = _tiny()
    flat = FlatModel(model, grads=3)  # push buffers 0 and 1, scratch 2
    batches = [(x[4 * i: 4 * i + 4].clone(), y[4 * i: 4 * i + 4]) for i in range(4)]
    for i in bad:
        batches[i][0][1] = math.nan
    want = sum((_grad(model, xb, yb) for i, (xb, yb) in enumerate(batches) if i not in bad),
               torch.zeros(flat.numel))
    window = PushWindow(flat, scratch=2)
    window.begin(1)
    for xb, yb in batches:
        grad = window.target()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        window.keep() if math.isfinite(loss.item()) and all_finite(grad) else window.drop()
    assert window.kept == 4 - len(bad)
    torch.testing.assert_close(flat.grads[1], want)  # zero when every step was bad
    assert not flat.grads[0].any() and not flat.grads[2].any()


class _Batches:
    def __init__(self, batches):
        self.batches = iter(batches)

    def next(self):
        return next(self.batches)


def test_a_worker_thread_with_a_nan_batch_leaves_out_only_its_own():
    model, x, y = _tiny()
    flat = FlatModel(model, grads=1)
    good, bad = (x[:8], y[:8]), (x[8:].clone(), y[8:])
    bad[0][0] = math.inf
    start = flat.params.clone()
    want = _grad(model, *good)
    push = flat.grads[0]
    push.fill_(1.0)  # what earlier steps of the window left there
    with ReplicaWorkers(flat, threads=2, lr=0.1, timeout=30) as workers:
        loss, samples = workers.step(_Batches([good, bad]), push)
        assert samples == 8 and math.isfinite(loss)
        assert len(workers.skipped) == 1 and workers.skipped[0][1] == 8
        assert not math.isfinite(workers.skipped[0][0])
        torch.testing.assert_close(push, 1.0 + want)
        torch.testing.assert_close(flat.params, start - 0.1 * want)  # the local copy too
        loss, samples = workers.step(_Batches([bad, bad]), push)
        assert math.isnan(loss) and samples == 0 and len(workers.skipped) == 2
        torch.testing.assert_close(push, 1.0 + want)


class _Store:
    def __init__(self):
        self.keys = {}

    def set_json(self, key, value):
        self.keys[key] = value


class _Report:
    def __init__(self):
        self.skipped = []

    def skip_nonfinite(self, samples):
        self.skipped.append(samples)


def _ctx(on_nonfinite: str, part: int | None = None):
    config = types.SimpleNamespace(train=types.SimpleNamespace(on_nonfinite=on_nonfinite))
    return types.SimpleNamespace(config=config, store=_Store(), ident=2, part=part)


def test_a_skipped_step_is_counted_and_stop_names_the_client_and_the_culprit():
    ctx, report = _ctx("skip"), _Report()
    _nonfinite(ctx, report, 4, math.nan, 32)
    _nonfinite(ctx, report, 5, 1.5, 32)  # a finite loss, a non-finite gradient
    assert report.skipped == [32, 32] and not ctx.store.keys
    ctx = _ctx("stop")
    with pytest.raises(FloatingPointError, match="replica2: the loss of step 5 is not finite"):
        _nonfinite(ctx, _Report(), 4, math.inf, 32)
    assert ctx.store.keys == {"job/nonfinite": {"client": "replica2", "loss": "inf"}}
    ctx = _ctx("stop", part=1)
    with pytest.raises(FloatingPointError, match="replica2.part1: the gradient of step 6"):
        _nonfinite(ctx, _Report(), 5, None, 32)  # a pipeline stage that sees no loss
    assert ctx.store.keys == {"job/nonfinite": {"client": "replica2.part1"}}
