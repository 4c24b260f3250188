"""Dual layers (ADMM across a layer split): oracles and the schedule's tables.

* digits with the zoo MLP cut in two learns (>= 0.90 test accuracy) and its boundary
  comes to agree (residual 100x below its first round);
* the parts' local steps in any order give bit-identical results, and one thread per
  part holding its own copy of its layers, talking only through queues, gives
  exactly the single-process run;
* K = 1 is plain Adam on the same rows;
* each dual is the running sum of the exchanged mismatches, the same on both sides.
"""

from __future__ import annotations

import copy
import doctest
import math
import queue
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distbelief.algorithms.admm import layers
from distbelief.algorithms.admm.layers import (DualLayersConfig, DualLayersPart, build_parts,
                                               compose_weights, exchange, round_batches,
                                               round_lr, run_round, step_order, touched_rows,
                                               train_dual_layers)
from distbelief.data.datasets import load_dataset
from distbelief.model.evaluate import evaluate
from distbelief.model.partition import PartitionPlan
from distbelief.model.zoo import build_model

# the digits settings (measured: 0.99 test accuracy, residual ~1000x down, ~5 s)
TUNED = dict(rounds=300, local_steps=10, batch_size=64, rho=1.0, lr=1e-3, lr_p=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def mlp(ds, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_model("mlp", ds.input_shape, ds.num_classes)


def small_problem(n: int = 96, seed: int = 0):
    """A Flatten/Linear/ReLU stack of 6 layers and random data: cheap, any K up to 3."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 3, 4, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 5))
    return model, x, y


def state(parts: list[DualLayersPart]) -> list[torch.Tensor]:
    """Every tensor a part holds, in a fixed order."""
    out = []
    for part in parts:
        out += [t.detach() for t in part.module.parameters()]
        for name in ("p", "eta", "q_left", "u_left", "q_right", "p_right", "u_right"):
            if getattr(part, name, None) is not None:
                out.append(getattr(part, name))
    return out


# --- the schedule: pure functions --------------------------------------------------

def test_docstring_examples():
    assert doctest.testmod(layers).failed == 0


def test_round_batches_is_pure_and_walks_epochs():
    kw = dict(local_steps=3, batch_size=4, seed=7)
    first = [round_batches(10, r, **kw) for r in range(4)]
    again = [round_batches(10, r, **kw) for r in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for ra, rb in zip(first, again) for a, b in zip(ra, rb))
    flat = [b for r in first for b in r]
    assert all(len(b) == 4 for b in flat)
    per_epoch = 10 // 4  # two batches of each permutation, the last 2 rows sit out
    for e in range(len(flat) // per_epoch):
        rows = torch.cat(flat[e * per_epoch:(e + 1) * per_epoch])
        assert len(rows.unique()) == len(rows) == 8
    other = round_batches(10, 0, local_steps=3, batch_size=4, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(first[0], other))
    assert torch.equal(touched_rows(first[0]), torch.cat(first[0]).unique())


def test_step_order_table():
    assert step_order(3, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert step_order(3, 2, interleave=True) == [(2, 0), (1, 0), (0, 0), (2, 1), (1, 1), (0, 1)]


def test_round_lr_is_a_cosine_to_zero():
    assert [round_lr(2.0, r, 0) for r in (0, 5)] == [2.0, 2.0]
    assert round_lr(2.0, 0, 10) == 2.0
    assert round_lr(2.0, 5, 10) == pytest.approx(1.0)
    assert round_lr(2.0, 10, 10) == round_lr(2.0, 99, 10) == 0.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr_p"):
        DualLayersConfig(lr_p=0)
    with pytest.raises(ValueError, match="batch_size"):
        round_batches(5, 0, local_steps=1, batch_size=6, seed=0)
    model, x, y = small_problem()
    with pytest.raises(ValueError, match="layer split"):
        build_parts(model, PartitionPlan("units", 2), x, y, DualLayersConfig())
    part = build_parts(model, PartitionPlan("layers", 2, (3, 3)), x, y, DualLayersConfig())[0]
    with pytest.raises(RuntimeError, match="outgoing"):
        part.incoming(torch.arange(4), from_right=torch.zeros(4, 16))


# --- oracles -------------------------------------------------------------------------

def test_digits_mlp_two_parts_learns_and_agrees(digits):
    """The cut is after the second ReLU (balance (5, 1)): the boundary is a ReLU output, so
    part 1 is one Linear and each row's problem is smooth and convex in its input. A cut
    at a Linear output leaves a ReLU in part 1, whose kinks keep the residual near 1e-1."""
    model = mlp(digits)
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU,
                                        nn.Linear]
    plan = PartitionPlan(split="layers", partitions=2, balance=(5, 1))
    hist = train_dual_layers(model, plan, digits.x_train, digits.y_train, seed=0, **TUNED)
    accuracy = evaluate(model, digits.x_test, digits.y_test)["accuracy"]  # the plain f1(f0(x))
    first, last = hist.residual[0][0], hist.residual[-1][0]
    print(f"accuracy {accuracy:.3f}, residual {first:.2e} -> {last:.2e} "
          f"({first / last:.0f}x), {hist.seconds:.1f} s")
    assert accuracy >= 0.90
    assert first > 0 and last * 100 <= first
    assert len(hist.loss) == TUNED["rounds"] and hist.loss[-1] < hist.loss[0]


@pytest.mark.parametrize("balance", [(5, 1), (2, 2, 2)])
def test_local_step_order_changes_nothing(balance):
    """Steps interleaved across parts, last part first, equal each part's steps in turn
    bit for bit: no part reads a neighbour's state from inside the round."""
    runs = []
    for interleave in (False, True):
        model, x, y = small_problem()
        plan = PartitionPlan("layers", len(balance), balance)
        cfg = DualLayersConfig(rho=1.0, lr=1e-2, lr_p=1.0, local_steps=3, batch_size=16,
                               decay_rounds=8)
        parts = build_parts(model, plan, x, y, cfg)
        losses = [run_round(parts, interleave=interleave) for _ in range(6)]
        runs.append((losses, state(parts)))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


def test_one_thread_per_part_equals_single_process():
    """Each part in its own thread with its own copy of its layers, talking only through
    queues as over `Link`s, then `compose_weights`: the single-process run exactly."""
    model, x, y = small_problem()
    plan = PartitionPlan("layers", 3, (2, 2, 2))
    cfg = DualLayersConfig(rho=1.0, lr=1e-2, lr_p=1.0, local_steps=3, batch_size=16,
                           decay_rounds=5)
    rounds = 5
    reference = copy.deepcopy(model)
    parts = build_parts(reference, plan, x, y, cfg)
    for _ in range(rounds):
        run_round(parts)

    fwd = [queue.Queue() for _ in range(2)]  # boundary k: part k -> k+1
    bwd = [queue.Queue() for _ in range(2)]  # boundary k: part k+1 -> k
    modules, errors = {}, []

    def work(k: int) -> None:
        try:
            module = plan.part_module(copy.deepcopy(model), k)
            inputs = x if k == 0 else fwd[k - 1].get(timeout=30)
            part = DualLayersPart(module, k, 3, inputs, targets=y if k == 2 else None,
                                  config=cfg)
            if k < 2:
                fwd[k].put(part.initial_output.clone())
            for _ in range(rounds):
                batches = part.batches()
                part.local_steps(batches)
                rows = touched_rows(batches)
                out = part.outgoing(rows)
                if "left" in out:
                    bwd[k - 1].put(out["left"])
                if "right" in out:
                    fwd[k].put(out["right"])
                part.incoming(rows, from_left=fwd[k - 1].get(timeout=30) if k > 0 else None,
                              from_right=bwd[k].get(timeout=30) if k < 2 else None)
            modules[k] = part.module
        except BaseException as exc:  # re-raised below, with its traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    composed = compose_weights(copy.deepcopy(model), plan, [modules[k] for k in range(3)])
    for a, b in zip(composed.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(composed.parameters()), next(model.parameters()))


def test_one_part_is_plain_adam_on_the_same_rows():
    model, x, y = small_problem()
    oracle = copy.deepcopy(model)
    kw = dict(rounds=4, local_steps=5, batch_size=16, rho=1.0, lr=1e-2, lr_p=1.0, seed=3)
    hist = train_dual_layers(model, PartitionPlan(), x, y, **kw)
    assert hist.residual == [[]] * kw["rounds"]

    opt = torch.optim.Adam(oracle.parameters(), lr=kw["lr"])
    losses = []
    for r in range(kw["rounds"]):
        for group in opt.param_groups:
            group["lr"] = kw["lr"] * 0.5 * (1 + math.cos(math.pi * r / kw["rounds"]))
        step_losses = []
        for rows in round_batches(len(x), r, local_steps=kw["local_steps"],
                                  batch_size=kw["batch_size"], seed=kw["seed"]):
            opt.zero_grad()
            loss = F.cross_entropy(oracle(x[rows]), y[rows])
            loss.backward()
            opt.step()
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / len(step_losses))
    assert hist.loss == losses
    for a, b in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(a, b)


def test_dual_is_the_sum_of_exchanged_mismatches():
    model, x, y = small_problem()
    plan = PartitionPlan("layers", 3, (2, 2, 2))
    cfg = DualLayersConfig(rho=1.0, lr=1e-2, lr_p=1.0, local_steps=2, batch_size=16)
    parts = build_parts(model, plan, x, y, cfg)
    for k in range(2):  # initialised by one forward pass: the boundaries agree
        assert torch.equal(parts[k].q_right, parts[k + 1].p)
        assert parts[k].boundary_residual() == 0.0
    sums = [torch.zeros_like(parts[k].q_right) for k in range(2)]
    for r in range(5):
        batches = parts[0].batches()
        for part in parts:
            part.local_steps(batches)
        rows = touched_rows(batches)
        exchange(parts, rows)
        for k in range(2):
            left, right = parts[k], parts[k + 1]
            # both sides hold the same exchanged values ...
            assert torch.equal(left.p_right, right.p) and torch.equal(right.q_left, left.q_right)
            sums[k][rows] = sums[k][rows] + (left.q_right[rows] - left.p_right[rows])
            # ... and the same dual: the running sum of q_k - p_{k+1} over the rounds
            assert torch.equal(left.u_right, sums[k]) and torch.equal(right.u_left, sums[k])
            if r == 0:  # only the rows of round 0 moved, and only at the last boundary:
                # before the loss's signal crossed it, every other part's terms are 0
                untouched = torch.ones(len(x), dtype=torch.bool)
                untouched[rows] = False
                assert not left.u_right[untouched].any()
                assert (left.u_right[rows].abs().sum() > 0) == (k == 1)
    assert parts[0].round == 5
