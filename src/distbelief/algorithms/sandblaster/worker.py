"""Sandblaster L-BFGS, the worker side (DistBelief, Dean et al. 2012, section 4.2).

A worker computes the gradient of the training loss over the portions of the
data the coordinator hands it, one at a time. It fetches the parameters from
the shards at the start of each batch (each gradient evaluation), claims every
answer in the store (the first answer for a portion wins, so a backup copy and
its original are never both counted), keeps each winning gradient apart, and
when the coordinator says so (every few portions, and when the batch is nearly
done) sends each one into the shard vector (the portion's *slot*) the
coordinator named for it. The coordinator then adds the slots into the batch's
gradient in portion order (`sandblaster.reduction`), so which worker computed
which portion changes no bit of the sum. The shards apply no update rule.

Two threads: this one reads the coordinator's messages and sends gradients
(so a push is never stuck behind a slow portion); one compute thread works
through the portions in order. The loss of a portion is the sum of its samples'
losses (the job's task's, `distbelief.task`) divided by the training-set size,
so the portions of a batch add up to the mean loss and its gradient.

Messages from the coordinator, in order, at ``sb/worker{w}/{n}``:
    {"do": "portion", "eval": e, "portion": p, "generation": g}
    {"do": "push", "eval": e, "slots": {"p": v, ...}}   (portion -> its slot vector)
    {"do": "stop"}
Reports, on the store stream ``sb/results``:
    {"kind": "result", "worker", "eval", "portion", "accepted", "loss", "samples", "seconds"}
    {"kind": "pushed", "worker", "eval", "portions": [...]}

Fault points (`runtime.faults`, for tests), crossed as ``worker{w}``:
    ``sandblaster.worker.claimed``  a portion computed and its claim taken (won or
                                    not), before the result is reported
    ``sandblaster.worker.sent``     one portion of a push sent into its slot, before
                                    the next one (and before "pushed")
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from distbelief.algorithms.sandblaster.portions import portion_bounds
from distbelief.algorithms.slowdown import Slowdown
from distbelief.model.flat import FlatModel
from distbelief.data.feed import load_data_and_model
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.context import RoleContext
from distbelief.runtime.faults import fault
from distbelief.task import Task, task_of

RESULTS = "sb/results"


def message_key(worker: int, index: int) -> str:
    return f"sb/worker{worker}/{index}"


def claim_key(evaluation: int, portion: int, generation: int) -> str:
    return f"sb/claim/{evaluation}/{portion}/{generation}"


def run_worker(ctx: RoleContext) -> None:
    cfg, w = ctx.config, ctx.ident
    torch.set_num_threads(cfg.cluster.threads_per_process(cfg.cluster.replicas))
    data, model = load_data_and_model(cfg)
    ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
    layout = Layout.from_json(ctx.job["layout"])
    with PSClient(ctx.store, layout, f"worker{w}", transport=cfg.cluster.transport,
                  timeout=cfg.cluster.timeout, grad_buffers=1) as ps:
        _Worker(ctx, ps, model, data, task_of(cfg)).run()
    ctx.store.set_json(f"done/replica{w}", {"transport_bytes": ps.transport_bytes()})


class _Worker:
    def __init__(self, ctx: RoleContext, ps: PSClient, model, data, task: Task):
        self.ctx, self.ps, self.model, self.task = ctx, ps, model, task
        self.inbox = ctx.store.clone()  # this thread blocks on it; the compute thread reports
        self.w = ctx.ident
        self.timeout = ctx.config.cluster.timeout
        self.train = data.train  # read a portion at a time (a .npy directory: memory-mapped)
        self.portions = ctx.config.sandblaster.portions
        self.flat = FlatModel(model, grads=1)  # backward() writes here, a private buffer
        self.out = ps.grad_buffers[0]          # the portion being sent; shards read it on shm
        self.held: dict[int, torch.Tensor] = {}  # accepted portion -> its gradient, until sent
        self.held_eval: int | None = None
        self.lock = threading.Lock()           # guards held, held_eval
        self.fetched: int | None = None        # the evaluation whose parameters are loaded
        self.slow = Slowdown.for_worker(ctx.config, self.w)

    def run(self) -> None:
        """Follow the coordinator's messages until it says stop. Blocks."""
        pending: list[Future] = []
        index = 0
        with ThreadPoolExecutor(1, thread_name_prefix=f"worker{self.w}-compute") as compute:
            while True:
                self.ctx.progress()  # the loop advances: a message was handled
                with self.ctx.waiting():  # on the coordinator, bounded by --timeout
                    message = self._next_message(index, pending)
                index += 1
                if message["do"] == "portion":
                    pending.append(compute.submit(self._compute, message))
                elif message["do"] == "push":
                    self._push(message["eval"], message["slots"])
                elif message["do"] == "stop":
                    break
                else:
                    raise ValueError(f"unknown message from the coordinator: {message}")
                pending = _reraise_failures(pending)
            for future in pending:
                future.result(self.timeout)

    def _next_message(self, index: int, pending: list[Future]) -> dict:
        """Wait for message `index`, surfacing a failed portion and noticing a stopped job."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = self.inbox.wait_json(message_key(self.w, index), timeout=1.0)
                self.inbox.delete(message_key(self.w, index))  # this worker is its only reader
                return message
            except TimeoutError:
                _reraise_failures(pending)
                if self.ctx.stopping():
                    return {"do": "stop"}
                if time.monotonic() > deadline and not pending:
                    raise TimeoutError(f"worker {self.w}: no word from the coordinator for "
                                       f"{self.timeout:.0f} s") from None

    def _compute(self, message: dict) -> None:
        evaluation, portion = message["eval"], message["portion"]
        if self.fetched != evaluation:  # a new batch: fetch the parameters it is computed at
            self.ps.pull(self.flat.params).wait(self.timeout)
            self.fetched = evaluation
        n = len(self.train)
        start, stop = portion_bounds(n, self.portions, portion)
        x, y = self.train.gather(torch.arange(start, stop))
        began = time.perf_counter()
        self.flat.grads[0].zero_()
        with self.slow.compute():
            loss = self.task.loss(self.model(x), y, reduction="sum") / n
            loss.backward()
        loss = loss.detach()
        generation = message["generation"]
        accepted = self.ctx.store.add(claim_key(evaluation, portion, generation), 1) == 1
        if accepted:
            with self.lock:
                if self.held_eval != evaluation:  # whatever is left belongs to an abandoned batch
                    self.held.clear()
                    self.held_eval = evaluation
                self.held[portion] = self.flat.grads[0].clone()
        fault("sandblaster.worker.claimed", who=f"worker{self.w}")
        self.ctx.store.append(RESULTS, {
            "kind": "result", "worker": self.w, "eval": evaluation, "portion": portion,
            "generation": generation, "accepted": accepted, "loss": loss.item(),
            "samples": stop - start,
            "seconds": time.perf_counter() - began})

    def _push(self, evaluation: int, slots: dict[str, int]) -> None:
        """Send each named accepted portion of `evaluation` into its slot vector (replacing
        what the slot held), one after the other in portion order; then report them."""
        order = sorted((int(p), v) for p, v in slots.items())
        with self.lock:  # the compute thread adds to `held`; sending needs no lock
            missing = [p for p, _ in order if self.held_eval != evaluation or p not in self.held]
            if missing:  # the coordinator asks only for answers this worker reported
                raise RuntimeError(f"worker {self.w}: asked to push portions {missing} of "
                                   f"evaluation {evaluation}, which it does not hold")
            grads = [(p, v, self.held.pop(p)) for p, v in order]
        for p, v, grad in grads:
            self.out.copy_(grad)
            self.ps.accumulate(0, v, replace=True).wait(self.timeout)
            fault("sandblaster.worker.sent", who=f"worker{self.w}")
        self.ctx.store.append(RESULTS, {"kind": "pushed", "worker": self.w, "eval": evaluation,
                                        "portions": [p for p, _ in order]})


def _reraise_failures(pending: list[Future]) -> list[Future]:
    """Raise the first failed portion's exception (with its traceback); drop finished ones."""
    for future in pending:
        if future.done():
            future.result()
    return [f for f in pending if not f.done()]
