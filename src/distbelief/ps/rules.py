"""Update rules: the maths every algorithm applies to its parameters, in one place.

DistBelief applies the update (e.g. Adagrad) inside each shard, on the shard's
own slice, so replicas only ever send gradients. Every rule here is elementwise,
so applying it per slice is exactly the same maths as applying it to the whole
vector. Two forms:

- `make_rule` -> `Rule`: PyTorch's own optimizer over a 1-D slice, owning its
  state (checkpointed with `state_dict`). The shards and the synchronous
  replicas use it, so a one-replica Downpour run reproduces `torch.optim` to
  rounding. Not thread-safe: the shard calls `apply` under its lock.
- `sgd_`, `momentum_`, `adagrad_` and `InPlaceRule`: the same maths as
  `torch.optim` (bit for bit: tests/test_rules.py) written as in-place tensor
  operations on parameter and state tensors the caller owns, e.g. views into
  memory that several processes share (Hogwild) or a replica's local copy that
  its worker threads update (Project Adam). They take no lock: concurrent calls
  on the same tensors race element by element, which those algorithms allow.
  `torch.optim` cannot do this: it keeps its state to itself, and its Adagrad
  divides by the stored sum (see `adagrad_`).

`lr_at` is the learning-rate schedule (--lr-schedule, --warmup-steps), a pure
function of the rule's own count of applied updates: both forms set their lr from
it before each update, so a shard schedules by the pushes it applied and a
replica by its local steps. It equals `torch.optim.lr_scheduler` (a LinearLR
warmup, then LinearLR, CosineAnnealingLR or StepLR, joined by SequentialLR;
tests/test_schedules.py).

`all_finite` is the check a gradient passes before a rule may apply it (the
shards' and the synchronous replicas').

Example::

    rule = make_rule(OptimizerConfig(rule="adagrad", lr=0.1), params)  # params: 1-D tensor
    rule.apply(grad)          # params updated in place

    sgd_(params, grad, lr=0.1)          # params -= 0.1 * grad, in place; grad unchanged
"""

from __future__ import annotations

import math

import torch

from distbelief.config import OptimizerConfig

DEFAULT_EPS = {"adagrad": 1e-10, "adam": 1e-8, "adamw": 1e-8}  # PyTorch's, used when cfg.eps is None

STATE_SLOTS = {"sgd": 0, "momentum": 1, "adagrad": 1}
"""The rules with an in-place form, and how many state vectors (each as long as the
parameters) it keeps: momentum's buffer, Adagrad's sum of squared gradients. Adam has
none: its bias correction needs a step count, which racing updaters cannot share (AdamW
neither)."""


def lr_at(step: int, base_lr: float, schedule: str = "constant", warmup: int = 0,
          total: int | None = None, *, step_every: int | None = None,
          gamma: float = 0.1) -> float:
    """The learning rate of update `step` (0-based: the updates applied before it).

    Warmup: update k < warmup uses base_lr * (k + 1) / (warmup + 1), rising linearly to
    base_lr at update `warmup` (torch's LinearLR with start_factor 1 / (warmup + 1)).
    After it, with s = step - warmup and n = total - warmup updates left:

    - constant: base_lr
    - linear:   base_lr * (1 - s / n), down to 0 at update `total`
    - cosine:   base_lr * (1 + cos(pi * s / n)) / 2, down to 0 at update `total`
    - step:     base_lr * gamma ** (s // step_every)

    linear and cosine need `total`; from it on they stay at 0 (torch's cosine would rise
    again: a shard whose count overshoots its estimate must not), and a warmup that
    reaches `total` goes straight to 0 after it (--epochs can make a job that short).

    Example::

        lr_at(0, 0.1, "cosine", warmup=4, total=104)    # 0.02, the first warmup step
        lr_at(54, 0.1, "cosine", warmup=4, total=104)   # 0.05, half way down
    """
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    s = step - warmup
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        if not step_every or step_every < 1:
            raise ValueError("the step schedule needs step_every >= 1")
        return base_lr * gamma ** (s // step_every)
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}")
    if total is None:
        raise ValueError(f"the {schedule} schedule needs the total of updates")
    n = total - warmup
    if s >= n:
        return 0.0
    if schedule == "linear":
        return base_lr * (1 - s / n)
    return base_lr * (1 + math.cos(math.pi * s / n)) / 2


