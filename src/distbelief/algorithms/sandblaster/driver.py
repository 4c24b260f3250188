"""Sandblaster L-BFGS, the coordinator side (DistBelief, Dean et al. 2012, section 4.2).

The coordinator runs batch L-BFGS (`sandblaster.lbfgs`) whose vectors (the
parameters, gradients, search direction and the (s, y) history) live in the
parameter shards: it sends them small commands (`ps.vectors`) and gets scalars
back. Each gradient evaluation is a batch over all the training data, cut into
many portions (`sandblaster.portions`) handed out to the workers as they become
free; near the end, idle workers get backup copies of the portions still
outstanding and the first answer wins. The workers send each winning gradient
straight into a shard vector of its own (its slot, `sandblaster.worker`), and
the coordinator has the shards add the slots into the batch's gradient in
portion order (`sandblaster.reduction`): no gradient moves through the
coordinator, and who computed which portion changes no bit of the result.

Everything the coordinator hears arrives on one store stream, ``sb/results``:
the workers' results and pushes, and "lost" notes from a watchdog thread that
checks the workers' liveness. A lost worker's unfinished portions, and those
it had not reported sent, are handed out again; a slot it was asked to fill
(it may have died half-way through, or still write late if only silent) is
never used again, and the portion's new answer goes into a fresh slot.

Example (inside the coordinator, once the shards hold the initial parameters)::

    stats = drive(SandblasterJob(store, cfg, ps, metrics, progress, is_lost, evaluate_test,
                                 start_time, watch))
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from distbelief.algorithms.sandblaster.lbfgs import LBFGS, LBFGSSettings
from distbelief.algorithms.sandblaster.portions import Portions, wants_push
from distbelief.algorithms.sandblaster.reduction import InOrder
from distbelief.algorithms.sandblaster.worker import RESULTS, claim_key, message_key

from distbelief.ps.client import PSClient
from distbelief.ps.vectors import PARAMS, RemoteVectors
from distbelief.runtime.store import JobStore, StreamReader


class SandblasterFailed(RuntimeError):
    """The batch cannot be computed (every worker lost, no answer in time, a NaN loss)."""


@dataclass
class SandblasterJob:
    """What the driver needs from the coordinator."""

    store: JobStore
    config: Any  # the job's JobConfig
    ps: PSClient
    write_event: Callable[[dict], None]      # into metrics.jsonl
    show: Callable[[int, float, float], None]  # (iterations done, loss, samples/s)
    is_lost: Callable[[int], bool]           # has worker w died?
    on_iteration: Callable[[int], None]      # after iteration k (periodic test evaluation)
    start_time: float


class PortionEvaluator:
    """`evaluate(g)` for `LBFGS`: the loss and gradient over all portions, at the shards'
    current parameters, with the gradient left in shard vector g, both summed in portion
    order. Blocks. A context manager: leaving it frees the slot vectors."""

    def __init__(self, job: SandblasterJob, space: RemoteVectors):
        cfg = job.config
        self.job, self.space, self.store = job, space, job.store
        self.inbox = job.store.clone()  # blocks in wait_json; the watchdog uses job.store
        self.portions, self.backups = cfg.sandblaster.portions, cfg.sandblaster.backups
        self.push_every, self.timeout = cfg.sandblaster.push_every, cfg.cluster.timeout
        self.alive = set(range(cfg.cluster.replicas))
        self.lost: list[int] = []
        self.busy: set[int] = set()             # workers computing a portion (maybe a stale one)
        self.spare_slots: list[int] = []        # slot vectors the sum has passed: reused
        self.dead_slots: list[int] = []         # slots a lost worker was asked to fill: unused
        self.sent = [0] * cfg.cluster.replicas  # messages sent to each worker
        self.results = self.inbox.stream(RESULTS)  # the watchdog seals a dead worker's hole
        self.copies: dict[str, int] = {}        # claim key -> copies handed out, unanswered
        self.evaluation = 0
        self.stats = {"evaluations": 0, "portions_computed": 0, "backups_issued": 0,
                      "answers_discarded": 0, "portions_reissued": 0, "slots": 0,
                      "samples": 0}

    def __call__(self, g: int) -> float:
        loss = self._evaluate_into(g)
        self.stats["evaluations"] += 1
        return loss

    def __enter__(self) -> PortionEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        # the dead slots stay: a silent (not dead) worker could still write one late
        for v in self.spare_slots:
            self.space.free(v)
        self.spare_slots.clear()

    def _slot(self) -> int:
        """A vector for one portion's gradient (its contents do not matter: the push
        replaces them)."""
        if self.spare_slots:
            return self.spare_slots.pop()
        self.stats["slots"] += 1
        return self.space.new()

    # ---- one batch ---------------------------------------------------------

    def _evaluate_into(self, vector: int) -> float:
        self.evaluation += 1
        e = self.evaluation
        work = Portions(self.portions, backups=self.backups)
        order = InOrder(self.portions)
        unpushed: dict[int, set[int]] = {w: set() for w in self.alive}
        asked: dict[int, dict[int, int]] = {}  # worker -> {portion: slot} of the push asked of it
        ready: dict[int, int] = {}             # portion -> its filled slot, not yet added
        # portion -> (loss, samples) of its accepted answer: a portion a lost worker answered
        # but never pushed is computed again, and its new answer replaces the lost one's
        answers: dict[int, tuple[float, int]] = {}
        for w in sorted(self.alive - self.busy):
            self._give(w, work, e)
        while not order.complete:
            m = self._next()
            w = m.get("worker")
            if m["kind"] == "result":
                self.busy.discard(w)
                self._answered(claim_key(m["eval"], m["portion"], m["generation"]))
                self.stats["portions_computed"] += 1
                if m["eval"] == e and w in self.alive:
                    work.finished(w, m["portion"], accepted=m["accepted"])
                    if m["accepted"]:
                        answers[m["portion"]] = (m["loss"], m["samples"])
                        unpushed[w].add(m["portion"])
                    else:
                        self.stats["answers_discarded"] += 1
                else:  # a backup's original (or vice versa) from an earlier batch
                    self.stats["answers_discarded"] += 1
            elif m["kind"] == "pushed":
                # a lost worker's late report is ignored: its portions were handed out again
                if m["eval"] == e and w in self.alive:
                    slots = asked.pop(w)
                    if sorted(slots) != sorted(m["portions"]):
                        raise RuntimeError(f"worker {w} pushed portions {m['portions']}, "
                                           f"asked for {sorted(slots)}")
                    unpushed[w].difference_update(slots)
                    ready.update(slots)
                    for p in order.arrived(slots):
                        self._add(vector, p, ready.pop(p))
            elif m["kind"] == "lost":
                self._lose(w, work, unpushed, asked)
            for w in sorted(self.alive):
                if w not in self.busy:
                    self._give(w, work, e)
                if w not in asked and wants_push(len(unpushed[w]), self.push_every,
                                                 work.unassigned):
                    asked[w] = {p: self._slot() for p in sorted(unpushed[w])}
                    self._send(w, {"do": "push", "eval": e,
                                   "slots": {str(p): v for p, v in asked[w].items()}})
        self.stats["backups_issued"] += work.backups_issued
        self.stats["samples"] += sum(answers[p][1] for p in range(self.portions))
        loss = sum(answers[p][0] for p in range(self.portions))  # portion order, as the gradient
        if not math.isfinite(loss):
            raise SandblasterFailed(f"the training loss is {loss} at L-BFGS evaluation {e}: "
                                    "lower --lr or check the data")
        return loss

    def _add(self, vector: int, portion: int, slot: int) -> None:
        """vector (+)= the gradient of `portion`, the next one in portion order."""
        if portion == 0:
            self.space.copy(vector, slot)
        else:
            self.space.axpy(1.0, slot, vector)
        self.spare_slots.append(slot)

    def _give(self, w: int, work: Portions, e: int) -> None:
        task = work.next_for(w)
        if task is not None:
            self._send(w, {"do": "portion", "eval": e, "portion": task.portion,
                           "generation": task.generation})
            self.busy.add(w)
            key = claim_key(e, task.portion, task.generation)
            self.copies[key] = self.copies.get(key, 0) + 1

    def _answered(self, key: str) -> None:
        """One copy of a portion answered; once every copy handed out has, no one will
        claim it again, so its claim key goes (a lost worker's copies keep theirs)."""
        self.copies[key] -= 1
        if not self.copies[key]:
            del self.copies[key]
            self.store.delete(key)

    def _lose(self, w: int, work: Portions, unpushed: dict[int, set[int]],
              asked: dict[int, dict[int, int]]) -> None:
        if w not in self.alive:
            return
        self.alive.discard(w)
        self.busy.discard(w)
        self.lost.append(w)
        self.job.write_event({"event": "replica_lost", "time": time.time() - self.job.start_time,
                              "replica": w, "step": self.evaluation})
        if not self.alive:
            raise SandblasterFailed(f"all {len(self.sent)} workers were lost")
        # it may have filled these slots on some shards and not others (or, silent but
        # alive, fill them later): they are never read nor reused
        self.dead_slots.extend(asked.pop(w, {}).values())
        self.stats["portions_reissued"] += len(work.lost(w, unpushed.pop(w, set())))

    # ---- messages ----------------------------------------------------------

    def _send(self, w: int, message: dict) -> None:
        self.store.set_json(message_key(w, self.sent[w]), message)
        self.sent[w] += 1

    def _next(self) -> dict[str, Any]:
        try:
            return self.results.wait(self.timeout)
        except TimeoutError:
            raise SandblasterFailed(f"no worker answered for {self.timeout:.0f} s") from None

    def stop_workers(self) -> None:
        for w in sorted(self.alive):
            self._send(w, {"do": "stop"})


class _Watchdog:
    """Appends {"kind": "lost"} to the results stream when a worker dies, and seals the
    hole a worker killed while appending left in it (the driver waits on that index).
    Context manager."""

    def __init__(self, job: SandblasterJob, results: StreamReader, period: float = 0.2):
        self.job, self.results, self.period = job, results, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandblaster-watchdog",
                                        daemon=True)

    def _run(self) -> None:
        reported: set[int] = set()
        while not self._stop.wait(self.period):
            for w in range(self.job.config.cluster.replicas):
                if w not in reported and self.job.is_lost(w):
                    reported.add(w)
                    self.job.store.append(RESULTS, {"kind": "lost", "worker": w})
            self.results.seal_hole(self.job.store)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def drive(job: SandblasterJob) -> dict:
    """Run the L-BFGS iterations; returns the run's statistics. Blocks."""
    cfg = job.config
    b = cfg.sandblaster
    settings = LBFGSSettings(lr=cfg.optimizer.lr, history=b.history, line_search=b.line_search,
                             tolerance_grad=b.tolerance_grad, tolerance_change=b.tolerance_change)
    space = RemoteVectors(job.ps)
    evaluator = PortionEvaluator(job, space)
    iterations, converged, last_loss = 0, None, None
    began = time.perf_counter()
    try:
        with (_Watchdog(job, evaluator.results), evaluator,
              LBFGS(space, PARAMS, evaluator, settings) as optimizer):
            for k in range(cfg.train.steps):
                samples_before, since = evaluator.stats["samples"], time.perf_counter()
                it = optimizer.step()
                if it.converged in ("gradient", "direction"):  # it did not move
                    converged = it.converged
                    break
                iterations, last_loss = k + 1, it.loss
                elapsed = max(time.perf_counter() - since, 1e-9)
                samples = evaluator.stats["samples"] - samples_before
                job.write_event({
                    "event": "train", "time": time.time() - job.start_time, "replica": None,
                    "step": k + 1, "total_steps": cfg.train.steps, "loss": it.loss,
                    "samples": samples, "samples_per_second": samples / elapsed,
                    "evaluations": it.evaluations, "step_length": it.step,
                    "seconds": elapsed, "workers": len(evaluator.alive)})
                job.show(k + 1, it.loss, samples / elapsed)
                job.on_iteration(k + 1)
                if it.converged:
                    converged = it.converged
                    break
    finally:
        evaluator.stop_workers()
    wall = time.perf_counter() - began
    return {"iterations": iterations, "converged": converged, "final_loss": last_loss,
            "seconds_per_iteration": wall / iterations if iterations else None,
            "lost_workers": sorted(evaluator.lost), "vector_operations": space.ops,
            **evaluator.stats}
