"""One consensus member: a replica's (or a replica partition's) side of consensus ADMM.

It holds the scaled dual u, the z it last pulled and rho, and speaks the
round protocol (`protocol`) for a flat parameter vector x that its owner
trains: `pull` z, `prox_grad` adds the augmented Lagrangian's pull
rho (x - z + u) to a gradient, `contribute` makes x + u its member vector on
its shards and announces it, `await_answer` waits for the round that takes it
(pausing for a checkpoint meanwhile, through the owner's `on_pause`), and
`take` pulls the new z, reports ||x - z||^2, updates u and rescales it when rho
changed. Its process's main thread only.

Example (a replica's loop, see `replica.py`)::

    member = ConsensusMember(ctx, ps, x, generation=0)
    member.pull(); x.copy_(member.z)
    while True:
        for _ in range(local_steps): ...grad...; member.prox_grad(grad); rule.apply(grad)
        member.contribute()
        answer = member.await_answer(gate, save)
        if answer is None or member.take(answer):
            break
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from distbelief.algorithms.admm.protocol import ARRIVALS, FINAL, answer_key, member_vector
from distbelief.algorithms.admm.rho import rescale
from distbelief.checkpoint import ReplicaGate
from distbelief.ps.client import PSClient
from distbelief.runtime.context import RoleContext

ANSWER_POLL_SECONDS = 0.002


class ConsensusMember:
    def __init__(self, ctx: RoleContext, ps: PSClient, x: torch.Tensor, generation: int):
        self.ctx, self.ps, self.x, self.generation = ctx, ps, x, generation
        self.store, self.r, self.part = ctx.store, ctx.ident, ctx.part
        self.timeout = ctx.config.cluster.timeout
        self.z = torch.empty_like(x)
        self.u = torch.zeros_like(x)
        self._pull = torch.empty_like(x)  # x - z + u, every step: no allocation per step
        self.rho = ctx.config.admm.rho
        self.based_on = 0  # the round whose z the current phase started from
        self.seq = 0  # contributions made
        self.joined = 0  # rounds that took one of them
        self.waiting = False  # a contribution is out, its answer not taken

    # ---- state ------------------------------------------------------------

    def state(self) -> dict:
        return {"u": self.u.clone(), "z": self.z.clone(), "rho": self.rho, "seq": self.seq,
                "joined": self.joined, "based_on": self.based_on, "waiting": self.waiting}

    def restore(self, saved: dict, announce: dict | None = None) -> None:
        """Continue from `state()`; a contribution that was waiting is announced again (the
        resumed job's closer has not seen it; its vector is in the shards' files)."""
        self.u.copy_(saved["u"])
        self.z.copy_(saved["z"])
        self.rho, self.based_on = saved["rho"], saved["based_on"]
        self.seq, self.joined = saved["seq"], saved["joined"]
        if saved["waiting"]:
            self.seq -= 1
            self._announce(announce or {})

    # ---- the round protocol -------------------------------------------------

    def pull(self) -> None:
        self.ps.pull(self.z).wait(self.timeout)

    def prox_grad(self, grad: torch.Tensor) -> None:
        """grad += rho (x - z + u): the augmented Lagrangian's pull towards the consensus."""
        torch.sub(self.x, self.z, out=self._pull)
        grad.add_(self._pull.add_(self.u), alpha=self.rho)

    def contribute(self, extra: dict | None = None) -> None:
        """Make x + u this member's vector on its shards, then announce it (with `extra`
        fields in the arrival record, e.g. a boundary residual)."""
        buffer = self.ps.grad_buffers[0]
        torch.add(self.x, self.u, out=buffer)
        self.ps.accumulate(0, member_vector(self.r), replace=True).wait(self.timeout)
        self._announce(extra or {})

    def _announce(self, extra: dict) -> None:
        self.seq += 1
        self.waiting = True
        self.store.append(ARRIVALS, {"replica": self.r, "part": self.part,
                                     "gen": self.generation, "seq": self.seq,
                                     "based_on": self.based_on, **extra})

    def await_answer(self, gate: ReplicaGate | None = None,
                     save: Callable[[int], int] | None = None) -> dict | None:
        """The closer's answer to the last contribution (None: the job's rounds ended
        without it). When checkpoint `number` is due (`gate`) and no answer is there,
        `save(number)` writes this process's state and returns its steps, and the process
        pauses until the coordinator lets it go on."""
        key = answer_key(self.ctx.member, self.generation, self.seq)
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._answer(key)
            if answer is not None:
                return answer
            if self.store.has(FINAL):
                return self._answer(key)  # the last round may have taken it after all
            if gate is not None and (number := gate.due()) is not None:
                # no round closes while the coordinator checkpoints, so what is read now
                # holds until the replicas go on: an answer that came meanwhile is taken
                # first (the process pauses at its next wait)
                answer = self._answer(key)
                if answer is not None:
                    return answer
                gate.pause(number, save(number))
                deadline = time.monotonic() + self.timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.ctx.member}: no consensus round took its "
                                   f"contribution within {self.timeout:g} s (--timeout); "
                                   "replicas may have died")
            time.sleep(ANSWER_POLL_SECONDS)

    def _answer(self, key: str) -> dict | None:
        answer = self.store.try_get_json(key)
        if answer is not None:
            self.store.delete(key)
        return answer

    def take(self, answer: dict) -> bool:
        """Apply the closer's answer; True when it ends this member's training."""
        self.waiting = False
        self.joined += 1
        if answer["final"]:
            return True
        self.pull()
        diff = self.x - self.z
        self.store.append(ARRIVALS, {"replica": self.r, "part": self.part,
                                     "round": answer["round"],
                                     "primal_sq": float(torch.dot(diff, diff))})
        self.u.add_(diff)
        if answer["rho"] != self.rho:
            self.u.mul_(rescale(self.rho, answer["rho"]))
            self.rho = answer["rho"]
        self.based_on = answer["round"]
        return False
