"""Oracle: the places that compute a loss compute the job's task's, for regression too.

Partitions run in threads of this process over the runtime's channels (as in
tests/test_partition_oracle.py), with ``make_task("regress")``: the pipeline over
2 stages (1 and 3 micro-batches) and the units split give the loss and every
parameter gradient of a single-process ``F.mse_loss`` on the whole model within
1e-5; ADMM's dual layers train on a regression task (K = 1 is plain Adam on
``F.mse_loss``, bit for bit; K = 2 runs and its loss falls); Downpour's worker
threads and the planner's whole step compute the task's loss; and a runner given
no task computes classify's cross-entropy.
"""

from __future__ import annotations

import copy
import datetime
import math
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distbelief.algorithms.admm.layers import (DualLayersConfig, build_parts, round_batches,
                                               run_round, train_dual_layers)
from distbelief.model.partition import PartitionPlan, WholeRunner, open_partition
from distbelief.task import make_task

TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(outputs: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, outputs))


def regression(target_shape: tuple[int, ...], n: int = 12, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, *target_shape, generator=gen)


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of F.mse_loss on the whole model in this process."""
    ref = copy.deepcopy(model)
    loss = F.mse_loss(ref(x).reshape(y.shape), y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1) for p in ref.parameters()])


def run_partitions(plan: PartitionPlan, model: nn.Module, x, y, task) -> list[dict]:
    """One train step of every partition, each in a thread; their loss, report flag and
    flat gradient."""
    host = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=TIMEOUT))
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            client = dist.TCPStore("127.0.0.1", host.port, None, False,
                                   timeout=datetime.timedelta(seconds=TIMEOUT))
            part = plan.part_module(copy.deepcopy(model), k)
            with open_partition(plan, part, k, store=client, name="task", timeout=TIMEOUT,
                                task=task) as run:
                loss = run.train_step(x, y)
                run.flush()
                results[k] = {"loss": loss, "reports": run.reports_loss,
                              "grads": torch.cat([p.grad.reshape(-1) for p in part.parameters()])}
        except BaseException as exc:  # re-raised below, with its traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True)
               for k in range(plan.partitions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "a partition hung"
    if errors:
        raise errors[0]
    return [results[k] for k in range(plan.partitions)]


def check(plan: PartitionPlan, model: nn.Module, x, y) -> None:
    out = run_partitions(plan, model, x, y, make_task("regress"))
    loss, grads = reference(model, x, y)
    perm = plan.permutation(model)
    got = torch.cat([r["grads"] for r in out])
    torch.testing.assert_close(got, grads if perm is None else grads[perm], atol=1e-5,
                               rtol=1e-5)
    reporters = [r for r in out if r["reports"]]
    assert len(reporters) == 1
    assert reporters[0]["loss"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("micro", [1, 3])
def test_pipeline_of_two_stages_gives_mse_loss_and_gradients(micro):
    model = mlp(1)  # scalar targets: the model's (N, 1) output is compared as (N,)
    x, y = regression(())
    check(PartitionPlan("layers", 2, (2, 3), micro), model, x, y)


def test_pipeline_with_vector_targets():
    model = mlp(3)
    x, y = regression((3,))
    check(PartitionPlan("layers", 2, (3, 2), 3), model, x, y)


def test_units_split_gives_mse_loss_and_gradients():
    model = mlp(4)  # 4 output units: 2 per partition
    x, y = regression((4,))
    check(PartitionPlan("units", 2), model, x, y)


def test_whole_runner_uses_the_task_and_defaults_to_cross_entropy():
    model = mlp(4)
    x, y = regression((4,))
    loss, grads = reference(model, x, y)
    whole = copy.deepcopy(model)
    assert WholeRunner(whole, task=make_task("regress")).train_step(x, y) == pytest.approx(
        loss, abs=1e-6)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in whole.parameters()]),
                               grads, atol=1e-6, rtol=1e-6)
    labels = torch.tensor([0, 3, 1, 2] * 3)
    plain = copy.deepcopy(model)
    expected = F.cross_entropy(plain(x), labels)
    assert WholeRunner(copy.deepcopy(model)).train_step(x, labels) == pytest.approx(
        expected.item(), abs=1e-6)


def test_dual_layers_one_part_is_adam_on_mse():
    """K = 1 under a regression task is plain Adam on F.mse_loss, bit for bit."""
    model = mlp(2)
    x, y = regression((2,), n=64)
    oracle = copy.deepcopy(model)
    kw = dict(rounds=3, local_steps=4, batch_size=16, rho=1.0, lr=1e-2, lr_p=1.0, seed=3)
    hist = train_dual_layers(model, PartitionPlan(), x, y, task=make_task("regress"), **kw)
    opt = torch.optim.Adam(oracle.parameters(), lr=kw["lr"])
    losses = []
    for r in range(kw["rounds"]):
        for group in opt.param_groups:
            group["lr"] = kw["lr"] * 0.5 * (1 + math.cos(math.pi * r / kw["rounds"]))
        step_losses = []
        for rows in round_batches(len(x), r, local_steps=kw["local_steps"],
                                  batch_size=kw["batch_size"], seed=kw["seed"]):
            opt.zero_grad()
            loss = F.mse_loss(oracle(x[rows]), y[rows])
            loss.backward()
            opt.step()
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / len(step_losses))
    assert hist.loss == losses
    for a, b in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(a, b)


def test_dual_layers_two_parts_accept_a_regress_task():
    """The last part's per-row terms are the task's per-sample losses; training lowers
    the loss and every value stays finite."""
    model = mlp(1)
    x, y = regression((), n=64)
    task = make_task("regress")
    cfg = DualLayersConfig(rho=1.0, lr=1e-2, lr_p=1.0, local_steps=4, batch_size=16,
                           decay_rounds=20)
    parts = build_parts(model, PartitionPlan("layers", 2, (4, 1)), x, y, cfg, task)
    rows = torch.arange(5)
    out = parts[1].module(parts[1].p[rows])
    torch.testing.assert_close(parts[1]._right_terms(out, rows),
                               F.mse_loss(out.reshape(-1), y[rows], reduction="none"))
    losses = [run_round(parts) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert math.isfinite(parts[0].boundary_residual())


def test_replica_workers_use_the_task():
    from distbelief.algorithms.downpour.workers import ReplicaWorkers
    from distbelief.model.flat import FlatModel

    model = mlp(3)
    x, y = regression((3,))
    loss, grads = reference(model, x, y)
    flat = FlatModel(copy.deepcopy(model), grads=1)
    push = torch.zeros(flat.numel)

    class Feed:
        def next(self):
            return x, y

    with ReplicaWorkers(flat, threads=1, lr=0.0, timeout=30,
                        task=make_task("regress")) as workers:
        got, samples = workers.step(Feed(), push)
    assert (got, samples) == (pytest.approx(loss, abs=1e-6), len(y))
    torch.testing.assert_close(push, grads, atol=1e-6, rtol=1e-6)


def test_planner_whole_step_times_the_task_loss():
    from distbelief.planner.profile import _whole_step

    task, calls = make_task("regress"), []

    class Counting:
        def loss(self, output, target, reduction="mean"):
            calls.append(reduction)
            return task.loss(output, target, reduction)

    model = mlp(3)
    x, y = regression((3,))
    assert _whole_step(model, x, y, 2, Counting()) > 0
    assert calls == ["mean"] * 3  # a warm-up and two timed steps
    assert all(p.grad is None for p in model.parameters())
