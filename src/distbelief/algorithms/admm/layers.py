"""Dual layers: ADMM across a layer split, every partition training without waiting.

An ``nn.Sequential`` cut into K contiguous parts (``PartitionPlan(split="layers")``)
is trained as K problems coupled only at their boundaries. Boundary k (between
part k and part k + 1) has two per-sample variables that must agree, and a
scaled dual:

* ``q_k = f_k(p_k; W_k)``, the output of part k (``p_0 = x``, the data, fixed);
* ``p_{k+1}``, the input variable of part k + 1, a free tensor, one row per sample;
* ``u_k``, the scaled dual, one row per sample.

The augmented Lagrangian (scaled form, penalty rho; every term is a *mean over
samples* of a per-sample value, so rho weighs one sample's squared boundary
mismatch against one sample's loss whatever N is)::

    L = mean_i loss(f_{K-1}(p_{K-1,i}), y_i)
        + sum_{k<K-1} rho/2 * mean_i ||f_k(p_{k,i}; W_k) - p_{k+1,i} + u_{k,i}||^2

(``loss``: the job's task's per-sample loss, `distbelief.task`, cross-entropy for
``classify``; ``||.||^2`` sums over a sample's features.) A round, all parts at once:

1. Part k takes ``local_steps`` steps on mini-batches of rows (the same rows for
   every part: `round_batches`, a pure function of (seed, round)) against its own
   terms of L: ``rho/2 ||q_{k-1} - p_k + u_{k-1}||^2`` (k > 0; ``q_{k-1}`` as
   received at the last exchange) plus ``rho/2 ||f_k(p_k) - p_{k+1} + u_k||^2``
   (k < K-1; ``p_{k+1}`` as received) or the task's loss (k = K-1). Its weights
   W_k take an Adam step on the batch mean (learning rate `round_lr`: a cosine to 0).
   Its input rows p_k (k > 0) take a proximal step each on the row's *own* terms
   (`DualLayersPart._step_rows`): the left quadratic solved exactly, the right term
   linearised, a step size per row halved whenever the linear model overshoots. Only
   the batch's rows move, and a row's step does not depend on the batch size; the
   only state per row beyond p is that step size (no Adam moments that rows left out
   of a batch would need to decay).
2. Each boundary then exchanges, once and for the rows touched in the round
   (`touched_rows`), ``q_k`` (part k -> k+1, recomputed with the new W_k) and
   ``p_{k+1}`` (part k+1 -> k); both sides update their copy of the dual the
   same way, ``u_k <- u_k + q_k - p_{k+1}``, so the two copies stay bit-equal.

A part's round reads only values fixed at the last exchange, so running the
parts one after another in one process (`train_dual_layers`) gives exactly
what K processes running at once give. The distributed form is a thin loop
around one `DualLayersPart` per process (``left``/``right``: the boundary links,
`distbelief.model.pipeline.Link`; each round sends (rows, *boundary shape) float32
tensors, rows = `touched_rows` <= local_steps * batch_size, and no indices: both
sides compute the rows)::

    part = DualLayersPart(part_module, k, K, inputs, targets=y, config=cfg, task=task)
    # inputs: x on part 0, left.recv() elsewhere; then, on k < K-1:
    right.send(part.initial_output)                          # once, all N rows
    for _ in range(rounds):
        batches = part.batches()                             # round_batches(N, part.round, ...)
        part.local_steps(batches)
        rows = touched_rows(batches)
        out = part.outgoing(rows)                            # {"left": ..., "right": ...}
        if "left" in out: left.send(out["left"])
        if "right" in out: right.send(out["right"])
        part.incoming(rows, from_left=left.recv() if k > 0 else None,
                      from_right=right.recv() if k < K - 1 else None)

Initialisation is one forward pass of the initial network over all rows: part k
gets ``p_k = q_{k-1} =`` the output of part k - 1 (`initial_output`), and every
dual starts at zero, so the residuals start at zero and grow only as the parts
move apart. The parts share (or, distributed, hold) the model's parameters;
`compose_weights` copies parts' weights back, and the plain network
``f_{K-1}(... f_0(x))`` is then evaluated as usual
(`distbelief.model.evaluate.evaluate`).

Where to cut: the boundaries agree in the end only if each part right of a
boundary is smooth in its input. A cut at the last ReLU's output of an MLP
leaves the right part a Linear, so each row's problem (cross-entropy, or squared
error, of an affine map plus a quadratic) is smooth and convex and the row and its
dual contract (an L1 loss is convex but not smooth at zero error). A
ReLU inside a right part gives rows whose step keeps overshooting at its kinks:
on digits with the zoo MLP (300 rounds) the residual falls ~1000x with the cut
after the last ReLU, 3-4x with balance (2, 4), (3, 3) or (4, 2).

Nothing here is thread-safe: one thread owns a part.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from distbelief.algorithms.admm.rows import round_batches, round_lr, step_order, touched_rows
from distbelief.model.partition import PartitionPlan
from distbelief.task import Task, make_task

__all__ = ["DualLayersConfig", "DualLayersPart", "DualLayersHistory", "round_batches",
           "touched_rows", "step_order", "round_lr", "build_parts", "exchange", "run_round",
           "train_dual_layers", "compose_weights"]


@dataclass(frozen=True, kw_only=True)
class DualLayersConfig:
    rho: float = 1.0
    """Penalty on a sample's squared boundary mismatch (per sample, summed over features)."""
    lr: float = 1e-3
    """Adam learning rate of the weights W_k."""
    lr_p: float = 1.0
    """Largest proximal step of an input row p_k (`DualLayersPart._step_rows` halves a row's
    step where its right term curves more)."""
    local_steps: int = 10
    """Mini-batch steps each part takes per round, between two exchanges."""
    batch_size: int = 64
    """Rows in one mini-batch (the same rows for every part)."""
    seed: int = 0
    """Fixes the rows of every round (`round_batches`)."""
    weight_decay: float = 0.0
    """L2 weight decay on W_k (Adam's, added to the gradient)."""
    decay_rounds: int = 0
    """W_k's learning rate follows a cosine from lr to 0 over this many rounds (`round_lr`);
    0 keeps it constant. The boundaries agree only once the weights settle: with a
    constant rate Adam keeps moving q_k and the residual stays near its peak."""

    def __post_init__(self) -> None:
        bad = {name: getattr(self, name) for name in ("rho", "lr", "lr_p", "local_steps",
                                                      "batch_size") if getattr(self, name) <= 0}
        bad.update({name: getattr(self, name) for name in ("weight_decay", "decay_rounds")
                    if getattr(self, name) < 0})
        if bad:
            raise ValueError(f"dual layers: bad {bad}: rho, lr, lr_p, local_steps and "
                             "batch_size must be > 0, weight_decay and decay_rounds >= 0")


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Each row's squared norm (over all its features)."""
    return t.pow(2).flatten(1).sum(1)