class Schedule:
    """cfg's lr schedule over `total` updates, counted by the caller (see `lr_at`)."""

    def __init__(self, cfg: OptimizerConfig, total: int | None):
        self.cfg, self.total = cfg, total
        schedule = getattr(cfg, "lr_schedule", "constant")
        if schedule in ("linear", "cosine") and total is None:
            raise ValueError(f"--lr-schedule {schedule} needs the job's total updates")

    @property
    def active(self) -> bool:
        return getattr(self.cfg, "lr_schedule", "constant") != "constant" or bool(
            getattr(self.cfg, "warmup_steps", 0))

    def lr(self, updates: int) -> float:
        c = self.cfg
        return lr_at(updates, c.lr, c.lr_schedule, c.warmup_steps, self.total,
                     step_every=c.lr_step_every, gamma=c.lr_gamma)


class Rule:
    """One torch.optim optimizer over a shard's 1-D parameter slice (updated in place).

    `updates` counts the updates applied; with a schedule, each update's lr is
    `schedule.lr(updates)`. The count is part of `state_dict`, so a resumed job
    continues its schedule."""

    def __init__(self, name: str, optimizer_cls, params: torch.Tensor,
                 schedule: Schedule | None = None, **options):
        self.name = name
        self.param = torch.nn.Parameter(params, requires_grad=True)  # shares params' storage
        self.optimizer = optimizer_cls([self.param], **options)
        self.schedule = schedule if schedule is not None and schedule.active else None
        self.updates = 0

    def apply(self, grad: torch.Tensor) -> None:
        """Apply one update with this gradient (same shape as the slice)."""
        if self.schedule is not None:
            self.optimizer.param_groups[0]["lr"] = self.schedule.lr(self.updates)
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.updates += 1

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.updates = int(state["updates"])
        else:  # a checkpoint written before the count was kept
            self.optimizer.load_state_dict(state)


def make_rule(cfg: OptimizerConfig, params: torch.Tensor, total: int | None = None) -> Rule:
    """Build the rule named by cfg.rule over `params` (a 1-D float tensor). `total`: the
    updates this rule will apply in the whole job, for --lr-schedule linear and cosine."""
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
              "schedule": Schedule(cfg, total)}
    if cfg.rule == "sgd":
        return Rule("sgd", torch.optim.SGD, params, **common)
    if cfg.rule == "momentum":
        return Rule("momentum", torch.optim.SGD, params, momentum=cfg.momentum,
                    nesterov=getattr(cfg, "nesterov", False), **common)
    if cfg.rule == "adagrad":
        return Rule("adagrad", torch.optim.Adagrad, params, eps=_eps(cfg), **common)
    if cfg.rule == "adam":
        return Rule("adam", torch.optim.Adam, params, betas=(cfg.beta1, cfg.beta2),
                    eps=_eps(cfg), **common)
    if cfg.rule == "adamw":  # decoupled: params *= 1 - lr * weight_decay, then Adam's step
        return Rule("adamw", torch.optim.AdamW, params, betas=(cfg.beta1, cfg.beta2),
                    eps=_eps(cfg), **common)
    raise ValueError(f"unknown rule {cfg.rule!r}")


def _eps(cfg: OptimizerConfig) -> float:
    return DEFAULT_EPS[cfg.rule] if cfg.eps is None else cfg.eps


# ---- the in-place form ----------------------------------------------------------------
# Each function updates `params` (and its state) in place and leaves `grad` unchanged: it
# is often a worker's private buffer, still to be pushed or reused.


def sgd_(params: torch.Tensor, grad: torch.Tensor, *, lr: float,
         weight_decay: float = 0.0) -> None:
    """SGD: params -= lr * g, where g = grad + weight_decay * params (torch.optim.SGD)."""
    params.add_(_decayed(grad, params, weight_decay), alpha=-lr)


def momentum_(params: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, *, lr: float,
              momentum: float, weight_decay: float = 0.0, nesterov: bool = False) -> None:
    """SGD with momentum: buf = momentum * buf + g, params -= lr * buf (torch.optim.SGD with
    `momentum`, no dampening); nesterov: params -= lr * (g + momentum * buf). Start `buf` at
    zero: the first step is then buf = g, as torch's first step."""
    g = _decayed(grad, params, weight_decay)
    buf.mul_(momentum).add_(g)
    params.add_(g.add(buf, alpha=momentum) if nesterov else buf, alpha=-lr)


