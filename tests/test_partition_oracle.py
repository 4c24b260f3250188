"""Oracle: a partitioned model gives the unpartitioned model's outputs, loss and gradients.

Each partition runs in its own thread with its own store connection and talks to
the others only over the runtime's channels, exactly as partition processes do.
For every kind of split (layer-wise pipeline, Linear by units, locally connected
spatially) and K = 2 and 3, the logits, the loss and every parameter gradient
(put back in the whole model's order) must equal a plain forward/backward of
the whole model within 1e-5.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distbelief.errors import UserError
from distbelief.model.locally_connected import LocallyConnected1d, LocallyConnected2d
from distbelief.model.partition import PartitionPlan, open_partition, plan_partitions
from distbelief.model.zoo import build_model

TIMEOUT = 30.0


def run_partitions(plan: PartitionPlan, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Train step and predict on K threads; (losses, flat grads in shard order, logits, bytes)."""
    host = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                         timeout=__import__("datetime").timedelta(seconds=TIMEOUT))
    k_count = plan.partitions
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            client = dist.TCPStore("127.0.0.1", host.port, None, False,
                                   timeout=__import__("datetime").timedelta(seconds=TIMEOUT))
            part = plan.part_module(copy.deepcopy(model), k)
            with open_partition(plan, part, k, store=client, name="oracle",
                                timeout=TIMEOUT) as run:
                loss = run.train_step(x, y)
                run.flush()
                grads = torch.cat([p.grad.reshape(-1) for p in part.parameters()])
                logits = run.predict(x)
                results[k] = {"loss": loss, "grads": grads, "logits": logits,
                              "reports": run.reports_loss, "bytes": run.bytes_sent}
        except BaseException as exc:  # the test thread re-raises it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(k_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "a partition hung"
    if errors:
        raise errors[0]
    return [results[k] for k in range(k_count)]


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    ref = copy.deepcopy(model)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    with torch.no_grad():
        logits = ref(x)
    return loss.item(), grads, logits


def check(plan: PartitionPlan, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    out = run_partitions(plan, model, x, y)
    loss, grads, logits = reference(model, x, y)
    perm = plan.permutation(model)
    expected = grads if perm is None else grads[perm]
    got = torch.cat([r["grads"] for r in out])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    reporters = [r for r in out if r["reports"]]
    assert len(reporters) == 1
    assert reporters[0]["loss"] == pytest.approx(loss, abs=1e-5)
    produced = [r["logits"] for r in out if r["logits"] is not None]
    assert produced, "no partition produced logits"
    for lg in produced:
        torch.testing.assert_close(lg, logits, atol=1e-5, rtol=1e-5)
    return out


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20),
                         nn.Tanh(), nn.Linear(20, 10))


def lc1d() -> nn.Sequential:
    return nn.Sequential(LocallyConnected1d(2, 4, 40, 5, stride=2, padding=2), nn.ReLU(),
                         LocallyConnected1d(4, 6, 20, 3, stride=1, padding=1), nn.Sigmoid(),
                         LocallyConnected1d(6, 3, 20, 4, stride=2, padding=0), nn.ReLU(),
                         nn.Flatten(), nn.Linear(27, 10))


def lc2d() -> nn.Sequential:
    return nn.Sequential(LocallyConnected2d(1, 3, (9, 8), 3, stride=1, padding=1), nn.Tanh(),
                         LocallyConnected2d(3, 4, (9, 8), (3, 2), stride=(2, 1), padding=(1, 0)),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 7, 10))


