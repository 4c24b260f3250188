"""Elastic averaging SGD, a replica's loop (see the package doc for the maths).

Step t (0-based), in the paper's order: when t is a multiple of tau, the
elastic exchange (pull the centre, e = alpha (x - centre), x <- x - e, add e
into the shards' centre); then one local step of the rule on the batch of
step t. The replica's parameters are its model's (`FlatModel`); e is written
into its PSClient buffer, which the shards read in place over shm.

Checkpoints: the replica pauses at a period's start, before its exchange, and
writes ``easgd-replica<r>.pt`` (x, the rule's state, its step). A replacement
for a lost replica starts from the centre, at the lost one's last reported step.
"""

from __future__ import annotations

import time

import torch

from distbelief.algorithms.local_step import local_step
from distbelief.algorithms.slowdown import Slowdown
from distbelief.checkpoint import ReplicaGate, load_file, set_dir, write_atomic
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.rules import make_rule
from distbelief.ps.vectors import PARAMS
from distbelief.runtime.context import RoleContext
from distbelief.task import task_of


def state_file(replica: int) -> str:
    return f"easgd-replica{replica}.pt"


def run_replica(ctx: RoleContext) -> None:
    cfg, r = ctx.config, ctx.ident
    torch.set_num_threads(cfg.cluster.threads_per_process(cfg.cluster.replicas))
    data, model = replica_data_and_model(ctx)
    total = ctx.job["steps"]
    restart = ctx.store.try_get_json(f"restart/replica{r}")
    resume = ctx.job.get("resume") if restart is None else None
    saved = load_file(ctx.job["run_dir"], resume, state_file(r)) if resume else None
    start = saved["step"] if saved else (restart["start"] if restart else 0)
    ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
    layout = Layout.from_json(ctx.job["layout"])
    generation = restart["generation"] if restart else 0
    with PSClient(ctx.store, layout, f"replica{r}.g{generation}",
                  transport=cfg.cluster.transport, timeout=cfg.cluster.timeout,
                  grad_buffers=1) as ps, open_feed(ctx, data, start, total) as feed:
        replica = _Replica(ctx, model, ps, feed)
        if saved is not None:
            replica.x.copy_(saved["x"])
            replica.rule.load_state_dict(saved["rule"])
        else:  # every replica starts from the centre (a replacement too)
            ps.pull(replica.x).wait(cfg.cluster.timeout)
            replica.rule.updates = start  # a replacement goes on with the schedule
        ctx.store.append("events", {"event": "replica_joined",
                                    "time": time.time() - ctx.job["start_time"],
                                    "replica": r})
        replica.run(start, total)
    ctx.store.set_json(f"done/replica{r}", {"steps": total - start,
                                            "exchanges": replica.exchanges,
                                            "transport_bytes": ps.transport_bytes(),
                                            **feed.stats()})


class _Replica:
    """One replica's steps and exchanges. Its process's main thread only."""

    def __init__(self, ctx: RoleContext, model, ps: PSClient, feed):
        cfg = ctx.config
        self.ctx, self.ps, self.feed, self.model = ctx, ps, feed, model
        self.alpha, self.period = cfg.easgd.alpha, cfg.easgd.period
        self.timeout = cfg.cluster.timeout
        self.flat = FlatModel(model, grads=1)
        self.x, self.grad = self.flat.params, self.flat.grads[0]
        self.centre = torch.empty_like(self.x)
        self.rule = make_rule(cfg.optimizer, self.x, total=ctx.job["steps"])  # one per step
        self.slow = Slowdown.for_worker(cfg, ctx.ident)
        self.task = task_of(cfg)
        self.gate = (ReplicaGate(ctx.store, ctx.member, self.timeout)
                     if cfg.train.checkpoint_every is not None else None)
        self.report = Reporter.for_role(ctx, ctx.job["steps"], module=model)
        self.exchanges = 0

    def run(self, start: int, total: int) -> None:
        for step in range(start, total):
            self.ctx.progress()  # the watchdog (--progress-timeout)
            if step % self.period == 0:
                if self.gate is not None and (number := self.gate.due()) is not None:
                    self._checkpoint(number, step)  # the exchange of `step` comes after
                self._exchange()
            self._local_step(step)
        self.report.maybe_log(total - 1, force=True)

    def _exchange(self) -> None:
        """x <- x - e and centre <- centre + e, with e = alpha (x - centre)."""
        self.ps.pull(self.centre).wait(self.timeout)
        e = self.ps.grad_buffers[0]
        torch.sub(self.x, self.centre, out=e).mul_(self.alpha)
        self.x.sub_(e)
        self.ps.accumulate(0, PARAMS).wait(self.timeout)  # the shards add e to the centre
        self.exchanges += 1

    def _local_step(self, step: int) -> None:
        local_step(self.model, self.grad, self.rule, self.feed, self.slow, self.report, step,
                   task=self.task, clip=self.ctx.config.optimizer.clip_grad_norm,
                   precision=self.ctx.config.train.precision)

    def _checkpoint(self, number: int, step: int) -> None:
        folder = set_dir(self.ctx.job["run_dir"], number)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / state_file(self.ctx.ident),
                     {"x": self.x.clone(), "rule": self.rule.state_dict(), "step": step})
        self.report.publish_buffers()  # the checkpoint keeps them as they are now
        self.gate.pause(number, step)
