"""Learning-rate schedules and the rules added with them (`ps.rules.lr_at`, adamw, nesterov):
each equals torch.optim and torch.optim.lr_scheduler in one process."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler

from distbelief.config import OptimizerConfig
from distbelief.ps.rules import InPlaceRule, lr_at, make_rule

LR, TOTAL, NUMEL = 0.1, 40, 32


def torch_schedule(optimizer, schedule: str, warmup: int, total: int, step_every=None,
                   gamma=0.1):
    """The oracle: a LinearLR warmup, then the schedule, joined by SequentialLR."""
    main = {"constant": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
            "linear": lambda: lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0,
                                                     total_iters=total - warmup),
            "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup),
            "step": lambda: lr_scheduler.StepLR(optimizer, step_size=step_every, gamma=gamma),
            }[schedule]
    if not warmup:
        return main()
    first = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0,
                                  total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [first, main()], milestones=[warmup])


def torch_lrs(schedule, warmup, total, step_every=None, gamma=0.1) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = torch_schedule(optimizer, schedule, warmup, total, step_every, gamma)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = [("constant", 0, None), ("constant", 5, None), ("linear", 0, None), ("linear", 7, None),
         ("cosine", 0, None), ("cosine", 10, None), ("step", 0, 6), ("step", 4, 9)]


@pytest.mark.parametrize("schedule,warmup,step_every", CASES)
def test_lr_at_is_torchs_scheduler_at_every_step(schedule, warmup, step_every):
    want = torch_lrs(schedule, warmup, TOTAL, step_every, gamma=0.5)
    got = [lr_at(s, LR, schedule, warmup, TOTAL, step_every=step_every, gamma=0.5)
           for s in range(TOTAL)]
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-7, (step, g, w)


def test_lr_at_table():
    """The exact values, by hand: warmup (k + 1) / (W + 1), then the schedule."""
    assert [lr_at(s, 1.0, "constant", 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_at(s, 1.0, "linear", 0, 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert lr_at(2, 1.0, "cosine", 0, 4) == pytest.approx(0.5)
    assert lr_at(1, 1.0, "cosine", 1, 5) == 1.0
    assert lr_at(9, 1.0, "cosine", 0, 4) == 0.0  # past the total: stays at 0, never rises
    assert [lr_at(s, 1.0, "step", 1, step_every=2, gamma=0.5) for s in range(6)] == \
        [0.5, 1.0, 1.0, 0.5, 0.5, 0.25]
    assert lr_at(2, 1.0, "cosine", 2, 2) == 0.0  # no updates left after the warmup
    with pytest.raises(ValueError):
        lr_at(2, 1.0, "cosine", 0, None)  # the total is needed


def _stream(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=g) for _ in range(n)]


RULES = {  # our config -> the torch.optim oracle
    "adamw": (dict(rule="adamw", weight_decay=0.05),
              lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.05)),
    "nesterov": (dict(rule="momentum", momentum=0.9, nesterov=True, weight_decay=0.01),
                 lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True,
                                           weight_decay=0.01)),
    "adam": (dict(rule="adam"), lambda p: torch.optim.Adam(p, lr=LR)),
}


@pytest.mark.parametrize("schedule,warmup,step_every",
                         [("constant", 0, None), ("cosine", 8, None), ("linear", 3, None),
                          ("step", 2, 5)])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_shard_rule_sequence_equals_torch_optim_and_scheduler(rule, schedule, warmup,
                                                              step_every):
    """A one-replica shard: make_rule applied N times on a fixed gradient stream, its lr set
    from its own update count, is torch.optim stepped with its lr_scheduler."""
    options, oracle = RULES[rule]
    cfg = OptimizerConfig(lr=LR, lr_schedule=schedule, warmup_steps=warmup,
                          lr_step_every=step_every, **options)
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1))
    params = start.clone()
    ours = make_rule(cfg, params, total=TOTAL)
    reference = torch.nn.Parameter(start.clone())
    optimizer = oracle([reference])
    scheduler = torch_schedule(optimizer, schedule, warmup, TOTAL, step_every)
    for grad in _stream(TOTAL):
        ours.apply(grad.clone())
        reference.grad = grad.clone()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(params, reference.detach(), atol=1e-6, rtol=0)
    assert ours.updates == TOTAL


def test_constant_schedule_is_bit_for_bit():
    """No schedule: the lr is never touched, so the rule is torch.optim exactly."""
    options, oracle = RULES["adamw"]
    params = torch.zeros(NUMEL)
    ours = make_rule(OptimizerConfig(lr=LR, **options), params)
    reference = torch.nn.Parameter(torch.zeros(NUMEL))
    optimizer = oracle([reference])
    for grad in _stream(10):
        ours.apply(grad)
        reference.grad = grad.clone()
        optimizer.step()
    assert torch.equal(params, reference.detach())


def test_resume_continues_the_schedule():
    """The update count is part of the rule's state: stop half way, load the state into a
    new rule, and finish: the same parameters as one uninterrupted run."""
    cfg = OptimizerConfig(rule="adamw", lr=LR, lr_schedule="cosine", warmup_steps=5,
                          weight_decay=0.01)
    grads = _stream(TOTAL)
    whole = torch.zeros(NUMEL)
    rule = make_rule(cfg, whole, total=TOTAL)
    for grad in grads:
        rule.apply(grad)
    halves = torch.zeros(NUMEL)
    first = make_rule(cfg, halves, total=TOTAL)
    for grad in grads[:17]:
        first.apply(grad)
    state = first.state_dict()
    assert state["updates"] == 17
    second = make_rule(cfg, halves, total=TOTAL)
    second.load_state_dict(state)
    for grad in grads[17:]:
        second.apply(grad)
    assert torch.equal(whole, halves)


def test_in_place_rule_follows_the_schedule():
    """Hogwild's in-place form: its own count, the same lr as torch's scheduler."""
    cfg = OptimizerConfig(rule="momentum", lr=LR, momentum=0.9, nesterov=True,
                          lr_schedule="cosine", warmup_steps=4)
    params, buf = torch.zeros(NUMEL), torch.zeros(NUMEL)
    ours = InPlaceRule(cfg, params, buf, total=TOTAL)
    reference = torch.nn.Parameter(torch.zeros(NUMEL))
    optimizer = torch.optim.SGD([reference], lr=LR, momentum=0.9, nesterov=True)
    scheduler = torch_schedule(optimizer, "cosine", 4, TOTAL)
    for grad in _stream(TOTAL):
        ours.apply(grad)
        reference.grad = grad.clone()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(params, reference.detach(), atol=1e-6, rtol=0)


def test_cosine_needs_the_total():
    cfg = OptimizerConfig(rule="sgd", lr=LR, lr_schedule="cosine")
    with pytest.raises(ValueError, match="total"):
        make_rule(cfg, torch.zeros(3))
    assert math.isclose(lr_at(0, LR, "cosine", 0, 10), LR)


class _Scheduled:
    """torch.optim plus its lr_scheduler, stepped together (one_process_parameters' optimizer)."""

    def __init__(self, optimizer, scheduler):
        self.optimizer, self.scheduler = optimizer, scheduler

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()
        self.scheduler.step()


@pytest.mark.parametrize("rule,options,oracle", [
    ("adamw", {"weight_decay": 0.05},
     lambda p: torch.optim.AdamW(p, lr=0.003, weight_decay=0.05)),
    ("momentum", {"nesterov": True},
     lambda p: torch.optim.SGD(p, lr=0.003, momentum=0.9, nesterov=True)),
])
def test_downpour_one_replica_with_schedule_equals_torch(tmp_path, rule, options, oracle):
    """End to end: one-replica Downpour (fetch = push = 1, two shards) with a cosine schedule
    after a warmup, counted by each shard's applied pushes, is torch.optim stepped with
    torch's scheduler in one process."""
    import distbelief
    from _reference import one_process_parameters

    steps, warmup, seed = 25, 5, 3
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=2,
                               n_fetch=1, n_push=1, rule=rule, lr=0.003, batch_size=32,
                               steps=steps, seed=seed, lr_schedule="cosine",
                               warmup_steps=warmup, transport="gloo",
                               run_dir=str(tmp_path / "run"), **options)
    assert sum(summary["shard_pushes"]) == steps * 2
    trained = distbelief.load_model(summary["run_dir"])

    def make(params):
        optimizer = oracle(params)
        return _Scheduled(optimizer, torch_schedule(optimizer, "cosine", warmup, steps))

    expected = one_process_parameters(make, steps, 32, seed)
    for got, want in zip(trained.parameters(), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # sharp: without the schedule the same reference is far off
    plain = one_process_parameters(oracle, steps, 32, seed)
    assert any((got - want).abs().max() > 1e-4 for got, want in zip(trained.parameters(), plain))


def test_sync_replicas_schedule_by_their_steps(tmp_path):
    """End to end: sync with two replicas, --rule adamw and a step schedule after a warmup,
    each replica scheduling by its own steps, is one process on the combined batches with
    torch.optim.AdamW and torch's LinearLR+StepLR."""
    import torch.nn.functional as F

    import distbelief
    from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
    from distbelief.model.zoo import build_model

    replicas, steps, batch, seed, lr = 2, 20, 16, 5, 0.003
    summary = distbelief.train(algorithm="sync", dataset="digits", model="mlp",
                               replicas=replicas, shards=1, rule="adamw", lr=lr,
                               weight_decay=0.05, lr_schedule="step", warmup_steps=3,
                               lr_step_every=5, lr_gamma=0.5, batch_size=batch, steps=steps,
                               seed=seed, run_dir=str(tmp_path / "run"))
    trained = distbelief.load_model(summary["run_dir"])

    data = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    streams = [BatchStream(data.x_train, data.y_train,
                           replica_indices(len(data.x_train), r, replicas, seed), batch,
                           seed=seed * 1000 + r) for r in range(replicas)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch_schedule(optimizer, "step", 3, steps, step_every=5, gamma=0.5)
    for _ in range(steps):
        batches = [s.next() for s in streams]
        optimizer.zero_grad()
        F.cross_entropy(model(torch.cat([x for x, _ in batches])),
                        torch.cat([y for _, y in batches])).backward()
        optimizer.step()
        scheduler.step()
    for got, want in zip(trained.parameters(), model.parameters()):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)


def test_hogwild_one_worker_nesterov_with_schedule_equals_torch(tmp_path):
    """End to end: one Hogwild worker (the in-place momentum_ with nesterov, its lr from its
    own step count) is torch.optim.SGD(nesterov=True) with torch's scheduler."""
    import distbelief
    from _reference import one_process_parameters

    steps, warmup, seed, lr = 25, 4, 3, 0.05
    summary = distbelief.train(algorithm="hogwild", workers=1, dataset="digits", model="mlp",
                               rule="momentum", nesterov=True, lr=lr, lr_schedule="linear",
                               warmup_steps=warmup, batch_size=32, steps=steps, seed=seed,
                               run_dir=str(tmp_path / "run"))
    trained = distbelief.load_model(summary["run_dir"])

    def make(params):
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        return _Scheduled(optimizer, torch_schedule(optimizer, "linear", warmup, steps))

    expected = one_process_parameters(make, steps, 32, seed)
    for got, want in zip(trained.parameters(), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