def data(shape, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("micro", [1, 4])
def test_layer_split_pipeline_equals_whole_model(k, micro):
    model = mlp()
    x, y = data((40,))
    plan = plan_partitions(model, partitions=k, split="layers", balance=None,
                           micro_batches=micro, sample=x)
    assert sum(plan.balance) == len(model)
    out = check(plan, model, x, y)
    assert out[-1]["reports"]
    # only boundary activations and their gradients travelled: 2 * (batch x width) floats
    widths = {2: [30], 3: None}[k]
    if widths:
        assert sum(r["bytes"] for r in out) >= 2 * 12 * 4 * min(widths)


@pytest.mark.parametrize("k", [2, 3])
def test_layer_split_of_the_cnn_equals_whole_model(k):
    model = build_model("cnn", (1, 40), 10)
    x, y = data((1, 40), n=10)
    plan = plan_partitions(model, partitions=k, split="layers", balance=None,
                           micro_batches=3, sample=x)
    check(plan, model, x, y)


@pytest.mark.parametrize("k", [2, 3])
def test_linear_split_by_units_equals_whole_model(k):
    model = mlp()
    x, y = data((40,))
    plan = plan_partitions(model, partitions=k, split="units", balance=None, micro_batches=1,
                           sample=x)
    out = check(plan, model, x, y)
    # partition k holds its block of each layer's units
    sizes = [r["grads"].numel() for r in out]
    total = sum(p.numel() for p in model.parameters())
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 3 * (41 + 31 + 21)


@pytest.mark.parametrize("k", [2, 3])
def test_locally_connected_1d_split_spatially_equals_whole_model(k):
    model = lc1d()
    x, y = data((2, 40))
    plan = plan_partitions(model, partitions=k, split="units", balance=None, micro_batches=1,
                           sample=x)
    check(plan, model, x, y)


@pytest.mark.parametrize("k", [2, 3])
def test_locally_connected_2d_split_spatially_equals_whole_model(k):
    model = lc2d()
    x, y = data((1, 9, 8))
    plan = plan_partitions(model, partitions=k, split="units", balance=None, micro_batches=1,
                           sample=x)
    check(plan, model, x, y)


def test_only_boundary_receptive_fields_cross_between_locally_connected_layers():
    """Two stacked locally connected layers split the same way: the second needs from its
    neighbour only the input positions under its boundary receptive fields (a kernel of 3
    reaches one position across), forward, and their gradients back, nothing more."""
    def model(stacked: bool) -> nn.Sequential:
        torch.manual_seed(0)
        lcs = [LocallyConnected1d(1, 8, 64, 3, padding=1), nn.ReLU()]
        if stacked:
            lcs += [LocallyConnected1d(8, 8, 64, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*lcs, nn.Flatten(), nn.Linear(8 * 64, 10))

    x, y = data((1, 64), n=4)
    plan = PartitionPlan("units", 2)
    single = run_partitions(plan, model(False), x, y)
    stacked = check(plan, model(True), x, y)
    halo = 1 * 8 * 4 * 4  # one position x 8 channels x 4 samples x 4 bytes
    for one, two in zip(single, stacked):
        # train_step and predict each cross the boundary forwards; train_step backwards too
        assert two["bytes"] - one["bytes"] == 3 * halo


def test_units_split_refuses_a_layer_it_cannot_cut():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10))
    with pytest.raises(UserError, match="cannot be split by units.*--split layers"):
        plan_partitions(model, partitions=2, split="units", balance=None, micro_batches=1,
                        sample=torch.zeros(2, 1, 40))


def test_units_split_refuses_too_narrow_a_layer():
    model = nn.Sequential(nn.Linear(8, 2))
    with pytest.raises(UserError, match="2 output units, fewer than --partitions 3"):
        plan_partitions(model, partitions=3, split="units", balance=None, micro_batches=1,
                        sample=torch.zeros(2, 8))


def test_partitioning_needs_a_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(UserError, match="needs the model to be an nn.Sequential"):
        plan_partitions(Net(), partitions=2, split="layers", balance=None, micro_batches=1,
                        sample=torch.zeros(2, 4))


@pytest.mark.parametrize("balance, match", [
    ("2,2", "sums to 4 but the model has 6 layers"),
    ("6", "1 entries but --partitions is 2|has 1 entr"),
])
def test_bad_balance_is_refused(balance, match):
    with pytest.raises(UserError, match=match):
        plan_partitions(mlp(), partitions=2, split="layers", balance=balance, micro_batches=1,
                        sample=torch.zeros(2, 40))


def test_more_partitions_than_layers_is_refused():
    with pytest.raises(UserError, match="more than the model's 2 layers"):
        plan_partitions(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), partitions=3,
                        split="layers", balance=None, micro_batches=1, sample=torch.zeros(2, 4))


def test_a_partition_without_parameters_is_refused():
    with pytest.raises(UserError, match="no parameters"):
        plan_partitions(mlp(), partitions=2, split="layers", balance="1,5", micro_batches=1,
                        sample=torch.zeros(2, 40))


def test_measured_balance_puts_the_big_layer_alone():
    """A layer that dominates both compute time and parameter bytes gets a partition alone."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 8192))
    plan = plan_partitions(model, partitions=2, split="layers", balance=None, micro_batches=1,
                           sample=torch.zeros(64, 16))
    assert plan.balance == (4, 1)
