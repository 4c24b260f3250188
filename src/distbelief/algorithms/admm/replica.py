"""Consensus ADMM, an unpartitioned replica's loop (see the package doc for the maths).

A replica trains its parameters x (the model's, `FlatModel`) with its local
optimizer (`ps.rules.make_rule`, the rule the other algorithms apply in the
shards) and speaks the round protocol through a `ConsensusMember`. A phase is
``--local-steps`` steps on its own batches with the gradient of
f_i(x) + rho/2 ||x - z + u||^2; then it contributes x + u and waits for the
closer's answer; answered, the member pulls the new z and updates u, and the
next phase starts from the replica's own x (warm start). The others do not
wait for a late replica (``--sync-fraction`` < 1): its last contribution stays
in the mean, and its new one is taken by a later round.

Checkpoints: a replica pauses while it waits for an answer (every replica gets
there without any round closing: the coordinator's closer waits while a
checkpoint is taken). It writes ``admm-replica<r>.pt`` (x, the member's u, z
and rho, the rule's state, its step and contribution counts). Resumed, a
waiting replica contributes again (its vector is in the shards' files). A
replacement for a lost replica (``--restart-replicas``) starts from the
current z with u = 0.
"""

from __future__ import annotations

import time

import torch

from distbelief.algorithms.admm.consensus import ConsensusMember
from distbelief.algorithms.admm.protocol import FINAL, member_vector
from distbelief.algorithms.local_step import local_step
from distbelief.algorithms.slowdown import Slowdown
from distbelief.checkpoint import ReplicaGate, load_file, set_dir, write_atomic
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.rules import make_rule
from distbelief.ps.vectors import ZERO
from distbelief.runtime.context import RoleContext
from distbelief.task import task_of


def state_file(member: str) -> str:
    return f"admm-replica{member}.pt"


def run_replica(ctx: RoleContext) -> None:
    if ctx.part is not None:
        from distbelief.algorithms.admm.partition import run_partition

        run_partition(ctx)
        return
    cfg, r = ctx.config, ctx.ident
    torch.set_num_threads(cfg.cluster.threads_per_process(cfg.cluster.replicas))
    data, model = replica_data_and_model(ctx)
    restart = ctx.store.try_get_json(f"restart/replica{r}")
    generation = restart["generation"] if restart else 0
    resume = ctx.job.get("resume") if restart is None else None
    saved = load_file(ctx.job["run_dir"], resume, state_file(ctx.member)) if resume else None
    start = saved["step"] if saved else (restart["start"] if restart else 0)
    ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
    layout = Layout.from_json(ctx.job["layout"])
    with PSClient(ctx.store, layout, f"replica{r}.g{generation}",
                  transport=cfg.cluster.transport, timeout=cfg.cluster.timeout,
                  grad_buffers=1) as ps, \
            open_feed(ctx, data, start, ctx.job["steps"]) as feed:
        replica = _Replica(ctx, model, ps, feed, generation, start)
        if saved is not None:
            replica.restore(saved)
        else:  # a new job, or a replacement: from z, with u = 0 and a clean member vector
            ps.vector(ZERO, member_vector(r)).wait(cfg.cluster.timeout)
            replica.member.pull()
            replica.x.copy_(replica.member.z)
        ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                    "replica": r})
        replica.run()
    ctx.store.set_json(f"done/replica{r}", {"steps": replica.step,
                                            "rounds_joined": replica.member.joined,
                                            "transport_bytes": ps.transport_bytes(),
                                            **feed.stats()})


class _Replica:
    """One replica's phases. Its process's main thread only."""

    def __init__(self, ctx: RoleContext, model, ps: PSClient, feed, generation: int,
                 start: int):
        cfg = ctx.config
        self.ctx, self.feed, self.store = ctx, feed, ctx.store
        self.local_steps = cfg.admm.local_steps
        self.flat = FlatModel(model, grads=1)
        self.model, self.x, self.grad = model, self.flat.params, self.flat.grads[0]
        self.member = ConsensusMember(ctx, ps, self.x, generation)
        self.rule = make_rule(cfg.optimizer, self.x, total=ctx.job["steps"])  # one per step
        self.rule.updates = self.step = start  # a replacement goes on with the schedule
        self.slow = Slowdown.for_worker(cfg, ctx.ident)
        self.task = task_of(cfg)
        self.gate = (ReplicaGate(ctx.store, ctx.member, cfg.cluster.timeout)
                     if cfg.train.checkpoint_every is not None else None)
        self.report = Reporter.for_role(ctx, ctx.job["steps"], module=model)

    def restore(self, saved: dict) -> None:
        self.x.copy_(saved["x"])
        self.rule.load_state_dict(saved["rule"])
        self.member.restore(saved["member"])

    def run(self) -> None:
        while True:
            if not self.member.waiting:
                if self._phase():
                    break
                self.member.contribute()
            with self.ctx.waiting():  # the round closes once the slower replicas contributed
                answer = self.member.await_answer(self.gate, self._save)
            if answer is None or self.member.take(answer):
                break
        self.report.maybe_log(self.step - 1, force=True)

    def _phase(self) -> bool:
        """Take the local steps of one phase; True when the job's last round closed."""
        for _ in range(self.local_steps):
            if self.store.has(FINAL):
                return True
            self._local_step()
        return False

    def _local_step(self) -> None:
        self.ctx.progress()  # the watchdog (--progress-timeout)
        local_step(self.model, self.grad, self.rule, self.feed, self.slow, self.report,
                   self.step, extra=self.member.prox_grad, task=self.task,
                   clip=self.ctx.config.optimizer.clip_grad_norm,
                   precision=self.ctx.config.train.precision)
        self.step += 1

    def _save(self, number: int) -> int:
        """Write this replica's state into checkpoint `number`'s set; its steps."""
        folder = set_dir(self.ctx.job["run_dir"], number)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / state_file(self.ctx.member), {
            "x": self.x.clone(), "rule": self.rule.state_dict(), "step": self.step,
            "member": self.member.state()})
        self.report.publish_buffers()  # the checkpoint keeps them as they are now
        return self.step


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
