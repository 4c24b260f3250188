"""The coordinator's generic watch loop: it follows the replicas and shards of a job.

`watch_replicas` turns the replicas' events into metrics and the progress line,
evaluates the test split every ``eval_every`` steps, takes checkpoints when
they are due, and notices lost roles: a local process that exited, or a role
whose heartbeat counter stood still for `LOST_AFTER` seconds of the
coordinator's own clock (`runtime.context.Liveness`; a local one that hangs is
then killed). A role beats only while its main loop advances, so one whose
loop made no progress for ``--progress-timeout`` seconds is lost the same way,
`LOST_AFTER` later, though its process lives on (`runtime.context.Heartbeat`);
the messages then say so (``stuck/<role>/<id>``). What a lost replica means is the
algorithm's to say (`Algorithm.lost_replica`): counted, replaced with
``--restart-replicas``, or the end of the job. A lost shard is restarted from
the last checkpoint, or ends the job with `JobFailed`. Coordinator thread only.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distbelief.algorithms.base import Algorithm, Coordination, Poller, Watch
from distbelief.checkpoint import CheckpointDriver, read_manifest
from distbelief.errors import JobFailed, Tampered, UserError
from distbelief.runtime.context import Liveness, beat_key, member_name, stuck_key
from distbelief.runtime.launch import LocalCluster, log_tail
from distbelief.runtime.store import TAMPERED_KEY, JobStore, StreamReader
from distbelief.task import task_of

LOST_AFTER = 6.0  # seconds without a heartbeat before a role counts as lost (beats come every 1 s)


def start_liveness(store: JobStore, shards: int, replica_members: list[str],
                   dataservers: int) -> Liveness:
    """The coordinator's record of the job's roles' heartbeats, each expected from now.

    Call it once every role has registered: a role beats only once registered, and
    until then the registration waits (`wait_for_keys`: ``--timeout``, and locally the
    launcher's exit detection) bound its start. Thread-safe (see `Liveness`).
    """
    liveness = Liveness(lambda name: store.add(beat_key(name), 0), LOST_AFTER)
    liveness.expect(*[f"shard/{s}" for s in range(shards)],
                    *[f"replica/{m}" for m in replica_members],
                    *[f"dataserver/{d}" for d in range(dataservers)])
    return liveness


def watch_replicas(co: Coordination, algorithm: Algorithm, local: LocalCluster | None,
                   liveness: Liveness, shards: int, driver: CheckpointDriver,
                   manifest: dict | None) -> None:
    """Follow the replicas until each is done or lost; evaluate and checkpoint on the way."""
    cfg, store, watch = co.config, co.store, co.watch
    members = replica_members(cfg, range(watch.replicas))
    if manifest is not None:  # the steps each replica had done at the checkpoint
        for r in range(watch.replicas):
            watch.steps[r] = min(manifest["replica_steps"].get(m, 0)
                                 for m in replica_members(cfg, range(r, r + 1)))

    def waiting(number: int) -> list[str]:
        return [m for m in members if int(m.split(".")[0]) not in watch.lost
                and not store.has(f"ckpt/{number}/paused/{m}")
                and not store.has(f"done/replica{m}")]

    def steps_of(number: int) -> dict[str, int]:
        steps = {}
        for m in members:
            paused = store.try_get_json(f"ckpt/{number}/paused/{m}")
            done = store.try_get_json(f"done/replica{m}")
            steps[m] = (paused or done or {}).get("steps", watch.steps.get(int(m.split(".")[0]), 0))
        return steps

    def lost_shard() -> int | None:
        return next((s for s in range(shards) if is_lost(store, local, liveness, "shard", s)),
                    None)

    poller = algorithm.poller(co) or Poller()
    try:
        _watch(co, algorithm, local, liveness, shards, driver, poller, waiting, steps_of,
               lost_shard)
    finally:
        poller.close()
    _show(co, force=True)


def _watch(co: Coordination, algorithm: Algorithm, local: LocalCluster | None,
           liveness: Liveness, shards: int, driver: CheckpointDriver, poller: Poller,
           waiting, steps_of, lost_shard) -> None:
    cfg, store, watch = co.config, co.store, co.watch
    events = store.stream("events")
    next_eval = cfg.train.eval_every or None
    while not watch.finished:
        follow_events(co, events)
        # before the lost replicas: a replica that met a forged value, or stops on a NaN,
        # then exits
        check_tampering(store)
        bad = store.try_get_json("job/nonfinite")
        if bad is not None:
            raise JobFailed(f"{bad['client']} produced a non-finite "
                            f"{'loss' if 'loss' in bad else 'gradient'}"
                            f"{' (refused by shard %d)' % bad['shard'] if 'shard' in bad else ''}"
                            " and --on-nonfinite stop ends the job: lower --lr or check the "
                            "data, or use --on-nonfinite skip to drop such steps and go on")
        for r in range(watch.replicas):
            if r in watch.done or r in watch.lost:
                continue
            if _replica_done(store, cfg, r):
                watch.done.add(r)
            # done is read again: a replica may set it and exit between the two checks
            elif (is_lost(store, local, liveness, "replica", r, cfg.model.partitions)
                  and not _replica_done(store, cfg, r)):
                _lose_replica(co, algorithm, local, liveness, r)
        for s in range(shards):
            if is_lost(store, local, liveness, "shard", s):
                detail = exit_detail(local, "shard", s, store)
                lost = _restart_shard(cfg, store, local, liveness, watch, s)
                if lost is None:
                    raise JobFailed(f"parameter shard {s} {_died(detail)}{detail}; the job "
                                    "cannot continue "
                                    "without it (with --checkpoint-every it is restarted from "
                                    "its last checkpoint)")
                co.write_event({"event": "shard_lost", "time": time.time() - co.start_time,
                                **lost})
                co.message(f"parameter shard {s} was lost; restarted from checkpoint "
                           f"{lost['checkpoint']} (about {lost['updates_lost']} of its "
                           "updates lost)")
        for d in range(cfg.cluster.data_servers):
            if is_lost(store, local, liveness, "dataserver", d):
                _replace_dataserver(co, local, liveness, d)
        if watch.lost and len(watch.lost) == watch.replicas:
            raise JobFailed(f"all {watch.replicas} replicas were lost"
                            f"{exit_detail(local, 'replica', 0, store)}")
        if time.monotonic() - watch.last_event > cfg.cluster.timeout:
            raise JobFailed(f"no {algorithm.replica_noun} reported progress for "
                            f"{cfg.cluster.timeout:.0f} s")
        poller.poll(watch)
        if driver.due(watch.leading_step):
            written = driver.take(waiting, steps_of, lost_shard, poller.checkpoint_state)
            if written is not None:
                co.write_event({"event": "checkpoint", "time": time.time() - co.start_time,
                                "checkpoint": written["checkpoint"], "step": watch.leading_step})
        next_eval = maybe_evaluate(co, next_eval)
        poller.wait(0.05)
    # a replica appends its last events before it says done: those that came after this
    # loop's last read are still to be taken
    follow_events(co, events)


def _lose_replica(co: Coordination, algorithm: Algorithm, local: LocalCluster | None,
                  liveness: Liveness, r: int) -> None:
    """Replica r died: replace it, count it, or end the job, as the algorithm says."""
    cfg, store, watch = co.config, co.store, co.watch
    step = watch.steps.get(r, 0)
    stuck = no_progress(store, local, "replica", r)  # read before a replacement clears it
    why = {} if stuck is None else {"no_progress_seconds": stuck}
    note = "" if stuck is None else f" (its main loop made no progress for {stuck:g} s)"
    if _restart_replica(cfg, store, local, liveness, watch, r):
        co.write_event({"event": "replica_restarted", "time": time.time() - co.start_time,
                        "replica": r, "step": step, "restarts": watch.restarts[r], **why})
        co.message(f"replica {r} was lost at step {step}{note}; a replacement takes over")
        return
    if algorithm.lost_replica is not None:
        detail = exit_detail(local, "replica", r, store)
        raise JobFailed(f"{algorithm.replica_noun} {r} {_died(detail)} at step {step}"
                        f"{detail}; {algorithm.lost_replica}")
    watch.lost.add(r)
    if local is not None:  # one that hangs is counted out for good: it must not wake and push
        for child in local.children:
            if child.role == "replica" and child.ident == r:
                try:
                    child.process.kill()
                except ProcessLookupError:  # it ended meanwhile
                    pass
    co.write_event({"event": "replica_lost", "time": time.time() - co.start_time,
                    "replica": r, "step": step, **why})
    co.message(f"replica {r} was lost at step {step}{note}; the others go on")
    algorithm.on_replica_lost(store, r)


MAX_RESTARTS = 5  # replacements per replica: a replica that keeps dying has a real problem


def _restart_replica(cfg, store: JobStore, local: LocalCluster | None, liveness: Liveness,
                     watch: Watch, r: int) -> bool:
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
    for child in old:  # the replacement's record starts at its spawn, past the old beats
        _expect_anew(store, liveness, f"replica/{member_name(r, child.part)}")
        local.spawn("replica", r, part=child.part)
    watch.restarts[r] = generation
    return True


def _restart_shard(cfg, store: JobStore, local: LocalCluster | None, liveness: Liveness,
                   watch: Watch, s: int) -> dict | None:
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
    _expect_anew(store, liveness, f"shard/{s}")
    local.spawn("shard", s)
    lost = {"shard": s, "checkpoint": manifest["checkpoint"], "version_at_loss": at_loss,
            "restored_version": restored, "updates_lost": max(0, at_loss - restored)}
    watch.shards_lost.append(lost)
    return lost


def _expect_anew(store: JobStore, liveness: Liveness, name: str) -> None:
    """A replacement for role `name` is about to start: its beats count from now, and its
    predecessor's record of a stuck loop is not its own."""
    store.delete(stuck_key(name))
    liveness.expect(name)


def _replace_dataserver(co: Coordination, local: LocalCluster | None, liveness: Liveness,
                        d: int) -> None:
    """Start a replacement for lost data server `d` (its replicas fail over meanwhile); it
    answers requests addressed to the next generation. JobFailed when that is not allowed."""
    from distbelief.data.protocol import restart_key

    store, watch = co.store, co.watch
    detail = exit_detail(local, "dataserver", d, store)
    earlier = [x for x in watch.dataservers_lost if x["server"] == d]
    if local is None or len(earlier) >= MAX_RESTARTS:
        raise JobFailed(f"data server {d} {_died(detail)}{detail}; it could not be replaced "
                        f"({len(earlier)} replacements so far)")
    stuck = no_progress(store, local, "dataserver", d)
    local.retire("dataserver", d)
    generation = len(earlier) + 1
    store.set_json(restart_key(d), {"generation": generation})
    _expect_anew(store, liveness, f"dataserver/{d}")
    local.spawn("dataserver", d)
    lost = {"server": d, "generation": generation, "time": time.time() - co.start_time,
            **({} if stuck is None else {"no_progress_seconds": stuck})}
    watch.dataservers_lost.append(lost)
    co.write_event({"event": "dataserver_lost", **lost})
    co.message(f"data server {d} was lost{detail}; a replacement takes over")


def _show(co: Coordination, force: bool = False) -> None:
    watch = co.watch
    recent = list(watch.last.values())
    loss = sum(e["loss"] for e in recent) / len(recent) if recent else None
    running = [e for e in recent if e["replica"] not in watch.lost | watch.done]
    sps = sum(e["samples_per_second"] for e in (recent if force else running))
    stale = [e["staleness"] for e in recent if e.get("staleness") is not None]
    co.show(sum(watch.steps.values()), loss=loss, samples_per_second=sps,
            staleness=sum(stale) / len(stale) if stale else None, note=watch.note, force=force)


def parts(cfg) -> list[int | None]:
    """The partitions of each replica: [None] when replicas are not partitioned."""
    return [None] if cfg.model.partitions == 1 else list(range(cfg.model.partitions))


def replica_members(cfg, replicas: range) -> list[str]:
    """Store names of the replica processes ("0", or "0.0", "0.1", ... when partitioned)."""
    return [member_name(r, part) for r in replicas for part in parts(cfg)]


def follow_events(co: Coordination, stream: StreamReader) -> None:
    """Take the events that arrived since the last call (the coordinator is their only
    reader, so they are consumed): write them to the metrics, fold the "train" ones
    into the watch, refresh the progress line."""
    watch = co.watch
    events = stream.read()
    for event in events:
        co.write_event(event)
        watch.last_event = time.monotonic()
        if event["event"] == "train":
            watch.steps[event["replica"]] = event["step"]
            watch.last[event["replica"]] = event
            watch.samples += event["samples"]
            watch.dropped += event.get("dropped") or 0
            if event.get("nonfinite") and not watch.nonfinite:
                co.message(f"replica {event['replica']}: a NaN/inf loss or gradient "
                           "was skipped (--on-nonfinite skip); lower --lr if this repeats")
            watch.nonfinite += event.get("nonfinite") or 0
    if events:
        _show(co)


def maybe_evaluate(co: Coordination, next_eval: int | None) -> int | None:
    """Evaluate once the leading replica reached `next_eval` (None: only at the end);
    returns the step of the next evaluation."""
    watch, every = co.watch, co.config.train.eval_every
    if next_eval is None or watch.leading_step < next_eval:
        return next_eval
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training roles go on meanwhile: take one core, not all
    try:
        metrics = co.evaluate()
    finally:
        torch.set_num_threads(threads)
    task = task_of(co.config)
    co.write_event({"event": "eval", "time": time.time() - co.start_time,
                    "step": watch.leading_step, **task.fields(metrics, f"{co.watched}_")})
    co.message(f"step {watch.leading_step}: {task.describe(metrics, co.watched)}")
    while next_eval <= watch.leading_step:
        next_eval += every
    return next_eval


def _replica_done(store: JobStore, cfg, r: int) -> bool:
    return all(store.has(f"done/replica{m}") for m in replica_members(cfg, range(r, r + 1)))


def is_lost(store: JobStore, local: LocalCluster | None, liveness: Liveness, role: str,
            ident: int, partitions: int = 1) -> bool:
    """A role process (any partition of a replica) exited, or its heartbeat counter stood
    still for `LOST_AFTER` seconds of this process's clock (it hangs, or its main loop made
    no progress for --progress-timeout, and the heartbeat stopped). Thread-safe as far as
    the store and `liveness` go (Sandblaster's watchdog asks from a thread of its own)."""

    def finished(member: str) -> bool:  # a partition that finished may end before its siblings
        return role == "replica" and store.has(f"done/replica{member}")

    if local is not None:
        if any(c.process.poll() is not None and not finished(member_name(ident, c.part))
               for c in local.children if c.role == role and c.ident == ident):
            return True
    names = [str(ident)] if partitions == 1 else [f"{ident}.{k}" for k in range(partitions)]
    return any(liveness.lost(f"{role}/{n}") and not finished(n) for n in names)


def exit_detail(local: LocalCluster | None, role: str, ident: int,
                store: JobStore | None = None) -> str:
    """Why role `ident` counts as lost, in parentheses: its exit code and log, or that it made
    no progress (its heartbeat's ``stuck`` record, read from `store` when given), or that it
    was silent."""
    silent = f"no heartbeat for {LOST_AFTER:.0f} s"
    seconds = no_progress(store, local, role, ident) if store is not None else None
    if seconds is not None:
        silent = (f"its main loop made no progress for {seconds:g} s though its process "
                  "lives: see --progress-timeout")
    if local is None:
        return f" ({silent})"
    mine = [c for c in local.children if c.role == role and c.ident == ident]
    for child in mine:
        if child.process.returncode is not None:
            tail = log_tail(child.log_path)
            which = f"partition {child.part}, " if child.part is not None else ""
            return (f" ({which}pid {child.pid}, exit code {child.process.returncode}"
                    f"{'; log: ' + tail if tail else ''}; full log: {child.log_path})")
    if mine:  # running but silent: it hangs
        return f" (pid {mine[0].pid}, {silent}; full log: {mine[0].log_path})"
    return ""


def _died(detail: str) -> str:
    """The verb for a lost role: one whose loop made no progress did not die."""
    return "was lost" if "made no progress" in detail else "died"


def no_progress(store: JobStore, local: LocalCluster | None, role: str,
                ident: int) -> float | None:
    """The --progress-timeout that role `ident` (any partition of it) reported it passed
    without progress (its heartbeat then stopped); None when it did not."""
    members = {str(ident)}
    if local is not None:
        members |= {member_name(ident, c.part) for c in local.children
                    if c.role == role and c.ident == ident}
    for m in sorted(members):
        stuck = store.try_get_json(stuck_key(f"{role}/{m}"))
        if stuck is not None:
            return float(stuck["seconds"])
    return None


def check_tampering(store: JobStore) -> None:
    """`Tampered`, naming the role and the value, when a role met a forged or replayed
    value in the store (`SealedStore` reports it under TAMPERED_KEY)."""
    tampered = store.try_get_json(TAMPERED_KEY)
    if tampered is not None:
        raise Tampered(f"{tampered['role']} stopped: {tampered['what']}; check who can reach "
                       "the job's store port")


def wait_for_keys(store: JobStore, keys: list[str], local: LocalCluster | None, timeout: float,
                  what: str) -> None:
    """Block until every key is set; JobFailed if a local child exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while not all(store.has(k) for k in keys):
        check_tampering(store)
        if local is not None:
            for child in local.exited():
                raise JobFailed(f"{child.role} {child.ident} exited while waiting for {what}"
                                f"{exit_detail(local, child.role, child.ident)}")
        if time.monotonic() > deadline:
            raise JobFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
