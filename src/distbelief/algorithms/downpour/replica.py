"""Downpour SGD, the replica side (DistBelief, Dean et al. 2012, section 4.1).

Each replica trains on its own part of the data. Before step t it fetches the
parameters when the schedule says so (`schedule.fetch_before`), computes the
gradient of its batch, and after step t pushes the gradient accumulated since
its last push (`schedule.push_after`). The update rule runs inside the shards.
Pushes go out in the background: the replica alternates two gradient buffers,
so it computes the next steps while the last push is still being applied.

With ``warm_start_steps = W``, replica 0 trains alone for W steps, then sets
``warm/done`` and the other replicas join (they wait for that key).

With ``--partitions K`` a replica is K processes, each running this loop on its
partition of the model (`model.partition`): it pulls from and pushes to only the
shards that hold its own parameters (DistBelief's figure 2), and the forward
and backward passes exchange boundary activations and gradients with the other
partitions. The partitions follow the same schedule, so they stay in step.

With ``--replica-workers T`` > 1 a step is one batch per worker thread: T
lock-free threads share the replica's local copy and update it with plain SGD
between fetches (Project Adam; `workers.py`).

A step whose loss or gradient holds NaN or inf spoils only itself: its
gradient is checked alone (`ps.rules.all_finite`, one reduction) before it joins
the push window's sum (`PushWindow`), and left out and counted (``nonfinite`` in
the "train" events) under ``--on-nonfinite skip``; a window with no finite step
is not pushed. Under ``--on-nonfinite stop`` the replica sets ``job/nonfinite``
and raises, and the coordinator ends the job. With T worker threads each
worker's batch is checked alone (`workers.ReplicaWorkers`). A partition checks
the loss it sees and its own part of the gradient: there is no vote between
partitions, but a NaN from the data or the activations reaches every
partition's gradient (forward through the later partitions, backward through
the earlier ones), so they all leave that step out; a gradient non-finite in
one partition only, with a finite loss, is left out of that partition's push
alone, while the others apply theirs.

With ``--device cuda`` the model, its gradient buffers and the batches live on
the process's GPU (`runtime.device`): a fetch lands in a pinned host buffer and
is copied to the device on a side stream before the next forward; a push first
copies the window's gradient from the device into the client's buffer (pinned
in place), on the side stream, and the shard threads send it once it landed,
while this thread goes on to the next step. On the CPU the model's parameters
and gradients are those host buffers themselves and no copy is made.

Reports to the coordinator through the store stream ``events``: a "train" event
every `log_every` steps (`metrics.report.Reporter`); sets ``done/replica<r>`` at the end.
"""

from __future__ import annotations

import contextlib
from functools import partial
import math
import time

import torch

from distbelief.algorithms.downpour.workers import ReplicaWorkers
from distbelief.algorithms.schedule import fetch_before, push_after
from distbelief.algorithms.downpour.staleness import Clocks, resume_step, tick_to
from distbelief.algorithms.slowdown import Slowdown
from distbelief.checkpoint import ReplicaGate
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.model.partition import PartitionPlan, open_partition
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.rules import all_finite, clip_grad_norm_
from distbelief.runtime.context import RoleContext
from distbelief.runtime.device import DeviceMirror, local_rank, replica_device
from distbelief.runtime.faults import fault
from distbelief.task import Task, task_of


