"""Consensus ADMM, the coordinator side: the round closer, a `Poller` of the watch loop.

On every pass it reads the replicas' contributions and primal reports
(`protocol`), and once the open round has its quorum (fresh contributions from
ceil(F R) of the live replicas) it closes it: one MEAN on every shard sets z
to the mean of every live replica's latest contribution, fresh or not (the
partial barrier of Zhang and Kwok's asynchronous ADMM, 2014: a slow replica's
last x + u stays in the mean until its next one replaces it), and returns
||z - z_prev||^2; the dual residual is rho ||z - z_prev||; each replica whose
fresh contribution it took (the round's members) gets its answer (the round,
the next round's rho, whether that was the last round). A lost replica's
contribution leaves the mean; a replacement's joins with its first one.
The primal residual of a round,
sqrt(mean over its members of ||x_i - z||^2), is complete once every member
that still lives reported it (right after pulling z); a "round" event
goes into ``metrics.jsonl`` then. ``--rho-schedule balance`` acts on the
latest complete round's residuals (usually the one before: the primal residual
is measured by the replicas after the close).

Between passes `wait` watches the arrivals counter (1 ms polls) so that a
round closes as soon as its quorum is in, not a pass later. Coordinator thread
only; a checkpoint is taken between passes, so no round closes while the
replicas pause.
"""

from __future__ import annotations

import math
import time

from distbelief.algorithms.admm.protocol import (ARRIVALS, FINAL, MEMBERS_BASE, answer_key)
from distbelief.algorithms.admm.rho import next_rho
from distbelief.algorithms.base import Coordination, Poller, Watch
from distbelief.algorithms.schedule import quorum_size
from distbelief.ps.vectors import MEAN, PARAMS, member_mask
from distbelief.runtime.context import member_name

POLL_SECONDS = 0.001


