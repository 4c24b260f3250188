"""Synchronous data-parallel training (map-reduce), with Project Adam's quorum.

Every replica keeps a full copy of the parameters and of the update rule's
state (`ps.rules.make_rule`, the code the shards run). At each step it computes
the gradient of its own batch, the replicas all-reduce ``[sum of per-sample
gradients..., sum of losses, samples, contributors]`` over one `Group`, and
each applies the same rule to the same mean gradient, so the copies stay
identical: R replicas with batch b take the steps of one process with batch
R*b (the concatenation of their batches).

With ``--sync-fraction F`` < 1 a step completes once the fastest
k = ceil(F*R) replicas delivered (Chilimbi et al., OSDI 2014). Each replica
computes in a background thread on a private copy of the model; a finished
computation draws an arrival number from the store counter
``sync/<step>/arrived`` and the k-th sets ``sync/<step>/quorum``. Every main
thread waits for the quorum, then contributes its gradient if it arrived among
the first k, else zeros; the all-reduce also counts the samples that came in.
A replica still computing when the quorum forms keeps computing; that result
is stale and dropped, and the replica starts afresh on the current parameters
at the first step it is idle. The k replicas of a quorum are idle at the next
step, so every step gets at least k arrivals. With k = R there is no thread.

With ``--device cuda`` each replica keeps the model, the rule's state and the
reduce buffer on its GPU; the replicas tell each other (through the store) where
they compute, and all-reduce over NCCL when every one is on a GPU of its own,
over gloo otherwise (`runtime.device.collective_backend`). Parameters cross to
and from the shards through a pinned host buffer (`runtime.device.DeviceMirror`).

Replica 0 writes the parameters into the shards before each "train" event and
at the end, so the coordinator's evaluations and checkpoint see the model.
Reports through the store stream ``events`` like Downpour (`metrics.report.Reporter`),
with ``dropped``: this replica's gradients dropped since its last report.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from distbelief.model.precision import autocast
from distbelief.algorithms.schedule import quorum_size
from distbelief.algorithms.slowdown import Slowdown
from distbelief.algorithms.sync import QUORUM_POLL_SECONDS
from distbelief.checkpoint import ReplicaGate, load_file, set_dir, write_atomic
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.rules import all_finite, clip_grad_norm_, make_rule
from distbelief.runtime.channel import Group
from distbelief.runtime.context import RoleContext
from distbelief.runtime.device import (DeviceMirror, collective_backend, local_rank,
                                       replica_device, to_cpu, use_device)
from distbelief.runtime.faults import fault
from distbelief.runtime.store import JobStore
from distbelief.task import Task, task_of

GROUP = "pg/sync"
# entries after the gradient in the all-reduced vector: loss sum, samples, contributors, and
# how many replicas saw a checkpoint request (so that all of them pause at the same step)
EXTRA = 4


def run_replica(ctx: RoleContext) -> None:
    cfg, r, replicas = ctx.config, ctx.ident, ctx.config.cluster.replicas
    torch.set_num_threads(cfg.cluster.threads_per_process(replicas))
    data, model = replica_data_and_model(ctx)  # data None: data servers read it
    total = ctx.job["steps"]  # steps_per_replica, computed by the coordinator
    resume = ctx.job.get("resume")
    start = resume["replica_steps"].get(ctx.member, 0) if resume else 0
    device = replica_device(cfg.cluster.device, local_rank(r, None, 1))
    with DeviceMirror(device) as mirror:
        # built before the job is ready: the first torch.optim takes a second to import
        trainer = _Trainer(ctx, model.to(device), start, total, mirror)
        if resume:  # the parameters come from the shards, the rule's state from the checkpoint
            trainer.rule.load_state_dict(load_file(ctx.job["run_dir"], resume,
                                                   "sync.pt")["rule"])
        ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
        dropped, stats = _run(ctx, trainer, data, start, total)
    ctx.store.set_json(f"done/replica{r}", {"steps": total, "dropped": dropped,
                                            "device": mirror.stats(), **stats})


def _run(ctx: RoleContext, trainer: _Trainer, data, start: int, total: int) -> tuple[int, dict]:
    """Connect to the shards and the other replicas, train; (dropped gradients, statistics)."""
    cfg, r, replicas = ctx.config, ctx.ident, ctx.config.cluster.replicas
    layout = Layout.from_json(ctx.job["layout"])
    with PSClient(ctx.store, layout, f"replica{r}", transport=cfg.cluster.transport,
                  timeout=cfg.cluster.timeout, grad_buffers=0) as ps, \
            open_feed(ctx, data, start, total) as feed:  # from the checkpoint's position
        trainer.fetch(ps)  # every replica starts from here
        backend = _agree_on_backend(ctx, trainer.mirror.device)
        group = Group(ctx.store.raw, GROUP, r, replicas, cfg.cluster.timeout,
                      device=trainer.mirror.device if backend == "nccl" else None)
        try:
            ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                        "replica": r})
            dropped = trainer.run(ps, group, feed)
        finally:
            group.close()
    return dropped, {"transport_bytes": ps.transport_bytes(), "collective": backend,
                     **feed.stats()}


def _agree_on_backend(ctx: RoleContext, device) -> str:
    """Publish where this replica computes, read where every replica does, and pick the
    all-reduce's backend from that (the same answer in every replica)."""
    replicas, timeout = ctx.config.cluster.replicas, ctx.config.cluster.timeout
    ctx.store.set_json(f"sync/device/{ctx.ident}", {"host": socket.gethostname(),
                                                    "device": str(device)})
    members = [ctx.store.get_json(f"sync/device/{i}", timeout=timeout,
                                  what=f"replica {i} to say where it computes")
               for i in range(replicas)]
    return collective_backend(members)