def adagrad_(params: torch.Tensor, grad: torch.Tensor, sums: torch.Tensor, *, lr: float,
             eps: float, weight_decay: float = 0.0) -> None:
    """Adagrad: sums += g * g, params -= lr * g / (sqrt(sums) + eps) (torch.optim.Adagrad,
    no lr decay). Start `sums` at zero (torch's initial_accumulator_value)."""
    g = _decayed(grad, params, weight_decay)
    # the sum is made privately and divided by, then stored: when `sums` is shared with
    # updaters that take no lock, the stored one may have lost this very addition to another's
    # concurrent write, and dividing by it could then make a step far larger than lr (seen in
    # Hogwild: a loss of 60,000). Alone, this is torch's maths bit for bit.
    total = torch.addcmul(sums, g, g, value=1)
    sums.copy_(total)
    params.addcdiv_(g, total.sqrt_().add_(eps), value=-lr)


def _decayed(grad: torch.Tensor, params: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """grad + weight_decay * params, in a new tensor (`grad` itself when there is none)."""
    return grad.add(params, alpha=weight_decay) if weight_decay else grad


class InPlaceRule:
    """cfg's rule applied in place, by the functions above, to tensors the caller owns.

    `state`: the rule's `STATE_SLOTS[cfg.rule]` vectors back to back (zeros at the
    start), or None for a rule that keeps none. Takes no lock (see the module
    docstring); `apply` leaves its `grad` unchanged.

    Example::

        rule = InPlaceRule(OptimizerConfig(rule="momentum", lr=0.1), params, state=buf)
        rule.apply(grad)        # buf = 0.9 * buf + grad; params -= 0.1 * buf, in place
    """

    def __init__(self, cfg: OptimizerConfig, params: torch.Tensor, state: torch.Tensor | None,
                 total: int | None = None):
        if cfg.rule not in STATE_SLOTS:
            raise ValueError(f"rule {cfg.rule!r} has no in-place form")
        slots = STATE_SLOTS[cfg.rule]
        if (state is not None) != (slots > 0) or (state is not None
                                                  and state.numel() != slots * params.numel()):
            raise ValueError(f"rule {cfg.rule!r} takes {slots} state vectors of "
                             f"{params.numel()} values")
        self.cfg, self.params, self.state = cfg, params, state
        self.eps = _eps(cfg) if cfg.rule in DEFAULT_EPS else None
        schedule = Schedule(cfg, total)
        self.schedule = schedule if schedule.active else None
        self.updates = 0  # this updater's own count: the schedule's clock

    def apply(self, grad: torch.Tensor) -> None:
        """One update with `grad` (left unchanged)."""
        cfg = self.cfg
        lr = cfg.lr if self.schedule is None else self.schedule.lr(self.updates)
        if cfg.rule == "sgd":
            sgd_(self.params, grad, lr=lr, weight_decay=cfg.weight_decay)
        elif cfg.rule == "momentum":
            momentum_(self.params, grad, self.state, lr=lr, momentum=cfg.momentum,
                      weight_decay=cfg.weight_decay, nesterov=getattr(cfg, "nesterov", False))
        else:  # adagrad
            adagrad_(self.params, grad, self.state, lr=lr, eps=self.eps,
                     weight_decay=cfg.weight_decay)
        self.updates += 1


def clip_grad_norm_(grad: torch.Tensor, max_norm: float | None) -> float:
    """Scale `grad` (a flat gradient) in place so that its L2 norm is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does to a model's gradients (the same coefficient,
    max_norm / (norm + 1e-6), applied when below 1); returns the norm before clipping.
    None: nothing is clipped (and nothing computed)."""
    if max_norm is None:
        return math.nan
    norm = float(torch.linalg.vector_norm(grad))
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1:
        grad.mul_(coefficient)
    return norm


def all_finite(grad: torch.Tensor) -> bool:
    """True when every value of `grad` is finite.

    One read-only reduction instead of `isfinite(grad).all()`, which writes and
    reads a mask as large as the gradient (and was the costliest part of a push):
    a NaN or inf anywhere makes the sum NaN or inf. A sum that overflowed from
    finite values alone is told apart element by element.
    """
    return math.isfinite(float(grad.sum())) or bool(torch.isfinite(grad).all())