def run_replica(ctx: RoleContext) -> None:
    cfg, r = ctx.config, ctx.ident
    processes = cfg.cluster.replicas * cfg.model.partitions
    # each of a replica's worker threads computes on its own share of the cores
    processes *= cfg.downpour.replica_workers
    torch.set_num_threads(cfg.cluster.threads_per_process(processes))
    data, model = replica_data_and_model(ctx)  # data None: data servers read it
    plan = PartitionPlan.from_json(ctx.job["partition"])
    part = ctx.part or 0
    device = replica_device(cfg.cluster.device, local_rank(r, ctx.part, cfg.model.partitions))
    module = plan.part_module(model, part).to(device)
    del model  # a partition keeps only its own layers
    task = task_of(cfg)  # the loss every step computes
    total = ctx.job["steps"]  # steps_per_replica, computed by the coordinator
    threads = cfg.downpour.replica_workers  # a step takes one batch per worker thread
    resume = ctx.job.get("resume")
    restart = ctx.store.try_get_json(f"restart/replica{r}")  # a replacement for a lost one
    start = resume["replica_steps"].get(ctx.member, 0) if resume else 0
    if restart is not None:
        start = max(start, restart["start"])
        if cfg.downpour.max_staleness is not None:  # the clock never goes back
            start = resume_step(ctx.store, r, start)
    # the shards hold the initial parameters once the coordinator says the job is ready
    ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
    if r > 0 and cfg.downpour.warm_start_steps > 0 and not _wait_for_warm_start(ctx):
        return
    layout = Layout.from_json(ctx.job["layout"])
    name = f"replica{r}"
    if ctx.part is not None:  # only the shards that hold this partition's parameters
        layout = layout.subset(ctx.job["partition"]["shards"][part])
        name = f"replica{r}.part{part}"
    peers = ctx.store.clone()  # the partition's channels join through their own connection
    try:
        with PSClient(ctx.store, layout, name, transport=cfg.cluster.transport,
                      timeout=cfg.cluster.timeout, pinned=device.type == "cuda") as ps, \
                DeviceMirror(device) as mirror, \
                open_partition(plan, module, part, store=peers.raw,
                               name=f"replica{r}.g{restart['generation'] if restart else 0}",
                               timeout=cfg.cluster.timeout, task=task,
                               precision=cfg.train.precision, device=cfg.cluster.device) as runner, \
                open_feed(ctx, data, start * threads, total * threads) as feed:  # batches, from
            # the checkpoint's data position
            if runner.reports_loss:
                ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                            "replica": r})
            # on the CPU backward() writes where the shards read; on a GPU into device twins
            grads = [mirror.device_twin(grad) for grad in ps.grad_buffers]
            for grad in grads:
                grad.zero_()
            scratch = None
            if cfg.downpour.n_push > 1 and threads == 1:  # a step's gradient, checked alone
                scratch = len(grads)
                grads.append(torch.zeros_like(grads[0]))
            flat = FlatModel(module, grads=grads)
            mirror.host_twin(flat.params)  # where fetches land (the parameters, on the CPU)
            acked, bounded = _train(ctx, ps, mirror, PushWindow(flat, scratch), runner, feed,
                                    start, total, task)
            boundary_bytes = runner.bytes_sent
            data_stats = feed.stats()
            copies = mirror.stats()
    finally:
        peers.close()
    if r == 0:  # a warm start longer than the run must not leave the others waiting
        ctx.store.set_json("warm/done", True)
    ctx.store.set_json(f"done/replica{ctx.member}", {"steps": total, "acked": acked,
                                                     "boundary_bytes": boundary_bytes,
                                                     "transport_bytes": ps.transport_bytes(),
                                                     "device": copies, **bounded, **data_stats})


class PushWindow:
    """The gradient a push window sends: the sum of its finite steps' gradients only.

    Each step's gradient is seen alone before it joins the sum: the window's first
    finite step is computed straight into the push buffer (zero at the start), every
    later one into the scratch buffer, then added (`keep`) or cleared (`drop`).
    With ``--n-push 1`` (no scratch) every step is a window's first, so a step costs
    nothing more than the check. `kept` counts the steps in the sum (the worker
    threads' batches with T > 1, which add their own). Used by one thread.

    Example::

        window = PushWindow(flat, scratch=2)   # flat.grads: push buffers 0, 1; scratch 2
        window.begin(0)
        grad = window.target()                 # .grad points there; backward() adds in
        loss = runner.train_step(xb, yb)
        window.keep() if math.isfinite(loss) and all_finite(grad) else window.drop()
        if window.kept:
            ps.push(0)
    """

    def __init__(self, flat: FlatModel, scratch: int | None):
        """`scratch`: the index in `flat.grads` of the scratch buffer (None: n_push 1)."""
        self.flat, self.scratch = flat, scratch
        self.buf = self.bound = 0  # FlatModel starts bound to buffer 0
        self.kept = 0

    def begin(self, buf: int) -> None:
        """Start a window summing into `flat.grads[buf]`, which must be zero."""
        self.buf, self.kept = buf, 0

    def target(self) -> torch.Tensor:
        """Point the parameters' ``.grad`` where the next step's gradient goes; return it."""
        index = self.buf if self.kept == 0 or self.scratch is None else self.scratch
        if index != self.bound:
            self.flat.bind_grads(index)
            self.bound = index
        return self.flat.grads[index]

    def keep(self) -> None:
        """The step's gradient (in `target()`) joins the window's sum."""
        if self.bound != self.buf:
            step = self.flat.grads[self.bound]
            self.flat.grads[self.buf].add_(step)
            step.zero_()
        self.kept += 1

    def drop(self) -> None:
        """The step's gradient (in `target()`) is left out."""
        self.flat.grads[self.bound].zero_()