class _Trainer:
    """One replica's synchronous loop. Owns the parameters, the rule and the reduce buffer."""

    def __init__(self, ctx: RoleContext, model, start: int, total: int, mirror: DeviceMirror):
        cfg = ctx.config
        self.ctx, self.start, self.total, self.mirror = ctx, start, total, mirror
        device = mirror.device  # the model is there already
        self.feed = None  # the batches (`data.feed`), given to `run`
        self.gate = (ReplicaGate(ctx.store, ctx.member, cfg.cluster.timeout)
                     if cfg.train.checkpoint_every is not None else None)
        self.timeout = cfg.cluster.timeout
        self.quorum = quorum_size(cfg.cluster.sync_fraction, cfg.cluster.replicas)
        self.threaded = self.quorum < cfg.cluster.replicas
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.buf = torch.zeros(numel + EXTRA, device=device)
        self.grad = self.buf[:numel]
        slow, task = Slowdown.for_worker(cfg, ctx.ident), task_of(cfg)
        if self.threaded:  # the thread computes on its own copy while the step goes on
            self.compute = _Gradient(model, torch.zeros(numel, device=device), slow, task,
                                     autocast(cfg.train.precision, cfg.cluster.device))
            self.params = self.compute.flat.params.clone()
        else:  # the model is the parameters, and backward() writes into the reduce buffer
            self.compute = _Gradient(model, self.grad, slow, task,
                                     autocast(cfg.train.precision, cfg.cluster.device))
            self.params = self.compute.flat.params
        self.rule = make_rule(cfg.optimizer, self.params, total=total)  # its schedule: steps
        self.host_params = mirror.host_twin(self.params)  # the parameters on the CPU
        self.report: Reporter | None = None
        self.ps: PSClient | None = None
        self.group: Group | None = None

    def fetch(self, ps: PSClient) -> None:
        """Pull the parameters from the shards (to the device). Blocks."""
        ps.pull(self.host_params).wait(self.timeout)
        self.mirror.from_host_async(self.params).wait(self.timeout)

    def _on_host(self) -> torch.Tensor:
        """The parameters in host memory (copied there from a GPU). Blocks."""
        self.mirror.to_host_async(self.params).wait(self.timeout)
        return self.host_params

    def run(self, ps: PSClient, group: Group, feed) -> int:
        """Train every step; returns how many of this replica's gradients were dropped."""
        self.ps, self.group, self.feed = ps, group, feed
        # the loss is that of the steps' combined batches (the same on every replica); samples
        # count this replica's gradients that went into a step
        self.report = Reporter.for_role(self.ctx, self.total, count_dropped=True,
                                        module=self.compute.flat.model)
        if not self.threaded:
            for step in range(self.start, self.total):
                self.ctx.progress()  # the watchdog (--progress-timeout)
                fault("replica.step", f"replica{self.ctx.member}")
                xb, yb = self.mirror.to_device(*self.feed.next())
                loss = self.compute(xb, yb)
                self.buf[-EXTRA:] = torch.tensor([loss, len(yb), 1.0, self._saw_request()])
                self._reduce_and_apply(step, len(yb))
                self._maybe_report(step)
        else:
            with _Background(self.compute, self.ctx.store, self.quorum,
                             f"replica{self.ctx.ident}-gradient", self.mirror.device) as worker:
                for step in range(self.start, self.total):
                    self.ctx.progress()
                    fault("replica.step", f"replica{self.ctx.member}")
                    self._quorum_step(step, worker)
                    self._maybe_report(step)
                self.report.drop(worker.finish(self.timeout))
        self._publish()
        self.report.log(self.total - 1)
        return self.report.dropped_total

    def _quorum_step(self, step: int, worker: _Background) -> None:
        if worker.busy and worker.done:
            self.report.drop(worker.take_stale())
        if not worker.busy:  # start on the current parameters
            worker.start(step, self.params, *self.mirror.to_device(*self.feed.next()))
        with self.ctx.waiting():  # for the fastest replicas
            _wait_for_quorum(self.ctx, step, worker, self.quorum, self.timeout)
        result = worker.take(step, self.timeout)
        if result is None:  # late or still computing: this step goes on without it
            self.buf.zero_()
            self.buf[-1] = self._saw_request()
            samples = 0
        else:
            grad, loss, samples = result
            self.grad.copy_(grad)
            self.buf[-EXTRA:] = torch.tensor([loss, samples, 1.0, self._saw_request()])
        self._reduce_and_apply(step, samples)

    def _reduce_and_apply(self, step: int, own_samples: int) -> None:
        with self.ctx.waiting():  # for the slowest replica: no lack of progress of this one
            self.group.all_reduce_sum(self.buf)
        loss_sum, samples, contributors, requested = self.buf[-EXTRA:].tolist()
        try:
            self._apply(step, own_samples, loss_sum, samples, contributors)
        finally:
            if requested > 0:  # every replica saw the same sum: all pause after this step
                self._checkpoint(step)

    def _saw_request(self) -> float:
        return 1.0 if self.gate is not None and self.gate.due() is not None else 0.0

    def _checkpoint(self, step: int) -> None:
        """Pause for the coordinator's checkpoint; replica 0 first writes the parameters into
        the shards and the rule's state into the checkpoint set."""
        number = self.ctx.store.get_json("ckpt/request", timeout=self.timeout)
        if self.ctx.ident == 0:
            self.ps.set(self._on_host()).wait(self.timeout)
            folder = set_dir(self.ctx.job["run_dir"], number)
            folder.mkdir(parents=True, exist_ok=True)
            # on the CPU, so that a run on a GPU resumes anywhere
            write_atomic(folder / "sync.pt", {"rule": to_cpu(self.rule.state_dict())})
        self.report.publish_buffers()  # the checkpoint keeps them as they are now
        with self.ctx.waiting():
            self.gate.pause(number, step + 1)

    def _apply(self, step: int, own_samples: int, loss_sum: float, samples: float,
               contributors: float) -> None:
        if round(contributors) != self.quorum:
            raise RuntimeError(f"replica {self.ctx.ident}: step {step + 1} combined "
                               f"{contributors:g} gradients, expected {self.quorum} (a bug in "
                               "the quorum protocol)")
        loss = loss_sum / samples
        if not (math.isfinite(loss) and all_finite(self.grad)):
            # every replica sees the same sum, so every replica skips (or stops) alike
            if self.ctx.config.train.on_nonfinite == "stop":
                self.ctx.store.set_json("job/nonfinite", {"client": f"replica{self.ctx.ident}",
                                                          "loss": str(loss)})
                raise FloatingPointError(f"replica {self.ctx.ident}: the training loss is "
                                         f"{loss} at step {step + 1}; lower --lr or check the "
                                         "data")
            self.report.skip_nonfinite(own_samples)
            return
        self.grad.div_(samples)  # the mean over every sample of the step
        clip_grad_norm_(self.grad, self.ctx.config.optimizer.clip_grad_norm)  # its global norm
        self.rule.apply(self.grad)
        self.report.step(loss, own_samples)

    def _maybe_report(self, step: int) -> None:
        # the last step's report waits until a computation still running was collected
        if (step + 1) % self.report.every == 0 and step < self.total - 1:
            self._publish()
            self.report.log(step)

    def _publish(self) -> None:
        """Replica 0 writes the synchronous model into the shards (for evaluation, checkpoint)."""
        if self.ctx.ident == 0:
            self.ps.set(self._on_host()).wait(self.timeout)


