"""Hogwild! (Recht et al., 2011), the worker side: lock-free SGD on one shared tensor.

The coordinator (`algorithms/hogwild.py`) keeps the parameters in one flat
float32 tensor in a job file under /dev/shm, followed by the update rule's
state when it has one (`STATE_SLOTS`: momentum's buffer, Adagrad's sum of
squared gradients). Each of the W worker processes maps that file, builds its
model with the parameters as views into it (`FlatModel(params=...)`), and at
every step computes the gradient of its own batch into a private buffer, then
applies the update in place on the shared tensor, with no lock. Another
worker's reads and writes interleave freely with ours: a forward pass may see
parameters that another worker is half-way through updating, and two updates
of one element may race. That is Hogwild's bet, sound when each update is
small; for W = 1 the run is exactly single-process SGD on the same batches.

Worker w trains on its own part of the data (`replica_indices(n, w, W, seed)`,
a `BatchStream` seeded ``seed * 1000 + w``, as Downpour's replica w). It reports
through the store stream ``events`` with Downpour's reporter ("train" events
every `log_every` steps) and ends with ``done/replica<w>``.

Example (in worker w's process, started by the local launcher)::

    run_worker(ctx)      # ctx: RoleContext with role "replica" and ident w
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distbelief.algorithms.downpour.replica import _Reporter
from distbelief.config import OptimizerConfig
from distbelief.data.datasets import BatchStream, replica_indices
from distbelief.model.flat import FlatModel
from distbelief.model.zoo import load_data_and_model
from distbelief.runtime.channel import SharedTensor
from distbelief.runtime.context import RoleContext

STATE_SLOTS = {"sgd": 0, "momentum": 1, "adagrad": 1}  # state vectors after the parameters


class LockFreeRule:
    """An elementwise update rule applied in place to shared `params` and `state`.

    The same maths as `torch.optim` (SGD, SGD with momentum, Adagrad; with
    weight decay), written as in-place tensor operations so that parameters and
    state stay in the shared tensor. Takes no lock: concurrent calls from other
    processes on the same tensors race element by element, as Hogwild allows.

    Example::

        rule = LockFreeRule(OptimizerConfig(rule="sgd", lr=0.1), params, state=None)
        rule.apply(grad)        # params -= 0.1 * grad, in place
    """

    def __init__(self, cfg: OptimizerConfig, params: torch.Tensor, state: torch.Tensor | None):
        if cfg.rule not in STATE_SLOTS:
            raise ValueError(f"rule {cfg.rule!r} has no lock-free form")
        if (state is not None) != (STATE_SLOTS[cfg.rule] > 0):
            raise ValueError(f"rule {cfg.rule!r} takes {STATE_SLOTS[cfg.rule]} state vectors")
        self.cfg, self.params, self.state = cfg, params, state
        self.eps = 1e-10 if cfg.eps is None else cfg.eps

    def apply(self, grad: torch.Tensor) -> None:
        """One update with `grad` (a private buffer; left unchanged)."""
        cfg, params = self.cfg, self.params
        if cfg.weight_decay:
            grad = grad.add(params, alpha=cfg.weight_decay)
        if cfg.rule == "sgd":
            params.add_(grad, alpha=-cfg.lr)
        elif cfg.rule == "momentum":  # a zero buffer makes the first step buf = grad, as torch
            self.state.mul_(cfg.momentum).add_(grad)
            params.add_(self.state, alpha=-cfg.lr)
        else:  # adagrad
            # the sum is made privately and divided by, then stored: the shared one may have
            # lost this very addition to another worker's concurrent write, and dividing by
            # it could then make a step far larger than lr (seen: a loss of 60,000)
            total = torch.addcmul(self.state, grad, grad, value=1)
            self.state.copy_(total)
            params.addcdiv_(grad, total.sqrt_().add_(self.eps), value=-cfg.lr)


def shared_views(tensor: torch.Tensor, numel: int, slots: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(parameters, state or None) as views into the shared tensor of numel * (1 + slots)."""
    if tensor.numel() != numel * (1 + slots):
        raise ValueError(f"the shared tensor holds {tensor.numel()} values, expected "
                         f"{numel} x {1 + slots}")
    return tensor[:numel], (tensor[numel:] if slots else None)


def run_worker(ctx: RoleContext) -> None:
    cfg, w, workers = ctx.config, ctx.ident, ctx.config.hogwild.workers
    torch.set_num_threads(cfg.cluster.threads_per_process(workers))
    data, model = load_data_and_model(cfg)
    stream = BatchStream(data.x_train, data.y_train,
                         replica_indices(len(data.x_train), w, workers, cfg.train.seed),
                         cfg.data.batch_size, seed=cfg.train.seed * 1000 + w)
    ctx.store.get_json("job/ready", what="the coordinator to create the shared parameters")
    info = ctx.job["hogwild"]
    shared = SharedTensor(Path(info["file"]), info["numel"] * (1 + info["slots"]),
                          torch.float32, create=False)
    params, state = shared_views(shared.tensor, info["numel"], info["slots"])
    flat = FlatModel(model, grads=1, params=params)  # the model computes on the shared values
    rule = LockFreeRule(cfg.optimizer, params, state)
    ctx.store.set_json(f"hogwild/ready/{w}", True)
    # every worker starts together, so that the workers' throughput adds up from the first step
    ctx.store.get_json("hogwild/go", timeout=cfg.cluster.timeout,
                       what="the coordinator to start the workers")
    ctx.store.append("events", {"event": "replica_joined", "time": time.time() -
                                ctx.job["start_time"], "replica": w})
    start, cpu = time.time(), time.process_time()
    applied = _train(ctx, flat, rule, stream, ctx.job["steps"])
    ctx.store.set_json(f"done/replica{w}", {
        "steps": ctx.job["steps"], "updates": applied, "start": start, "end": time.time(),
        "cpu_seconds": time.process_time() - cpu, "samples": ctx.job["steps"] * stream.batch_size})


def _train(ctx: RoleContext, flat: FlatModel, rule: LockFreeRule, stream: BatchStream,
           total: int) -> int:
    """Every step: gradient of the next batch, then the lock-free update. Returns the updates
    applied (steps whose loss and gradient were finite)."""
    report = _Reporter(ctx, total)
    grad, applied = flat.grads[0], 0
    for step in range(total):
        xb, yb = stream.next()
        grad.zero_()
        loss = F.cross_entropy(flat.model(xb), yb)
        loss.backward()
        value = loss.item()
        finite = math.isfinite(value) and bool(torch.isfinite(grad).all())
        report.step(value if finite else math.nan, len(yb))  # raises with --on-nonfinite stop
        if finite:
            rule.apply(grad)
            applied += 1
        report.maybe_log(step, [])
    report.maybe_log(total - 1, [], force=True)
    return applied
