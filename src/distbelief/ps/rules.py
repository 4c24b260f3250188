"""Update rules applied inside a parameter shard.

DistBelief applies the update (e.g. Adagrad) inside each shard, on the shard's
own slice, so replicas only ever send gradients. Every rule here is elementwise,
so applying it per slice is exactly the same maths as applying it to the whole
vector. The rules are PyTorch's own optimizers over the shard's slice, so a
one-replica Downpour run reproduces `torch.optim` to rounding.

Not thread-safe: the shard calls `apply` under its lock.

`all_finite` is the check a gradient passes before a rule may apply it (the
shards' and the synchronous replicas').

Example::

    rule = make_rule(OptimizerConfig(rule="adagrad", lr=0.1), params)  # params: 1-D tensor
    rule.apply(grad)          # params updated in place
"""

from __future__ import annotations

import math

import torch

from distbelief.config import OptimizerConfig


class Rule:
    """One torch.optim optimizer over a shard's 1-D parameter slice (updated in place)."""

    def __init__(self, name: str, optimizer_cls, params: torch.Tensor, **options):
        self.name = name
        self.param = torch.nn.Parameter(params, requires_grad=True)  # shares params' storage
        self.optimizer = optimizer_cls([self.param], **options)

    def apply(self, grad: torch.Tensor) -> None:
        """Apply one update with this gradient (same shape as the slice)."""
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_rule(cfg: OptimizerConfig, params: torch.Tensor) -> Rule:
    """Build the rule named by cfg.rule over `params` (a 1-D float tensor)."""
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.rule == "sgd":
        return Rule("sgd", torch.optim.SGD, params, **common)
    if cfg.rule == "momentum":
        return Rule("momentum", torch.optim.SGD, params, momentum=cfg.momentum, **common)
    if cfg.rule == "adagrad":
        eps = 1e-10 if cfg.eps is None else cfg.eps
        return Rule("adagrad", torch.optim.Adagrad, params, eps=eps, **common)
    if cfg.rule == "adam":
        eps = 1e-8 if cfg.eps is None else cfg.eps
        return Rule("adam", torch.optim.Adam, params, betas=(cfg.beta1, cfg.beta2), eps=eps,
                    **common)
    raise ValueError(f"unknown rule {cfg.rule!r}")


def all_finite(grad: torch.Tensor) -> bool:
    """True when every value of `grad` is finite.

    One read-only reduction instead of `isfinite(grad).all()`, which writes and
    reads a mask as large as the gradient (and was the costliest part of a push):
    a NaN or inf anywhere makes the sum NaN or inf. A sum that overflowed from
    finite values alone is told apart element by element.
    """
    return math.isfinite(float(grad.sum())) or bool(torch.isfinite(grad).all())