class RoundCloser(Poller):
    """Closes consensus rounds as their contributions come in; see the module doc."""

    def __init__(self, co: Coordination, rounds: int):
        cfg = co.config
        self.co, self.store, self.ps, self.cfg = co, co.store, co.ps, cfg.admm
        self.replicas, self.fraction = cfg.cluster.replicas, cfg.cluster.sync_fraction
        self.parts = [None] if cfg.model.partitions == 1 else list(range(cfg.model.partitions))
        self.timeout = cfg.cluster.timeout
        self.rounds = rounds
        state = (co.resume or {}).get("algorithm_state") or {}
        self.round = int(state.get("round", 0))  # rounds closed so far
        self.rho = float(state.get("rho", self.cfg.rho))
        self.arrivals = co.store.stream(ARRIVALS)
        self.pending: list[dict] = []  # fresh contributions waiting for a round
        self.partial: dict[tuple, dict] = {}  # contributions some partitions still owe
        # replicas whose latest contribution is in their member vector (in the mean)
        self.contributors: set[int] = set(state.get("contributors", ()))
        self.generations: dict[int, int] = {}  # the generation of each one's contribution
        self.open: dict[int, dict] = {}  # closed rounds still waiting for primal reports
        self.balanced = int(state.get("balanced", 0))  # rounds the schedule has acted on
        self.late = int(state.get("late", 0))  # contributions that rolled into a later round
        self.last: dict = state.get("last") or {}
        self.rho_from: dict[int, int] = {}  # round -> the round whose residuals set its rho
        if self.round >= self.rounds:
            self.store.set_json(FINAL, True)

    # ---- the watch loop's hooks -------------------------------------------

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.store.add(f"{ARRIVALS}/count", 0) > self.arrivals.next:
                return
            time.sleep(POLL_SECONDS)

    def poll(self, watch: Watch) -> None:
        for record in self.arrivals.read():
            if "primal_sq" in record:
                self._primal(record)
            else:
                self._arrived(record)
        # a lost replica's contribution is dropped, and so is one a replaced replica made
        self.pending = [c for c in self.pending if c["replica"] not in watch.lost
                        and c["gen"] >= watch.restarts.get(c["replica"], 0)]
        self.contributors -= watch.lost
        self.contributors -= {r for r, gen in self.generations.items()
                              if gen < watch.restarts.get(r, 0)}
        for c in self.pending:
            self.contributors.add(c["replica"])
            self.generations[c["replica"]] = c["gen"]
        live = self.replicas - len(watch.lost)
        if (self.round < self.rounds and live > 0
                and len(self.pending) >= quorum_size(self.fraction, live)):
            self._close(self.pending, watch)
            self.pending = []
        if self.round >= self.rounds:  # the job's rounds are done: release whoever waits
            for c in self.pending:
                self._answer(c, final=True)
            self.pending = []
        self._complete(watch)

    def _arrived(self, record: dict) -> None:
        """A partition's part of a contribution (or a whole one, unpartitioned)."""
        key = (record["replica"], record["gen"], record["seq"])
        contribution = self.partial.setdefault(key, {**record, "boundary": {}, "parts": set()})
        contribution["parts"].add(record["part"])
        if record.get("boundary") is not None:
            contribution["boundary"][record["part"]] = record["boundary"]
        if len(contribution["parts"]) == len(self.parts):
            self.pending.append(self.partial.pop(key))

    def checkpoint_state(self) -> dict:
        # the pending contributions are not saved: their replicas pause while waiting and
        # contribute again when the job resumes (their vectors are in the shards' files)
        return {"round": self.round, "rho": self.rho, "balanced": self.balanced,
                "late": self.late, "last": self.last,
                "contributors": sorted(self.contributors)}

    def close(self) -> None:
        self._complete(self.co.watch, flush=True)

    # ---- rounds -----------------------------------------------------------

    def _close(self, members: list[dict], watch: Watch) -> None:
        mask = member_mask(self.contributors)
        change_sq = sum(self.ps.vector(MEAN, PARAMS, mask, float(MEMBERS_BASE))
                        .wait(self.timeout))
        self.round += 1
        dual = self.rho * math.sqrt(change_sq)
        # a contribution made from the z of round b was meant for round b + 1
        self.late += sum(1 for c in members if c["based_on"] + 1 < self.round)
        self.open[self.round] = {"round": self.round, "rho": self.rho, "dual": dual,
                                 "members": sorted(c["replica"] for c in members),
                                 "boundary": _boundaries(members, len(self.parts)),
                                 "primal_sq": {}, "time": time.time() - self.co.start_time,
                                 "step": watch.leading_step}
        self._schedule()
        final = self.round >= self.rounds
        for c in members:
            self._answer(c, final=final)
        if final:
            self.store.set_json(FINAL, True)

    def _answer(self, contribution: dict, *, final: bool) -> None:
        for part in self.parts:
            self.store.set_json(answer_key(member_name(contribution["replica"], part),
                                           contribution["gen"], contribution["seq"]),
                                {"round": self.round, "rho": self.rho, "final": final})

    def _schedule(self) -> None:
        """Set the next round's rho from the latest complete round the schedule has not
        acted on yet (grow and fixed need none)."""
        if self.cfg.rho_schedule != "balance":
            self.rho = next_rho(self.cfg.rho_schedule, self.rho, primal=None, dual=None,
                                rho_max=self.cfg.rho_max)
            return
        if self.last.get("round", 0) > self.balanced:
            self.balanced = self.last["round"]
            self.rho_from[self.round + 1] = self.balanced
            self.rho = next_rho("balance", self.rho, primal=self.last["primal"],
                                dual=self.last["dual"], rho_max=self.cfg.rho_max,
                                mu=self.cfg.balance_mu, tau=self.cfg.balance_tau)

    def _primal(self, record: dict) -> None:
        entry = self.open.get(record["round"])
        if entry is not None:
            entry["primal_sq"][(record["replica"], record["part"])] = record["primal_sq"]

    def _complete(self, watch: Watch, flush: bool = False) -> None:
        """Write the event of every round whose members all reported (or were lost)."""
        for number in sorted(self.open):
            entry = self.open[number]
            waiting = [r for r in entry["members"] if r not in watch.lost
                       and any((r, part) not in entry["primal_sq"] for part in self.parts)]
            if waiting and not flush:
                break  # rounds complete in order
            # a replica's ||x - z||^2 is the sum over its partitions; the mean over replicas
            reported = {r for r, _ in entry["primal_sq"]}
            primal = (math.sqrt(sum(entry["primal_sq"].values()) / len(reported))
                      if reported else None)
            del self.open[number]
            event = {"event": "round", "time": entry["time"], "round": number,
                     "step": entry["step"], "rho": entry["rho"], "primal": primal,
                     "dual": entry["dual"], "members": entry["members"],
                     "boundary": entry["boundary"],
                     "rho_from": self.rho_from.pop(number, None)}
            self.co.write_event(event)
            if primal is not None:
                self.last = {"round": number, "primal": primal, "dual": entry["dual"]}
            watch.note = (f"round {number}  primal {_fmt(primal)}  dual {entry['dual']:.2e}  "
                          f"rho {entry['rho']:g}"
                          + "".join(f"  boundary{k} {b:.2e}"
                                    for k, b in enumerate(entry["boundary"])))
            watch.extra.update({"rounds": number, "rho": self.rho, "dual": entry["dual"],
                                "late_contributions": self.late})
            if primal is not None:  # the last round's is never measured: its replicas stop
                watch.extra["primal"] = primal
            if entry["boundary"]:
                watch.extra["boundary"] = entry["boundary"]
                watch.extra.setdefault("first_boundary", entry["boundary"])


def _boundaries(members: list[dict], parts: int) -> list[float]:
    """Each boundary's residual over the round's members (the RMS of theirs)."""
    out = []
    for k in range(parts - 1):
        values = [c["boundary"][k] for c in members if k in c["boundary"]]
        out.append(math.sqrt(sum(v * v for v in values) / len(values)) if values else math.nan)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"
