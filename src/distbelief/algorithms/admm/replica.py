"""Consensus ADMM, a replica's loop (see the package doc for the maths).

A replica keeps its parameters x (the model's, `FlatModel`), its scaled dual
u, the z it last pulled, and its local optimizer (`ps.rules.make_rule`, the
rule the other algorithms apply in the shards). A phase is ``--local-steps``
steps on its own batches with the gradient of
f_i(x) + rho/2 ||x - z + u||^2; then it writes x + u into its PSClient buffer,
makes it its member vector on every shard, appends its contribution to
``admm/arrivals`` and waits for the closer's answer (`protocol`). Answered, it
pulls the new z, reports ||x - z||^2, sets u <- u + x - z, rescales u when rho
changed, and starts the next phase from its own x (warm start). The others
do not wait for a late replica (``--sync-fraction`` < 1): its last
contribution stays in the mean, and its new one is taken by a later round.

Checkpoints: a replica pauses while it waits for an answer (every replica gets
there without any round closing: the coordinator's closer waits while a
checkpoint is taken). It writes ``admm-replica<r>.pt`` (x, u, z, rho, the
rule's state, its step and contribution counts, whether it was still waiting).
Resumed, a waiting replica contributes again (its vector is in the shards'
files). A replacement for a lost replica (``--restart-replicas``) starts from
the current z with u = 0.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from distbelief.algorithms.admm.protocol import ARRIVALS, FINAL, answer_key, member_vector
from distbelief.algorithms.admm.rho import rescale
from distbelief.algorithms.slowdown import Slowdown
from distbelief.checkpoint import ReplicaGate, load_file, set_dir, write_atomic
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.rules import all_finite, make_rule
from distbelief.ps.vectors import ZERO
from distbelief.runtime.context import RoleContext

ANSWER_POLL_SECONDS = 0.002


def state_file(replica: int) -> str:
    return f"admm-replica{replica}.pt"


def run_replica(ctx: RoleContext) -> None:
    cfg, r = ctx.config, ctx.ident
    torch.set_num_threads(cfg.cluster.threads_per_process(cfg.cluster.replicas))
    data, model = replica_data_and_model(ctx)
    restart = ctx.store.try_get_json(f"restart/replica{r}")
    generation = restart["generation"] if restart else 0
    resume = ctx.job.get("resume") if restart is None else None
    saved = load_file(ctx.job["run_dir"], resume, state_file(r)) if resume else None
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
            replica.pull()
            replica.x.copy_(replica.z)
        ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                    "replica": r})
        replica.run()
    ctx.store.set_json(f"done/replica{r}", {"steps": replica.step,
                                            "rounds_joined": replica.joined,
                                            "transport_bytes": ps.transport_bytes(),
                                            **feed.stats()})


class _Replica:
    """One replica's phases and answers. Its process's main thread only."""

    def __init__(self, ctx: RoleContext, model, ps: PSClient, feed, generation: int,
                 start: int):
        cfg = ctx.config
        self.ctx, self.ps, self.feed, self.generation = ctx, ps, feed, generation
        self.store, self.r, self.timeout = ctx.store, ctx.ident, cfg.cluster.timeout
        self.local_steps = cfg.admm.local_steps
        self.flat = FlatModel(model, grads=1)
        self.model, self.x, self.grad = model, self.flat.params, self.flat.grads[0]
        self.z = torch.empty_like(self.x)
        self.u = torch.zeros_like(self.x)
        self.rule = make_rule(cfg.optimizer, self.x)
        self.rho = cfg.admm.rho
        self.based_on = 0  # the round whose z this phase started from
        self.seq = 0  # contributions made
        self.joined = 0  # rounds this replica's contributions went into
        self.step = start
        self.waiting = False  # a contribution is out, its answer not taken
        self.slow = Slowdown.for_worker(cfg, self.r)
        self.gate = (ReplicaGate(ctx.store, ctx.member, self.timeout)
                     if cfg.train.checkpoint_every is not None else None)
        self.report = Reporter.for_role(ctx, ctx.job["steps"])

    def restore(self, saved: dict) -> None:
        self.x.copy_(saved["x"])
        self.u.copy_(saved["u"])
        self.z.copy_(saved["z"])
        self.rule.load_state_dict(saved["rule"])
        self.rho, self.based_on = saved["rho"], saved["based_on"]
        self.seq, self.joined = saved["seq"], saved["joined"]
        if saved["waiting"]:  # the closer of the resumed job has not seen it
            self.seq -= 1
            self._announce()

    def pull(self) -> None:
        self.ps.pull(self.z).wait(self.timeout)

    def run(self) -> None:
        while True:
            if not self.waiting:
                if self._phase():
                    break
                self._contribute()
            answer = self._await_answer()
            if answer is None or self._take(answer):
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
        xb, yb = self.feed.next()
        self.grad.zero_()
        with self.slow.compute():
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
        value = loss.item()
        finite = math.isfinite(value) and all_finite(self.grad)
        if finite:  # a NaN/inf step is skipped (or stops the job: the reporter raises)
            # the augmented Lagrangian's pull towards the consensus
            self.grad.add_(self.x - self.z + self.u, alpha=self.rho)
            self.rule.apply(self.grad)
        self.report.step(value if finite else math.nan, len(yb))
        self.report.maybe_log(self.step)
        self.step += 1

    def _contribute(self) -> None:
        buffer = self.ps.grad_buffers[0]
        torch.add(self.x, self.u, out=buffer)
        self.ps.accumulate(0, member_vector(self.r), replace=True).wait(self.timeout)
        self._announce()

    def _announce(self) -> None:
        self.seq += 1
        self.waiting = True
        self.store.append(ARRIVALS, {"replica": self.r, "gen": self.generation,
                                     "seq": self.seq, "steps": self.step,
                                     "based_on": self.based_on})

    def _await_answer(self) -> dict | None:
        """The closer's answer to this replica's contribution (None: the job's rounds ended
        without it); pauses for a checkpoint meanwhile."""
        key = answer_key(self.r, self.generation, self.seq)
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._answer(key)
            if answer is not None:
                return answer
            if self.store.has(FINAL):
                return self._answer(key)  # the last round may have taken it after all
            if self.gate is not None and (number := self.gate.due()) is not None:
                # no round closes while the coordinator checkpoints, so what is read now
                # holds until the replicas go on: an answer that came meanwhile is taken
                # first (this replica pauses at its next wait)
                answer = self._answer(key)
                if answer is not None:
                    return answer
                self._checkpoint(number)
                deadline = time.monotonic() + self.timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.r}: no consensus round took its contribution "
                                   f"within {self.timeout:g} s (--timeout); replicas may have "
                                   "died")
            time.sleep(ANSWER_POLL_SECONDS)

    def _answer(self, key: str) -> dict | None:
        answer = self.store.try_get_json(key)
        if answer is not None:
            self.store.delete(key)
        return answer

    def _take(self, answer: dict) -> bool:
        """Apply the closer's answer; True when it ends this replica's training."""
        self.waiting = False
        self.joined += 1
        if answer["final"]:
            return True
        self.pull()
        diff = self.x - self.z
        self.store.append(ARRIVALS, {"replica": self.r, "round": answer["round"],
                                     "primal_sq": float(torch.dot(diff, diff))})
        self.u.add_(diff)
        if answer["rho"] != self.rho:
            self.u.mul_(rescale(self.rho, answer["rho"]))
            self.rho = answer["rho"]
        self.based_on = answer["round"]
        return False

    def _checkpoint(self, number: int) -> None:
        folder = set_dir(self.ctx.job["run_dir"], number)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / state_file(self.r), {
            "x": self.x.clone(), "u": self.u.clone(), "z": self.z.clone(), "rho": self.rho,
            "rule": self.rule.state_dict(), "step": self.step, "seq": self.seq,
            "joined": self.joined, "based_on": self.based_on, "waiting": self.waiting})
        self.gate.pause(number, self.step)


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