class DualLayersPart:
    """Part `part` of `parts`: its module, the Adam state of its weights, its input rows
    p_k (k > 0), and its copies of both boundaries' values and duals.

    `inputs` is x (part 0, never changed) or the initial output of part k - 1 over
    all N rows (the initial p_k and q_{k-1}); `targets` the targets (last part only),
    `task` whose loss the last part minimises (None: classify's cross-entropy).
    The module's parameters are trained in place. Nothing blocks; not thread-safe.

    Per round: `batches`, `local_steps` on them (or `local_step` per batch), then
    `outgoing(rows)` for their `touched_rows`, then, with the neighbours' outgoing
    tensors, `incoming(rows, ...)`: the loop in the module docstring, or `run_round`
    for all parts in one process.
    """

    def __init__(self, module: nn.Module, part: int, parts: int, inputs: torch.Tensor, *,
                 targets: torch.Tensor | None = None, config: DualLayersConfig,
                 regularizer: Callable[[], None] | None = None, task: Task | None = None):
        if not 0 <= part < parts:
            raise ValueError(f"part {part} is not in 0..{parts - 1}")
        self.is_first, self.is_last = part == 0, part == parts - 1
        if self.is_last and targets is None:
            raise ValueError(f"part {part} is the last of {parts}: give it the targets")
        if targets is not None and len(targets) != len(inputs):
            raise ValueError(f"part {part}: {len(targets)} targets for {len(inputs)} input rows")
        self.module, self.part, self.parts, self.config = module, part, parts, config
        # adds to the weights' .grad before each step (consensus ADMM's pull towards z)
        self.regularizer = regularizer
        self.rows = len(inputs)
        self.targets, self.task = targets, task or make_task()
        self.optimizer = torch.optim.Adam(module.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        inputs = inputs.detach()
        if self.is_first:
            self.x, self.p = inputs, None
        else:  # p_k, q_{k-1} (last received) and u_{k-1}
            self.x, self.p = None, inputs.clone()
            self.eta = torch.full((self.rows,), config.lr_p)  # each row's step (`_step_rows`)
            self.q_left, self.u_left = inputs.clone(), torch.zeros_like(inputs)
        self.initial_output: torch.Tensor | None = None
        if not self.is_last:  # q_k (last sent), p_{k+1} (last received) and u_k
            with torch.no_grad():
                out = module(inputs)
            self.initial_output = out.clone()
            self.q_right, self.p_right = out.clone(), out.clone()
            self.u_right = torch.zeros_like(out)
        self._sent_rows: torch.Tensor | None = None
        self.round = 0  # exchanges done: the round the local steps belong to

    def batches(self) -> list[torch.Tensor]:
        """This round's batches of rows (`round_batches` at `self.round`, the number of
        exchanges done): the same in every part."""
        cfg = self.config
        return round_batches(self.rows, self.round, local_steps=cfg.local_steps,
                             batch_size=cfg.batch_size, seed=cfg.seed)

    def _right_terms(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each row's right-hand term of L: its loss (last part) or its
        ``rho/2 ||f_k(p_k) - p_{k+1} + u_k||^2``."""
        if self.is_last:
            return self.task.loss(out, self.targets[rows], reduction="none")
        return self.config.rho / 2 * _sq_rows(out - self.p_right[rows] + self.u_right[rows])

    def local_step(self, rows: torch.Tensor) -> float | None:
        """One step on these rows (distinct indices) of W_k and p_k; the batch's mean
        loss on the last part, None elsewhere."""
        for group in self.optimizer.param_groups:
            group["lr"] = round_lr(self.config.lr, self.round, self.config.decay_rounds)
        p = None if self.is_first else self.p[rows].requires_grad_()
        out = self.module(self.x[rows] if p is None else p)
        if self.is_last:  # the mean as plain training computes it (K = 1: bit for bit)
            objective = self.task.loss(out, self.targets[rows])
        else:
            objective = self._right_terms(out, rows).mean()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()  # the left term does not involve W_k: it is p's alone
        if p is not None:
            with torch.no_grad():
                terms = self._right_terms(out.detach(), rows)
                self._step_rows(rows, p.detach(), terms, p.grad * len(rows))
        if self.regularizer is not None:
            self.regularizer()
        self.optimizer.step()
        return objective.item() if self.is_last else None

    def _step_rows(self, rows: torch.Tensor, p: torch.Tensor, terms: torch.Tensor,
                   grad: torch.Tensor) -> None:
        """A proximal step of each row p_i on its own terms, the right term linearised (its
        gradient `grad`), the left quadratic exact::

            p_i' = argmin_z  grad_i . z + rho/2 ||q_{k-1,i} - z + u_{k-1,i}||^2
                             + ||z - p_i||^2 / (2 eta_i)

        kept only where the right term's linear model plus the proximal term bounds its
        value at p_i' (with the weights before this step's update), so that eta_i stays
        below one over the row's curvature: then the row and its dual contract whatever
        the curvature (a fixed step oscillates on rows whose curvature outgrows rho).
        A row that fails keeps p_i and halves eta_i; one that passes grows it by 1.25,
        up to lr_p.
        """
        rho, eta = self.config.rho, self.eta[rows].view(-1, *([1] * (p.dim() - 1)))
        target = self.q_left[rows] + self.u_left[rows]
        trial = (p + eta * rho * target - eta * grad) / (1 + eta * rho)
        step = trial - p
        bound = terms + (grad * step).flatten(1).sum(1) + _sq_rows(step) / (2 * eta.flatten())
        value = self._right_terms(self.module(trial), rows)
        ok = value <= bound + 1e-6 * (1 + terms.abs())  # slack: float32 rounding near the end
        self.p[rows] = torch.where(ok.view_as(eta), trial, p)
        self.eta[rows] = torch.where(ok, (self.eta[rows] * 1.25).clamp(max=self.config.lr_p),
                                     self.eta[rows] * 0.5)

    def local_steps(self, batches: Sequence[torch.Tensor]) -> float | None:
        """`local_step` on each batch; the mean loss (last part), None elsewhere."""
        losses = [self.local_step(rows) for rows in batches]
        return sum(losses) / len(losses) if self.is_last else None

    def outgoing(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """What to send at the end of a round: ``"left"``: p_k[rows] (k > 0), ``"right"``:
        q_k[rows] = f_k(p_k[rows]) with the current weights (k < K-1), recorded as sent.

        Shapes (len(rows), *boundary shape); float32 tensors the caller may keep.
        """
        out: dict[str, torch.Tensor] = {}
        if not self.is_first:
            out["left"] = self.p[rows].clone()
        if not self.is_last:
            with torch.no_grad():
                q = self.module(self.x[rows] if self.is_first else self.p[rows])
            self.q_right[rows] = q
            out["right"] = q.clone()
        self._sent_rows = rows
        return out

    def incoming(self, rows: torch.Tensor, *, from_left: torch.Tensor | None = None,
                 from_right: torch.Tensor | None = None) -> None:
        """Store the neighbours' values for `rows` (the rows of this round's `outgoing`)
        and update both duals: ``u_k[rows] += q_k[rows] - p_{k+1}[rows]``."""
        if self._sent_rows is None or not torch.equal(self._sent_rows, rows):
            raise RuntimeError(f"part {self.part}: incoming() for rows that outgoing() did not "
                               "just send: call outgoing(rows) first, once per round")
        if (from_left is None) != self.is_first or (from_right is None) != self.is_last:
            raise ValueError(f"part {self.part} of {self.parts}: give from_left exactly when "
                             "part > 0 and from_right exactly when part < K-1")
        if from_left is not None:
            self.q_left[rows] = from_left
            self.u_left[rows] = self.u_left[rows] + (from_left - self.p[rows])
        if from_right is not None:
            self.p_right[rows] = from_right
            self.u_right[rows] = self.u_right[rows] + (self.q_right[rows] - from_right)
        self._sent_rows = None
        self.round += 1

    def boundary_residual(self) -> float | None:
        """RMS over all N samples of the right boundary's mismatch, ``sqrt(mean_i
        ||q_{k,i} - p_{k+1,i}||^2)``, from the last exchanged values (both sides hold
        them); None on the last part."""
        if self.is_last:
            return None
        return _sq_rows(self.q_right - self.p_right).mean().sqrt().item()


def build_parts(model: nn.Sequential, plan: PartitionPlan, x: torch.Tensor, y: torch.Tensor,
                config: DualLayersConfig, task: Task | None = None) -> list[DualLayersPart]:
    """The K parts of `model` in this process, sharing its parameters, initialised by
    one forward pass over all rows of x; the last minimises `task`'s loss (None:
    classify's)."""
    if plan.split != "layers":
        raise ValueError(f"dual layers needs a layer split, got split={plan.split!r}: use "
                         "PartitionPlan(split='layers', ...)")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} input rows but {len(y)} targets: give one target per row")
    parts, inputs = [], x
    for k in range(plan.partitions):
        part = DualLayersPart(plan.part_module(model, k), k, plan.partitions, inputs,
                              targets=y if k == plan.partitions - 1 else None, config=config,
                              task=task)
        parts.append(part)
        inputs = part.initial_output
    return parts


