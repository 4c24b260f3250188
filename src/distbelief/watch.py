"""The coordinator's view of a running job: it follows the replicas and shards.

`watch_replicas` turns the replicas' events into metrics and the progress line,
evaluates the test split every ``eval_every`` steps, takes checkpoints when
they are due, and notices lost roles (a local process that exited, or a
heartbeat older than `LOST_AFTER` seconds). A lost replica is counted, or
replaced with ``--restart-replicas``; a lost shard is restarted from the last
checkpoint, or ends the job with `JobFailed`. `drive_sandblaster` runs
Sandblaster L-BFGS with the replicas as its workers. Coordinator thread only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch

from distbelief.checkpoint import CheckpointDriver, read_manifest
from distbelief.config import JobConfig
from distbelief.errors import JobFailed, UserError
from distbelief.metrics.log import MetricsLog, Progress
from distbelief.model.evaluate import evaluate
from distbelief.model.flat import load_flat
from distbelief.ps.client import PSClient
from distbelief.runtime.launch import LocalCluster, log_tail
from distbelief.runtime.role import member_name
from distbelief.runtime.store import JobStore

LOST_AFTER = 6.0  # seconds without a heartbeat before a role counts as lost (beats come every 1 s)


@dataclass
class Watch:
    """What the coordinator knows about the replicas while it watches them."""

    replicas: int
    done: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    steps: dict[int, int] = field(default_factory=dict)
    last: dict[int, dict] = field(default_factory=dict)
    samples: int = 0
    dropped: int = 0  # late gradients a synchronous step did not wait for
    restarts: dict[int, int] = field(default_factory=dict)  # replacements started, by replica
    shards_lost: list[dict] = field(default_factory=list)  # shards restarted from a checkpoint
    dataservers_lost: list[dict] = field(default_factory=list)  # data servers replaced
    nonfinite: int = 0  # NaN/inf losses or steps the replicas reported
    last_event: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)  # the algorithm's own statistics

    @property
    def finished(self) -> bool:
        return len(self.done | self.lost) == self.replicas

    @property
    def leading_step(self) -> int:
        return max(self.steps.values(), default=0)


def watch_replicas(cfg: JobConfig, store: JobStore, local: LocalCluster | None, metrics: MetricsLog,
           progress: Progress, ps: PSClient, model, data, start_time: float,
           perm: torch.Tensor | None, driver: CheckpointDriver, manifest: dict | None) -> Watch:
    """Follow the replicas until each is done or lost; evaluate and checkpoint on the way."""
    watch = Watch(cfg.cluster.replicas)
    if manifest is not None:  # the steps each replica had done at the checkpoint
        for r in range(cfg.cluster.replicas):
            watch.steps[r] = min(manifest["replica_steps"].get(m, 0)
                                 for m in replica_members(cfg, range(r, r + 1)))

    def waiting(number: int) -> list[str]:
        return [m for m in replica_members(cfg) if int(m.split(".")[0]) not in watch.lost
                and not store.has(f"ckpt/{number}/paused/{m}")
                and not store.has(f"done/replica{m}")]

    def steps_of(number: int) -> dict[str, int]:
        steps = {}
        for m in replica_members(cfg):
            paused = store.try_get_json(f"ckpt/{number}/paused/{m}")
            done = store.try_get_json(f"done/replica{m}")
            steps[m] = (paused or done or {}).get("steps", watch.steps.get(int(m.split(".")[0]), 0))
        return steps
    read = trimmed = 0
    next_eval = cfg.train.eval_every or None
    while not watch.finished:
        read = follow_events(store, read, watch, metrics, progress)
        for r in range(cfg.cluster.replicas):
            if r in watch.done or r in watch.lost:
                continue
            if _replica_done(store, cfg, r):
                watch.done.add(r)
            # done is read again: a replica may set it and exit between the two checks
            elif (_is_lost(store, local, "replica", r, cfg.model.partitions)
                  and not _replica_done(store, cfg, r)):
                if _restart_replica(cfg, store, local, watch, r):
                    metrics.write({"event": "replica_restarted", "time": time.time() - start_time,
                                   "replica": r, "step": watch.steps.get(r, 0),
                                   "restarts": watch.restarts[r]})
                    progress.message(f"replica {r} was lost at step {watch.steps.get(r, 0)}; "
                                     "a replacement takes over")
                    continue
                watch.lost.add(r)
                metrics.write({"event": "replica_lost", "time": time.time() - start_time,
                               "replica": r, "step": watch.steps.get(r, 0)})
                progress.message(f"replica {r} was lost at step {watch.steps.get(r, 0)}; "
                                 "the others go on")
                if cfg.algorithm == "sync":
                    raise JobFailed(f"replica {r} died{_exit_detail(local, 'replica', r)}; "
                                    "synchronous training cannot go on without it")
                if r == 0 and not store.has("warm/done"):
                    store.set_json("warm/done", True)  # do not leave the others waiting
        bad = store.try_get_json("job/nonfinite")
        if bad is not None:
            raise JobFailed(f"{bad['client']} produced a non-finite "
                            f"{'loss' if 'loss' in bad else 'gradient'}"
                            f"{' (refused by shard %d)' % bad['shard'] if 'shard' in bad else ''}"
                            " and --on-nonfinite stop ends the job: lower --lr or check the "
                            "data, or use --on-nonfinite skip to drop such steps and go on")
        for s in range(cfg.cluster.shards):
            if _is_lost(store, local, "shard", s):
                detail = _exit_detail(local, "shard", s)
                lost = _restart_shard(cfg, store, local, watch, s)
                if lost is None:
                    raise JobFailed(f"parameter shard {s} died{detail}; the job cannot continue "
                                    "without it (with --checkpoint-every it is restarted from "
                                    "its last checkpoint)")
                metrics.write({"event": "shard_lost", "time": time.time() - start_time, **lost})
                progress.message(f"parameter shard {s} was lost; restarted from checkpoint "
                                 f"{lost['checkpoint']} (about {lost['updates_lost']} of its "
                                 "updates lost)")
        for d in range(cfg.cluster.data_servers):
            if _is_lost(store, local, "dataserver", d):
                _replace_dataserver(store, local, watch, d, metrics, progress, start_time)
        if watch.lost and len(watch.lost) == cfg.cluster.replicas:
            raise JobFailed(f"all {cfg.cluster.replicas} replicas were lost"
                            f"{_exit_detail(local, 'replica', 0)}")
        if time.monotonic() - watch.last_event > cfg.cluster.timeout:
            raise JobFailed(f"no replica reported progress for {cfg.cluster.timeout:.0f} s")
        if cfg.algorithm == "sync":
            trimmed = _trim_sync_keys(store, watch, cfg.cluster.replicas, trimmed)
        if driver.due(watch.leading_step):
            written = driver.take(waiting, steps_of, lambda: next(
                (s for s in range(cfg.cluster.shards) if _is_lost(store, local, "shard", s)), None))
            if written is not None:
                metrics.write({"event": "checkpoint", "time": time.time() - start_time,
                               "checkpoint": written["checkpoint"], "step": watch.leading_step})
        next_eval = maybe_evaluate(
            next_eval, cfg.train.eval_every, watch, metrics, progress, start_time,
            lambda: evaluate_current(ps, model, data, cfg.cluster.timeout, perm))
        time.sleep(0.05)
    # a replica appends its last events before it says done: those that came after this
    # loop's last read are still to be taken
    follow_events(store, read, watch, metrics, progress)
    _show(progress, watch, force=True)
    return watch


def drive_sandblaster(cfg: JobConfig, store: JobStore, local: LocalCluster | None,
                       metrics: MetricsLog, progress: Progress, ps: PSClient, model, data,
                       start_time: float) -> Watch:
    """Run Sandblaster L-BFGS from here; the replicas are its workers."""
    from distbelief.algorithms.sandblaster import SandblasterFailed, SandblasterJob, drive

    watch = Watch(cfg.cluster.replicas)

    def show(iterations: int, loss: float, samples_per_second: float) -> None:
        watch.steps[0] = iterations
        watch.last[0] = {"loss": loss}
        progress.update(iterations, loss=loss, samples_per_second=samples_per_second,
                        staleness=None)

    def on_iteration(k: int) -> None:
        if cfg.train.eval_every and k % cfg.train.eval_every == 0:
            loss, acc = evaluate_current(ps, model, data, cfg.cluster.timeout)
            metrics.write({"event": "eval", "time": time.time() - start_time, "step": k,
                           "test_loss": loss, "test_accuracy": acc})
            progress.message(f"iteration {k}: test accuracy {acc:.4f}")

    def write_event(event: dict) -> None:
        metrics.write(event)
        if event["event"] == "train":
            watch.samples += event["samples"]
        elif event["event"] == "replica_lost":
            watch.lost.add(event["replica"])
            progress.message(f"worker {event['replica']} was lost; its portions are handed "
                             "out again")

    job = SandblasterJob(store=store, config=cfg, ps=ps, write_event=write_event, show=show,
                         is_lost=lambda w: _is_lost(store, local, "replica", w),
                         on_iteration=on_iteration, start_time=start_time)
    try:
        watch.extra = drive(job)
    except SandblasterFailed as exc:
        raise JobFailed(f"{exc}{_exit_detail(local, 'replica', min(watch.lost, default=0))}"
                        ) from None
    if watch.extra["converged"]:
        progress.message(f"L-BFGS converged ({watch.extra['converged']}) after "
                         f"{watch.extra['iterations']} iterations")
    return watch


MAX_RESTARTS = 5  # replacements per replica: a replica that keeps dying has a real problem


def _restart_replica(cfg: JobConfig, store: JobStore, local: LocalCluster | None, watch: Watch,
                     r: int) -> bool:
    """Start a replacement for lost replica `r` (all its partitions); False when not allowed.

    The replacement reads ``restart/replica<r>``: its generation (fresh channel names)
    and the step to go on from (the lost one's last reported step).
    """
    if not cfg.cluster.restart_replicas or local is None:
        return False
    if watch.restarts.get(r, 0) >= MAX_RESTARTS:
        return False
    old = local.retire("replica", r)  # partitions of it that are still running go too
    generation = watch.restarts.get(r, 0) + 1
    store.set_json(f"restart/replica{r}", {"generation": generation,
                                           "start": watch.steps.get(r, 0)})
    for child in old:
        store.set_json(f"heartbeat/replica/{member_name(r, child.part)}", time.time())
        local.spawn("replica", r, part=child.part)
    watch.restarts[r] = generation
    return True


def _restart_shard(cfg: JobConfig, store: JobStore, local: LocalCluster | None, watch: Watch,
                   s: int) -> dict | None:
    """Start a replacement for lost shard `s` from the last checkpoint; what was lost, or
    None when there is no checkpoint (or no local launcher, or too many restarts)."""
    if local is None or len([x for x in watch.shards_lost if x["shard"] == s]) >= MAX_RESTARTS:
        return None
    run_dir = Path(store.get_json("job")["run_dir"])
    try:
        manifest = read_manifest(run_dir)
    except UserError:
        return None
    local.retire("shard", s)
    at_loss = store.try_get_json(f"version/shard{s}") or 0
    restored = manifest["shards"][s]["version"]
    generation = 1 + len([x for x in watch.shards_lost if x["shard"] == s])
    store.set_json(f"restart/shard{s}", {"generation": generation})
    local.spawn("shard", s)
    lost = {"shard": s, "checkpoint": manifest["checkpoint"], "version_at_loss": at_loss,
            "restored_version": restored, "updates_lost": max(0, at_loss - restored)}
    watch.shards_lost.append(lost)
    return lost


def _replace_dataserver(store: JobStore, local: LocalCluster | None, watch: Watch, d: int,
                        metrics: MetricsLog, progress: Progress, start_time: float) -> None:
    """Start a replacement for lost data server `d` (its replicas fail over meanwhile); it
    answers requests addressed to the next generation. JobFailed when that is not allowed."""
    from distbelief.data.protocol import restart_key

    detail = _exit_detail(local, "dataserver", d)
    earlier = [x for x in watch.dataservers_lost if x["server"] == d]
    if local is None or len(earlier) >= MAX_RESTARTS:
        raise JobFailed(f"data server {d} died{detail}; it could not be replaced "
                        f"({len(earlier)} replacements so far)")
    local.retire("dataserver", d)
    generation = len(earlier) + 1
    store.set_json(restart_key(d), {"generation": generation})
    local.spawn("dataserver", d)
    lost = {"server": d, "generation": generation, "time": time.time() - start_time}
    watch.dataservers_lost.append(lost)
    metrics.write({"event": "dataserver_lost", **lost})
    progress.message(f"data server {d} was lost{detail}; a replacement takes over")


def evaluate_current(ps: PSClient, model, data, timeout: float,
                      perm: torch.Tensor | None = None) -> tuple[float, float]:
    """Pull the shards' current parameters into `model`; (test loss, accuracy) on all of it.

    `perm`: where each shard position sits in the whole model's parameters (units split)."""
    current = torch.empty(ps.layout.numel)
    ps.pull(current).wait(timeout)
    if perm is not None:
        whole = torch.empty_like(current)
        whole[perm] = current
        current = whole
    load_flat(model, current)
    return evaluate(model, data.x_test, data.y_test)


def _show(progress: Progress, watch: Watch, force: bool = False) -> None:
    recent = list(watch.last.values())
    loss = sum(e["loss"] for e in recent) / len(recent) if recent else None
    running = [e for e in recent if e["replica"] not in watch.lost | watch.done]
    sps = sum(e["samples_per_second"] for e in (recent if force else running))
    stale = [e["staleness"] for e in recent if e.get("staleness") is not None]
    progress.update(sum(watch.steps.values()), loss=loss, samples_per_second=sps,
                    staleness=sum(stale) / len(stale) if stale else None, force=force)


def parts(cfg: JobConfig) -> list[int | None]:
    """The partitions of each replica: [None] when replicas are not partitioned."""
    return [None] if cfg.model.partitions == 1 else list(range(cfg.model.partitions))


def replica_members(cfg: JobConfig, replicas: range | None = None) -> list[str]:
    """Store names of the replica processes ("0", or "0.0", "0.1", ... when partitioned)."""
    return [member_name(r, part) for r in (replicas or range(cfg.cluster.replicas))
            for part in parts(cfg)]


def follow_events(store: JobStore, read: int, watch: Watch, metrics: MetricsLog,
                  progress: Progress) -> int:
    """Take the events that arrived since index `read` (the coordinator is their only
    reader, so they are consumed): write them to the metrics, fold the "train" ones
    into `watch`, refresh the progress line. Returns the next index to read."""
    events = store.read_stream("events", read, consume=True)
    for event in events:
        metrics.write(event)
        watch.last_event = time.monotonic()
        if event["event"] == "train":
            watch.steps[event["replica"]] = event["step"]
            watch.last[event["replica"]] = event
            watch.samples += event["samples"]
            watch.dropped += event.get("dropped") or 0
            if event.get("nonfinite") and not watch.nonfinite:
                progress.message(f"replica {event['replica']}: a NaN/inf loss or gradient "
                                 "was skipped (--on-nonfinite skip); lower --lr if this "
                                 "repeats")
            watch.nonfinite += event.get("nonfinite") or 0
    if events:
        _show(progress, watch)
    return read + len(events)


def maybe_evaluate(next_eval: int | None, every: int, watch: Watch, metrics: MetricsLog,
                   progress: Progress, start_time: float,
                   evaluate_now: Callable[[], tuple[float, float]]) -> int | None:
    """Evaluate once the leading replica reached `next_eval` (None: only at the end);
    returns the step of the next evaluation."""
    if next_eval is None or watch.leading_step < next_eval:
        return next_eval
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training roles go on meanwhile: take one core, not all
    try:
        loss, acc = evaluate_now()
    finally:
        torch.set_num_threads(threads)
    metrics.write({"event": "eval", "time": time.time() - start_time,
                   "step": watch.leading_step, "test_loss": loss, "test_accuracy": acc})
    progress.message(f"step {watch.leading_step}: test accuracy {acc:.4f}")
    while next_eval <= watch.leading_step:
        next_eval += every
    return next_eval


def _trim_sync_keys(store: JobStore, watch: Watch, replicas: int, trimmed: int) -> int:
    """Delete the quorum keys of steps every replica is past; returns the first step kept.

    A replica that reported step X may still be finishing its gradient of step
    X - 1 (one it was dropped from), which counts itself in at
    ``sync/<X-1>/arrived``; no replica touches a step below the slowest one's
    report minus 1, so those keys go.
    """
    if len(watch.steps) < replicas:
        return trimmed
    below = min(watch.steps.values()) - 2
    for step in range(trimmed, below):
        store.delete(f"sync/{step}/arrived", f"sync/{step}/quorum")
    return max(trimmed, below)


def _replica_done(store: JobStore, cfg: JobConfig, r: int) -> bool:
    return all(store.has(f"done/replica{m}") for m in replica_members(cfg, range(r, r + 1)))


def _is_lost(store: JobStore, local: LocalCluster | None, role: str, ident: int,
             partitions: int = 1) -> bool:
    """A role process (any partition of a replica) exited or stopped beating."""
    if local is not None:
        mine = [c for c in local.children if c.role == role and c.ident == ident]
        if mine:  # a partition that finished its steps may exit before its siblings
            return any(c.process.poll() is not None and not (
                role == "replica" and store.has(f"done/replica{member_name(ident, c.part)}"))
                for c in mine)
    names = [str(ident)] if partitions == 1 else [f"{ident}.{k}" for k in range(partitions)]
    beats = [store.try_get_json(f"heartbeat/{role}/{n}") for n in names]
    return any(b is not None and time.time() - b > LOST_AFTER for b in beats)


def _exit_detail(local: LocalCluster | None, role: str, ident: int) -> str:
    if local is None:
        return f" (no heartbeat for {LOST_AFTER:.0f} s)"
    for child in local.children:
        if child.role == role and child.ident == ident and child.process.returncode is not None:
            tail = log_tail(child.log_path)
            which = f"partition {child.part}, " if child.part is not None else ""
            return (f" ({which}pid {child.pid}, exit code {child.process.returncode}"
                    f"{'; log: ' + tail if tail else ''}; full log: {child.log_path})")
    return ""


def wait_for_keys(store: JobStore, keys: list[str], local: LocalCluster | None, cfg: JobConfig,
                  what: str) -> None:
    """Block until every key is set; JobFailed if a local child exits first or on timeout."""
    deadline = time.monotonic() + cfg.cluster.timeout
    while not all(store.has(k) for k in keys):
        if local is not None:
            for child in local.exited():
                raise JobFailed(f"{child.role} {child.ident} exited while waiting for {what}"
                                f"{_exit_detail(local, child.role, child.ident)}")
        if time.monotonic() > deadline:
            raise JobFailed(f"timed out after {cfg.cluster.timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
