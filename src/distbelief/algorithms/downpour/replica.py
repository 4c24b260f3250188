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
between fetches (Project Adam; `algorithms/replica_workers.py`).

Reports to the coordinator through the store stream ``events``: a "train" event
every `log_every` steps (`metrics.report.Reporter`); sets ``done/replica<r>`` at the end.
"""

from __future__ import annotations

import contextlib
import time

import torch

from distbelief.algorithms.downpour.workers import ReplicaWorkers
from distbelief.algorithms.schedule import fetch_before, push_after
from distbelief.algorithms.slowdown import Slowdown
from distbelief.checkpoint import ReplicaGate
from distbelief.data.feed import open_feed, replica_data_and_model
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.model.partition import PartitionPlan, open_partition
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.context import RoleContext


def run_replica(ctx: RoleContext) -> None:
    cfg, r = ctx.config, ctx.ident
    processes = cfg.cluster.replicas * cfg.model.partitions
    # each of a replica's worker threads computes on its own share of the cores
    processes *= cfg.downpour.replica_workers
    torch.set_num_threads(cfg.cluster.threads_per_process(processes))
    data, model = replica_data_and_model(ctx)  # data None: data servers read it
    plan = PartitionPlan.from_json(ctx.job["partition"])
    part = ctx.part or 0
    module = plan.part_module(model, part)
    del model  # a partition keeps only its own layers
    total = ctx.job["steps"]  # steps_per_replica, computed by the coordinator
    threads = cfg.downpour.replica_workers  # a step takes one batch per worker thread
    resume = ctx.job.get("resume")
    restart = ctx.store.try_get_json(f"restart/replica{r}")  # a replacement for a lost one
    start = resume["replica_steps"].get(ctx.member, 0) if resume else 0
    if restart is not None:
        start = max(start, restart["start"])
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
                      timeout=cfg.cluster.timeout) as ps, \
                open_partition(plan, module, part, store=peers.raw,
                               name=f"replica{r}.g{restart['generation'] if restart else 0}",
                               timeout=cfg.cluster.timeout) as runner, \
                open_feed(ctx, data, start * threads, total * threads) as feed:  # batches, from
            # the checkpoint's data position
            if runner.reports_loss:
                ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                            "replica": r})
            for grad in ps.grad_buffers:
                grad.zero_()
            flat = FlatModel(module, grads=ps.grad_buffers)  # backward() writes where shards read
            acked = _train(ctx, ps, flat, runner, feed, start, total)
            boundary_bytes = runner.bytes_sent
            data_stats = feed.stats()
    finally:
        peers.close()
    if r == 0:  # a warm start longer than the run must not leave the others waiting
        ctx.store.set_json("warm/done", True)
    ctx.store.set_json(f"done/replica{ctx.member}", {"steps": total, "acked": acked,
                                                     "boundary_bytes": boundary_bytes,
                                                     **data_stats})


def _train(ctx: RoleContext, ps: PSClient, flat: FlatModel, runner, feed, start: int,
           total: int) -> int:
    """Train steps start..total-1; returns how many pushes the shards acknowledged."""
    cfg, r = ctx.config, ctx.ident
    gate = (ReplicaGate(ctx.store, ctx.member, cfg.cluster.timeout)
            if cfg.train.checkpoint_every is not None else None)
    report = Reporter.for_role(ctx, total, enabled=runner.reports_loss)
    slow = Slowdown.for_worker(cfg, r)
    threads = cfg.downpour.replica_workers
    with contextlib.ExitStack() as stack:
        workers = (stack.enter_context(ReplicaWorkers(flat, threads, cfg.optimizer.lr,
                                                      cfg.cluster.timeout))
                   if threads > 1 else None)
        return _steps(ctx, ps, flat, runner, feed, start, total, gate, report, slow, workers)


def _steps(ctx: RoleContext, ps: PSClient, flat: FlatModel, runner, feed,
           start: int, total: int, gate, report: Reporter, slow: Slowdown,
           workers: ReplicaWorkers | None) -> int:
    """The step loop of `_train`; `workers`: the replica's threads (None: T = 1)."""
    cfg, r = ctx.config, ctx.ident
    n_fetch, n_push, timeout = cfg.downpour.n_fetch, cfg.downpour.n_push, cfg.cluster.timeout
    pending = [None, None]  # the push handle still reading each gradient buffer
    buf = 0
    window_versions = None
    for step in range(start, total):
        if fetch_before(step, n_fetch) or step == start:  # a resumed replica fetches first
            ps.pull(flat.params).wait(timeout)
        if window_versions is None:  # the versions this push window's gradients are computed on
            window_versions = list(ps.fetched_versions)
        if workers is None:
            xb, yb = feed.next()
            with slow.compute():
                loss = runner.train_step(xb, yb)
            samples = len(yb)
        else:  # T batches, the gradients summed into the push buffer
            with slow.compute():
                loss, samples = workers.step(feed, flat.grads[buf])
        report.step(loss, samples)
        if push_after(step, n_push, total):
            runner.flush()  # a pipeline stage may still owe the window's weight gradients
            pending[buf] = ps.push(buf, versions=window_versions)
            window_versions = None
            buf ^= 1
            if pending[buf] is not None:  # the other buffer's push must finish before reuse
                report.acks(pending[buf].wait(timeout))
                pending[buf] = None
            flat.grads[buf].zero_()
            flat.bind_grads(buf)
            number = gate.due() if gate is not None else None
            if number is not None:  # a checkpoint: every push of ours applied, then pause
                for other in range(2):
                    if pending[other] is not None:
                        report.acks(pending[other].wait(timeout))
                        pending[other] = None
                gate.pause(number, step + 1)
        report.maybe_log(step, ps.fetched_versions)
        if step == cfg.downpour.warm_start_steps - 1 and r == 0:
            ctx.store.set_json("warm/done", True)
    for handle in pending:
        if handle is not None:
            report.acks(handle.wait(timeout))
    report.maybe_log(total - 1, ps.fetched_versions, force=True)
    return report.acked


def _wait_for_warm_start(ctx: RoleContext) -> bool:
    """Block until replica 0 finishes its warm start; False if the job stops first."""
    while not ctx.store.has("warm/done"):
        if ctx.stopping():
            return False
        time.sleep(0.05)
    return True


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