def _train(ctx: RoleContext, ps: PSClient, mirror: DeviceMirror, window: PushWindow, runner,
           feed, start: int, total: int, task: Task) -> tuple[int, dict]:
    """Train steps start..total-1 (the worker threads, with T > 1, under `task`'s loss; the
    runner has its own); returns how many pushes the shards acknowledged, and the
    bounded-staleness figures (none when unbounded)."""
    cfg, r = ctx.config, ctx.ident
    gate = (ReplicaGate(ctx.store, ctx.member, cfg.cluster.timeout)
            if cfg.train.checkpoint_every is not None else None)
    whole_name = PartitionPlan.from_json(ctx.job["partition"]).whole_name  # buffers' names
    report = Reporter.for_role(ctx, total, enabled=runner.reports_loss, module=window.flat.model,
                               rename=partial(whole_name, ctx.part or 0))
    slow = Slowdown.for_worker(cfg, r)
    threads = cfg.downpour.replica_workers
    clocks = None
    if cfg.downpour.max_staleness is not None:
        clocks = Clocks(ctx.store, replica=r, replicas=cfg.cluster.replicas,
                        bound=cfg.downpour.max_staleness, start=start,
                        timeout=cfg.cluster.timeout)
    with contextlib.ExitStack() as stack:
        workers = (stack.enter_context(ReplicaWorkers(window.flat, threads, cfg.optimizer.lr,
                                                      cfg.cluster.timeout, task=task,
                                                      precision=cfg.train.precision))
                   if threads > 1 else None)
        acked = _steps(ctx, ps, mirror, window, runner, feed, start, total, gate, report, slow,
                       workers, clocks)
    if clocks is None:
        return acked, {}
    clocks.close()
    return acked, {"max_clock_gap": clocks.max_gap,
                   "staleness_wait_seconds": clocks.wait_seconds}


