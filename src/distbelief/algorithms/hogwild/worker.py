"""Hogwild! (Recht et al., 2011), the worker side: lock-free SGD on one shared tensor.

The coordinator (`algorithms/hogwild.py`) keeps the parameters in one flat
float32 tensor in a job file under /dev/shm, followed by the update rule's
state when it has one (`ps.rules.STATE_SLOTS`: momentum's buffer, Adagrad's sum
of squared gradients). Each of the W worker processes maps that file, builds its
model with the parameters as views into it (`FlatModel(params=...)`), and at
every step computes the gradient of its own batch (the job's task's loss,
`distbelief.task`) into a private buffer, then
applies the update in place on the shared tensor, with no lock
(`ps.rules.InPlaceRule`). Another worker's reads and writes interleave freely
with ours: a forward pass may see parameters that another worker is half-way
through updating, and two updates of one element may race. That is Hogwild's
bet, sound when each update is small; for W = 1 the run is exactly
single-process SGD on the same batches.

Worker w trains on its own part of the data (`replica_indices(n, w, W, seed)`,
a `BatchStream` seeded ``seed * 1000 + w``, as Downpour's replica w). It reports
through the store stream ``events`` as Downpour's replicas do ("train" events
every `log_every` steps, `metrics.report.Reporter`) and ends with
``done/replica<w>``.

Example (in worker w's process, started by the local launcher)::

    run_worker(ctx)      # ctx: RoleContext with role "replica" and ident w
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from distbelief.model.precision import autocast
from distbelief.data.datasets import BatchStream, replica_indices
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.data.feed import load_data_and_model
from distbelief.ps.rules import STATE_SLOTS, InPlaceRule, all_finite, clip_grad_norm_
from distbelief.runtime.shm import SharedTensor
from distbelief.runtime.context import RoleContext
from distbelief.task import Task, task_of

__all__ = ["run_worker", "shared_views"]


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
    data, model = load_data_and_model(cfg, ctx.job)
    stream = BatchStream(data.train, None,  # reads only this worker's rows
                         replica_indices(len(data.train), w, workers, cfg.train.seed),
                         cfg.data.batch_size, seed=cfg.train.seed * 1000 + w)
    ctx.store.get_json("job/ready", what="the coordinator to create the shared parameters")
    info = ctx.job["shared"]
    shared = SharedTensor(Path(info["file"]), info["numel"] * (1 + info["slots"]),
                          torch.float32, create=False)
    params, state = shared_views(shared.tensor, info["numel"], info["slots"])
    flat = FlatModel(model, grads=1, params=params)  # the model computes on the shared values
    # no lock: Hogwild's bet; the schedule counts this worker's own steps
    rule = InPlaceRule(cfg.optimizer, params, state, total=ctx.job["steps"])
    ctx.store.set_json(f"hogwild/ready/{w}", True)
    # every worker starts together, so that the workers' throughput adds up from the first step
    ctx.store.get_json("hogwild/go", timeout=cfg.cluster.timeout,
                       what="the coordinator to start the workers")
    ctx.store.append("events", {"event": "replica_joined", "time": time.time() -
                                ctx.job["start_time"], "replica": w})
    start, cpu = time.time(), time.process_time()
    applied = _train(ctx, flat, rule, stream, ctx.job["steps"], task_of(cfg))
    ctx.store.set_json(f"done/replica{w}", {
        "steps": ctx.job["steps"], "updates": applied, "start": start, "end": time.time(),
        "cpu_seconds": time.process_time() - cpu, "samples": ctx.job["steps"] * stream.batch_size})


def _train(ctx: RoleContext, flat: FlatModel, rule: InPlaceRule, stream: BatchStream,
           total: int, task: Task) -> int:
    """Every step: gradient of `task`'s loss on the next batch, then the lock-free update.
    Returns the updates applied (steps whose loss and gradient were finite)."""
    report = Reporter.for_role(ctx, total, module=flat.model)
    grad, applied = flat.grads[0], 0
    for step in range(total):
        ctx.progress()  # the watchdog (--progress-timeout)
        xb, yb = stream.next()
        grad.zero_()
        with autocast(ctx.config.train.precision):  # the shared parameters stay float32
            loss = task.loss(flat.model(xb), yb)
        loss.backward()
        value = loss.item()
        finite = math.isfinite(value) and all_finite(grad)
        report.step(value if finite else math.nan, len(yb))  # raises with --on-nonfinite stop
        if finite:
            clip_grad_norm_(grad, ctx.config.optimizer.clip_grad_norm)
            rule.apply(grad)
            applied += 1
        report.maybe_log(step, [])
    report.maybe_log(total - 1, [], force=True)
    return applied
