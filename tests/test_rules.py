"""The update rules' in-place form (`ps.rules`): bit for bit torch.optim, grad left alone,
and Adagrad's step bounded even when its stored sum loses a write."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from distbelief.config import OptimizerConfig
from distbelief.ps.rules import (STATE_SLOTS, InPlaceRule, adagrad_, make_rule, momentum_,
                                 sgd_)

NUMEL, STEPS, LR = 40, 6, 0.1

# rule -> (torch.optim oracle, the in-place function applied to (params, grad, state))
TABLE = {
    "sgd": (lambda p, wd: torch.optim.SGD(p, lr=LR, weight_decay=wd),
            lambda params, grad, state, wd: sgd_(params, grad, lr=LR, weight_decay=wd)),
    "momentum": (lambda p, wd: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=wd),
                 lambda params, grad, state, wd: momentum_(params, grad, state, lr=LR,
                                                           momentum=0.9, weight_decay=wd)),
    "nesterov": (lambda p, wd: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True,
                                               weight_decay=wd),
                 lambda params, grad, state, wd: momentum_(params, grad, state, lr=LR,
                                                           momentum=0.9, weight_decay=wd,
                                                           nesterov=True)),
    "adagrad": (lambda p, wd: torch.optim.Adagrad(p, lr=LR, weight_decay=wd),
                lambda params, grad, state, wd: adagrad_(params, grad, state, lr=LR, eps=1e-10,
                                                         weight_decay=wd)),
}

CONFIG = {"nesterov": {"rule": "momentum", "nesterov": True}}  # TABLE's names that are options


def _oracle_run(rule: str, weight_decay: float, apply) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, torch.optim's) parameters after STEPS random gradients; `apply(params, grad,
    state)` is our update."""
    params = torch.randn(NUMEL)
    slots = STATE_SLOTS[CONFIG.get(rule, {}).get("rule", rule)]
    state = torch.zeros(NUMEL * slots) if slots else None
    reference = torch.nn.Parameter(params.clone())
    optimizer = TABLE[rule][0]([reference], weight_decay)
    for _ in range(STEPS):
        grad = torch.randn(NUMEL)
        kept = grad.clone()
        apply(params, grad, state)
        assert torch.equal(grad, kept)  # a worker's private gradient is left alone
        reference.grad = grad.clone()
        optimizer.step()
    return params, reference.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("rule", sorted(TABLE))
def test_in_place_functions_are_torch_optim_bit_for_bit(rule, weight_decay):
    function = TABLE[rule][1]
    ours, theirs = _oracle_run(rule, weight_decay,
                               lambda p, g, s: function(p, g, s, weight_decay))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("rule", sorted(TABLE))
def test_in_place_rule_follows_its_config(rule, weight_decay):
    cfg = OptimizerConfig(**{"rule": rule, **CONFIG.get(rule, {})}, lr=LR,
                          weight_decay=weight_decay)
    ours, theirs = _oracle_run(rule, weight_decay,
                               lambda p, g, s: InPlaceRule(cfg, p, s).apply(g))
    assert torch.equal(ours, theirs)


def test_in_place_rule_state_lives_in_the_callers_tensor():
    shared = torch.zeros(2 * NUMEL)
    params, buf = shared[:NUMEL], shared[NUMEL:]
    params.copy_(torch.randn(NUMEL))
    grad = torch.randn(NUMEL)
    InPlaceRule(OptimizerConfig(rule="momentum", lr=LR), params, buf).apply(grad)
    assert torch.equal(shared[NUMEL:], grad)  # the first step's buffer is the gradient


def test_in_place_rule_refuses_what_it_cannot_do():
    params = torch.zeros(NUMEL)
    with pytest.raises(ValueError, match="rule 'adam' has no in-place form"):
        InPlaceRule(OptimizerConfig(rule="adam", lr=LR), params, None)
    with pytest.raises(ValueError, match="rule 'adamw' has no in-place form"):
        InPlaceRule(OptimizerConfig(rule="adamw", lr=LR), params, None)
    with pytest.raises(ValueError, match="rule 'adagrad' takes 1 state vectors of 40 values"):
        InPlaceRule(OptimizerConfig(rule="adagrad", lr=LR), params, None)
    with pytest.raises(ValueError, match="takes 1 state vectors"):
        InPlaceRule(OptimizerConfig(rule="momentum", lr=LR), params, torch.zeros(NUMEL + 1))
    with pytest.raises(ValueError, match="rule 'sgd' takes 0 state vectors"):
        InPlaceRule(OptimizerConfig(rule="sgd", lr=LR), params, torch.zeros(NUMEL))


class _LoseStores(TorchFunctionMode):
    """Every `copy_` is lost, as if another worker's concurrent write to the tensor won."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            return args[0]
        return func(*args, **(kwargs or {}))


def test_adagrad_divides_by_its_own_sum_not_the_stored_one():
    # Hogwild's shared sum may lose this very addition to another worker: dividing by the
    # stored (still zero) sum would step by grad / eps; ours steps by at most lr per element
    params, sums = torch.zeros(NUMEL), torch.zeros(NUMEL)
    grad = torch.randn(NUMEL)
    with _LoseStores():
        adagrad_(params, grad, sums, lr=LR, eps=1e-10)
    assert torch.equal(sums, torch.zeros(NUMEL))  # the store was indeed lost
    assert params.abs().max() <= LR * (1 + 1e-6)
    torch.testing.assert_close(params, -LR * grad.sign())


def test_default_eps_is_pytorchs():
    for rule, optimizer in (("adagrad", torch.optim.Adagrad), ("adam", torch.optim.Adam),
                            ("adamw", torch.optim.AdamW)):
        built = make_rule(OptimizerConfig(rule=rule, lr=LR), torch.zeros(NUMEL))
        default = optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults["eps"]
        assert built.optimizer.defaults["eps"] == default
    built = make_rule(OptimizerConfig(rule="adagrad", lr=LR, eps=1e-3), torch.zeros(NUMEL))
    assert built.optimizer.defaults["eps"] == 1e-3


@pytest.mark.parametrize("nesterov", [False, True])
def test_make_rule_momentum_is_torch_sgd_bit_for_bit(nesterov):
    params, reference = torch.randn(NUMEL), None
    reference = torch.nn.Parameter(params.clone())
    optimizer = torch.optim.SGD([reference], lr=LR, momentum=0.9, nesterov=nesterov)
    rule = make_rule(OptimizerConfig(rule="momentum", lr=LR, nesterov=nesterov), params)
    for _ in range(STEPS):
        grad = torch.randn(NUMEL)
        rule.apply(grad.clone())
        reference.grad = grad
        optimizer.step()
    assert torch.equal(params, reference.detach())