def _steps(ctx: RoleContext, ps: PSClient, mirror: DeviceMirror, window: PushWindow, runner,
           feed, start: int, total: int, gate, report: Reporter, slow: Slowdown,
           workers: ReplicaWorkers | None, clocks: Clocks | None) -> int:
    """The step loop of `_train`; `workers`: the replica's threads (None: T = 1); `clocks`:
    the bounded staleness (None: unbounded); `mirror`: the copies between the replica's
    device and the client's host buffers (none on the CPU)."""
    cfg, r, flat = ctx.config, ctx.ident, window.flat
    host_params = mirror.host_twin(flat.params)
    n_fetch, n_push, timeout = cfg.downpour.n_fetch, cfg.downpour.n_push, cfg.cluster.timeout
    pending = [None, None]  # the push handle still reading each gradient buffer
    buf = 0
    window.begin(buf)
    window_versions = None
    for step in range(start, total):
        ctx.progress()  # the watchdog: a loop that stops coming here is lost (--progress-timeout)
        fault("replica.step", f"replica{ctx.member}")
        fetch = fetch_before(step, n_fetch) or step == start  # a resumed replica fetches first
        if clocks is not None:  # may wait; then fetches too if its copy is older than the bound
            with ctx.waiting():  # for slower replicas: no lack of progress of this one
                fetch = clocks.before_step(step, fetch)
        arrived = None
        if fetch:
            with ctx.waiting():
                ps.pull(host_params).wait(timeout)
            arrived = mirror.from_host_async(flat.params)  # overlaps with reading the batch
        if window_versions is None:  # the versions this push window's gradients are computed on
            window_versions = list(ps.fetched_versions)
        if workers is None:
            grad = window.target()
            xb, yb = mirror.to_device(*feed.next())
            if arrived is not None:
                arrived.wait(timeout)
            with slow.compute():
                loss = runner.train_step(xb, yb)
                runner.flush()  # a pipeline stage may still owe the step's weight gradients
            if (loss is None or math.isfinite(loss)) and all_finite(grad):  # None: not seen here
                clip_grad_norm_(grad, cfg.optimizer.clip_grad_norm)  # this step's gradient
                window.keep()
                report.step(loss, len(yb))
            else:
                window.drop()
                _nonfinite(ctx, report, step, loss, len(yb))
        else:  # T batches, the finite gradients summed into the push buffer (CPU only)
            if arrived is not None:
                arrived.wait(timeout)
            with slow.compute():
                loss, samples = workers.step(feed, flat.grads[buf])
            window.kept += workers.threads - len(workers.skipped)
            if samples:
                report.step(loss, samples)
            for bad_loss, bad_samples in workers.skipped:
                _nonfinite(ctx, report, step, bad_loss, bad_samples)
        if push_after(step, n_push, total):
            if window.kept:  # a window of non-finite steps only has nothing to send
                # the shard threads send it once it is in the client's buffer (on the CPU it is
                # already); this thread goes on meanwhile
                pending[buf] = ps.push(buf, versions=window_versions,
                                       after=mirror.to_host_async(flat.grads[buf]))
                buf ^= 1
                if pending[buf] is not None:  # the other buffer's push must finish before reuse
                    report.acks(pending[buf].wait(timeout))
                    pending[buf] = None
                flat.grads[buf].zero_()
            window.begin(buf)
            window_versions = None
            if clocks is not None:  # the window's steps count once its push is applied
                for other in range(2):
                    if pending[other] is not None:
                        report.acks(pending[other].wait(timeout))
                        pending[other] = None
                clocks.tick(tick_to(step, n_push, total))
            number = gate.due() if gate is not None else None
            if number is not None:  # a checkpoint: every push of ours applied, then pause
                for other in range(2):
                    if pending[other] is not None:
                        report.acks(pending[other].wait(timeout))
                        pending[other] = None
                report.publish_buffers()  # the checkpoint keeps them as they are now
                with ctx.waiting():
                    gate.pause(number, step + 1)
        report.maybe_log(step, ps.fetched_versions)
        if step == cfg.downpour.warm_start_steps - 1 and r == 0:
            ctx.store.set_json("warm/done", True)
    for handle in pending:
        if handle is not None:
            report.acks(handle.wait(timeout))
    report.maybe_log(total - 1, ps.fetched_versions, force=True)
    return report.acked


def _nonfinite(ctx: RoleContext, report: Reporter, step: int, loss: float | None,
               samples: int) -> None:
    """A step (or worker batch) whose loss or gradient is NaN/inf, already left out of the
    push: counted (--on-nonfinite skip), or the end of the job (stop: ``job/nonfinite``
    tells the coordinator, which names the client and what was not finite)."""
    if ctx.config.train.on_nonfinite != "stop":
        report.skip_nonfinite(samples)
        return
    name = f"replica{ctx.ident}" + (f".part{ctx.part}" if ctx.part is not None else "")
    bad_loss = loss is not None and not math.isfinite(loss)
    ctx.store.set_json("job/nonfinite", {"client": name, **({"loss": str(loss)} if bad_loss
                                                            else {})})
    raise FloatingPointError(f"{name}: the {'loss' if bad_loss else 'gradient'} of step "
                             f"{step + 1} is not finite; lower --lr or check the data")


def _wait_for_warm_start(ctx: RoleContext) -> bool:
    """Block until replica 0 finishes its warm start; False if the job stops first."""
    while not ctx.store.has("warm/done"):
        if ctx.stopping():
            return False
        time.sleep(0.05)
    return True


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