def exchange(parts: Sequence[DualLayersPart], rows: torch.Tensor) -> None:
    """Every boundary's exchange for `rows`, as over the wire: all parts' `outgoing`
    first, then all parts' `incoming`."""
    sent = [part.outgoing(rows) for part in parts]
    for k, part in enumerate(parts):
        part.incoming(rows, from_left=sent[k - 1]["right"] if k > 0 else None,
                      from_right=sent[k + 1]["left"] if k < len(parts) - 1 else None)


def run_round(parts: Sequence[DualLayersPart], *, interleave: bool = False) -> float:
    """One round of all parts (local steps in `step_order`, then the exchange); the last
    part's mean loss over its local steps."""
    if len({part.round for part in parts}) != 1:
        raise RuntimeError(f"parts are at different rounds {[part.round for part in parts]}")
    batches = parts[0].batches()
    losses = []
    for k, s in step_order(len(parts), len(batches), interleave=interleave):
        loss = parts[k].local_step(batches[s])
        if loss is not None:
            losses.append(loss)
    exchange(parts, touched_rows(batches))
    return sum(losses) / len(losses)


@dataclass
class DualLayersHistory:
    """Per round: ``residual[r][k]``, boundary k's RMS mismatch per sample after round r's
    exchange (`DualLayersPart.boundary_residual`; empty when K = 1); ``loss[r]``, the last
    part's mean loss over its local steps (on its p rows, not the composed
    network's); ``seconds``, the whole run."""
    residual: list[list[float]] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_dual_layers(model: nn.Sequential, plan: PartitionPlan, x: torch.Tensor,
                      y: torch.Tensor, *, rounds: int, local_steps: int, batch_size: int,
                      rho: float, lr: float, lr_p: float, seed: int = 0,
                      weight_decay: float = 0.0, decay: bool = True, interleave: bool = False,
                      task: Task | None = None) -> DualLayersHistory:
    """Train `model` (in place) by dual layers for `rounds` rounds, all parts in this
    process; exactly what one process per part would compute. Blocks until done.

    The arguments are `DualLayersConfig`'s; `decay` runs W's learning rate down a cosine
    to 0 over the `rounds` (``decay_rounds = rounds``), `interleave` only reorders the
    local steps (`step_order`) and changes nothing in the result; `task`: whose loss
    (None: classify's cross-entropy).

    Example::

        task = make_task("classify")
        plan = PartitionPlan(split="layers", partitions=2, balance=(5, 1))
        hist = train_dual_layers(model, plan, x, y, rounds=200, local_steps=10,
                                 batch_size=64, rho=1.0, lr=1e-3, lr_p=1.0, task=task)
        metrics = evaluate(model, x_test, y_test, task)   # {"loss": ..., "accuracy": ...}
        metrics[task.headline]                             # accuracy; rmse for regress
    """
    config = DualLayersConfig(rho=rho, lr=lr, lr_p=lr_p, local_steps=local_steps,
                              batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                              decay_rounds=rounds if decay else 0)
    start = time.perf_counter()
    parts = build_parts(model, plan, x, y, config, task)
    history = DualLayersHistory()
    for _ in range(rounds):
        history.loss.append(run_round(parts, interleave=interleave))
        history.residual.append([part.boundary_residual() for part in parts[:-1]])
    history.seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in history.loss):
        raise FloatingPointError(f"dual layers diverged (non-finite loss with lr={lr:g}, "
                                 f"lr_p={lr_p:g}, rho={rho:g}): lower lr or lr_p")
    return history


def compose_weights(model: nn.Sequential, plan: PartitionPlan,
                    parts: Sequence[nn.Module | Mapping[str, torch.Tensor]]) -> nn.Sequential:
    """Copy each part's weights (its module or its ``state_dict``, in part order) into
    `model`, which is then the plain network ``f_{K-1}(... f_0(x))``; returns `model`.
    Needed only when the parts hold copies (one process per part)."""
    if len(parts) != plan.partitions:
        raise ValueError(f"{len(parts)} parts for a plan of {plan.partitions}: give one per part")
    for k, part in enumerate(parts):
        state = part.state_dict() if isinstance(part, nn.Module) else part
        plan.part_module(model, k).load_state_dict(state)
    return model