class _Gradient:
    """The summed-loss gradient of one batch on `model`, written into `grad` (a flat vector).

    The loss is `task`'s, summed over the batch's samples rather than averaged, so that
    gradients of batches of any sizes add up and one division by all their samples
    gives the mean of the combined batch.
    """

    def __init__(self, model, grad: torch.Tensor, slow: Slowdown, task: Task,
                 autocast: torch.autocast):
        self.flat = FlatModel(model, grads=[grad])
        self.slow, self.task, self.autocast = slow, task, autocast

    @property
    def grad(self) -> torch.Tensor:
        return self.flat.grads[0]

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        self.grad.zero_()
        with self.slow.compute():
            with self.autocast:
                loss = self.task.loss(self.flat.model(xb), yb, reduction="sum")
            loss.backward()
        return loss.item()


class _Background:
    """Computes one gradient at a time in a background thread, then takes an arrival number.

    Used by the main thread only (not thread-safe itself); the lock orders the
    thread's arrival against the main thread's `take`, so a gradient counted
    among the first k of its step is always contributed. Context manager: the
    thread is joined on exit (waiting for a computation still running).
    """

    def __init__(self, compute: _Gradient, store: JobStore, quorum: int, name: str, device):
        self.compute, self.store, self.quorum = compute, store, quorum
        # the thread computes on the replica's device (CUDA: made its current one)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=use_device,
                                        initargs=(device,))
        self._lock = threading.Lock()
        self._future: Future | None = None
        self._arrival: tuple[int, int] | None = None  # (step, arrival number), set by the thread

    @property
    def busy(self) -> bool:
        """A computation was started and its result not yet taken."""
        return self._future is not None

    @property
    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def start(self, step: int, params: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.compute.flat.params.copy_(params)  # safe: the thread is idle
        self._arrival = None
        self._future = self._pool.submit(self._run, step, xb, yb)

    def _run(self, step: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, int]:
        loss = self.compute(xb, yb)
        with self._lock:
            arrival = self.store.add(f"sync/{step}/arrived", 1)
            if arrival == self.quorum:
                self.store.set_json(f"sync/{step}/quorum", True)
            self._arrival = (step, arrival)
        return loss, len(yb)

    def raise_if_failed(self) -> None:
        if self.done and self._future.exception() is not None:
            self._future.result()  # re-raises with the thread's traceback

    def take(self, step: int, timeout: float) -> tuple[torch.Tensor, float, int] | None:
        """After step's quorum formed: (grad, loss sum, samples) if this replica is in it, else None."""
        with self._lock:
            arrival = self._arrival
        if arrival is None or arrival[0] != step or arrival[1] > self.quorum:
            return None
        loss, samples = self._future.result(timeout)
        self._future = None
        return self.compute.grad, loss, samples

    def take_stale(self) -> int:
        """Collect a finished computation that missed its quorum; returns 1 (one dropped)."""
        self._future.result()
        self._future = None
        return 1

    def finish(self, timeout: float) -> int:
        """Wait for a computation still running (it is dropped); returns how many were dropped."""
        if self._future is None:
            return 0
        self._future.result(timeout)
        self._future = None
        return 1

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _wait_for_quorum(ctx: RoleContext, step: int, worker: _Background, quorum: int,
                     timeout: float) -> None:
    """Block until `quorum` replicas delivered step's gradient (or the timeout passes)."""
    key = f"sync/{step}/quorum"
    deadline = time.monotonic() + timeout
    while not ctx.store.has(key):
        worker.raise_if_failed()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"replica {ctx.ident}: fewer than {quorum} of the {ctx.config.cluster.replicas} "
                f"replicas delivered the gradient of step {step + 1} within {timeout:g} s "
                "(--timeout); a replica may have died")
        time.sleep(QUORUM_POLL_SECONDS)


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
