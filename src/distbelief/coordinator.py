"""The coordinator: runs one job from its config to its summary.

It hosts the job store, checks the data and model up front (so user errors
surface before any process starts), starts the shards, writes the initial
parameters into them, starts the replicas, then watches: it turns the
replicas' events into ``metrics.jsonl`` and the progress line, evaluates the
test split every ``eval_every`` steps, and notices lost replicas (process exit
or a heartbeat older than `LOST_AFTER` seconds). A lost replica is counted and
the job goes on; a lost shard ends the job with `JobFailed`. At the end it
pulls the final parameters, evaluates them, and writes the checkpoint,
``summary.json`` and ``curves.png``. Every child is reaped on the way out.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distbelief.algorithms.schedule import steps_per_replica
from distbelief.checkpoint import CheckpointDriver, read_manifest
from distbelief.config import JobConfig
from distbelief.errors import UserError
from distbelief.metrics.log import MetricsLog, Progress
from distbelief.model.evaluate import evaluate
from distbelief.model.flat import flatten_parameters, load_flat
from distbelief.model.partition import plan_partitions
from distbelief.model.zoo import check_model, load_data_and_model
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.channel import remove_job_files
from distbelief.runtime.launch import EnvRole, LocalCluster, log_tail
from distbelief.runtime.role import member_name
from distbelief.runtime.store import JobStore, new_token

LOST_AFTER = 10.0  # seconds without a heartbeat before a role counts as lost
CHECKPOINT = "model.pt"


class JobFailed(RuntimeError):
    """The job could not finish (a shard died, nothing progressed, every replica was lost)."""


@dataclass
class _Watch:
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
    nonfinite: int = 0  # NaN/inf losses or steps the replicas reported
    last_event: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)  # the algorithm's own statistics

    @property
    def finished(self) -> bool:
        return len(self.done | self.lost) == self.replicas

    @property
    def leading_step(self) -> int:
        return max(self.steps.values(), default=0)


def run_job(cfg: JobConfig, *, show_progress: bool = True, env: EnvRole | None = None,
            resume: str | Path | None = None) -> dict:
    """Run a whole job and return its summary. Blocks until the job ends.

    `resume`: a run directory whose last complete checkpoint the job continues from
    (`cfg` is then that run's config). Raises UserError for bad input and JobFailed
    when the job cannot finish.
    """
    cfg = cfg.validate().resolved()
    manifest = None
    if resume is not None:
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
    else:
        run_dir = _choose_run_dir(cfg)
    data, model = load_data_and_model(cfg)
    check_model(model, data.input_shape, data.num_classes)
    m = cfg.model
    plan = plan_partitions(model, partitions=m.partitions, split=m.split, balance=m.balance,
                           micro_batches=m.micro_batches,
                           sample=data.x_train[: cfg.data.batch_size])
    perm = plan.permutation(model)  # shard order -> the whole model's parameter order
    initial = flatten_parameters(model)
    if perm is not None:
        initial = initial[perm]
    if plan.partitions > 1:
        layout, groups = Layout.by_partition(plan.part_numels(model), cfg.cluster.shards)
    else:
        layout, groups = Layout.balanced(initial.numel(), cfg.cluster.shards), None
    steps = steps_per_replica(steps=cfg.train.steps, epochs=cfg.train.resolved_epochs,
                              train_samples=len(data.x_train), replicas=cfg.cluster.replicas,
                              batch_size=cfg.data.batch_size)
    if env is None:
        host, port = cfg.cluster.host, cfg.cluster.port
        store = JobStore.host(host, port, new_token(), timeout=cfg.cluster.timeout)
    elif env.agent_store:  # torchrun's agent already hosts a store at MASTER_ADDR:MASTER_PORT
        host, port = env.master_addr, env.master_port
        store = JobStore.connect(host, port, env.token, timeout=cfg.cluster.timeout)
    else:
        host, port = "0.0.0.0", env.master_port
        store = JobStore.host(host, port, env.token, timeout=cfg.cluster.timeout)
    try:
        _create_run_dir(run_dir)  # only once the data, model and port are known to be good
    except BaseException:
        store.close()
        raise
    if manifest is None:
        (run_dir / "config.toml").write_text(cfg.to_toml())
    job = {"config": cfg.to_dict(), "layout": layout.to_json(), "start_time": time.time(),
           "steps": steps, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
           "partition": {**plan.to_json(), "shards": groups},
           "run_dir": str(run_dir.resolve()), "resume": manifest}
    store.set_json("job", job)
    sandblaster = cfg.algorithm == "sandblaster"
    progress = Progress(steps if sandblaster else steps * cfg.cluster.replicas,
                        enabled=show_progress)
    ps = None
    loopback = _loopback_env(host)
    saved_env = {k: os.environ.get(k) for k in loopback}
    os.environ.update(loopback)  # the coordinator's own channels too
    try:
        with LocalCluster(run_dir / "logs", role_env(store, cfg)) as cluster, \
                MetricsLog(run_dir / "metrics.jsonl") as metrics, progress:
            local = cluster if env is None else None
            if local:  # all at once: their start-up (imports, data) overlaps
                for s in range(cfg.cluster.shards):
                    local.spawn("shard", s)
                for r in range(cfg.cluster.replicas):
                    for part in _parts(cfg):
                        local.spawn("replica", r, part=part)
            wait_for_keys(store, [f"shard{s}/up" for s in range(cfg.cluster.shards)], local,
                          cfg, "the parameter shards to start")
            ps = PSClient(store, layout, "coordinator", transport=cfg.cluster.transport,
                          timeout=cfg.cluster.timeout, grad_buffers=0)
            if manifest is None:  # a resumed job's shards loaded their checkpoint
                ps.set(initial).wait(cfg.cluster.timeout)
            store.set_json("job/ready", True)
            wait_for_keys(store, [f"members/replica/{m}" for m in _members(cfg)],
                          local, cfg, "the replicas to start")
            _write_cluster(run_dir, store, cfg, host)
            if sandblaster:
                watch = _drive_sandblaster(cfg, store, local, metrics, progress, ps, model,
                                           data, job["start_time"])
            else:
                driver = CheckpointDriver(
                    store, run_dir, cfg.train.checkpoint_every, cfg.cluster.shards,
                    cfg.cluster.timeout, start=manifest["checkpoint"] if manifest else 0,
                    meta={"layout": layout.to_json(), "steps": steps},
                    message=progress.message)
                watch = _watch(cfg, store, local, metrics, progress, ps, model, data,
                               job["start_time"], perm, driver, manifest)
            test_loss, test_acc = _evaluate_current(ps, model, data, cfg.cluster.timeout, perm)
            metrics.write({"event": "eval", "time": time.time() - job["start_time"],
                           "step": watch.leading_step, "test_loss": test_loss,
                           "test_accuracy": test_acc, "final": True})
            torch.save(model.state_dict(), run_dir / CHECKPOINT)
            ps.close()
            ps = None
            store.set_json("job/stop", True)
            shard_stats = _collect_shard_stats(store, cfg.cluster.shards)
            exit_codes = {}
            if local:
                local.wait_exit("shard", 10)
                local.wait_exit("replica", 10)  # their interpreters may take a moment to end
                exit_codes = {c.log_path.stem: c.process.poll() for c in local.children}
        summary = _summary(cfg, job, watch, steps, test_loss, test_acc, shard_stats, layout,
                           run_dir, data, exit_codes)
        done = [d if isinstance(d, dict) else {}  # a Sandblaster worker's is just True
                for d in (store.try_get_json(f"done/replica{m}") for m in _members(cfg))]
        summary["pushes_acked"] = sum(d.get("acked", 0) for d in done)
        if plan.partitions > 1:
            summary["partition"] = {**job["partition"],
                                    "shard_clients": [s.get("clients") for s in shard_stats],
                                    "boundary_bytes": sum(d.get("boundary_bytes", 0)
                                                          for d in done)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from distbelief.metrics.plot import plot_run
        plot_run(run_dir)
        return summary
    finally:
        if ps is not None:
            ps._shutdown()
        remove_job_files(store.token)
        store.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _watch(cfg: JobConfig, store: JobStore, local: LocalCluster | None, metrics: MetricsLog,
           progress: Progress, ps: PSClient, model, data, start_time: float,
           perm: torch.Tensor | None, driver: CheckpointDriver, manifest: dict | None) -> _Watch:
    """Follow the replicas until each is done or lost; evaluate and checkpoint on the way."""
    watch = _Watch(cfg.cluster.replicas)
    if manifest is not None:  # the steps each replica had done at the checkpoint
        for r in range(cfg.cluster.replicas):
            watch.steps[r] = min(manifest["replica_steps"].get(m, 0)
                                 for m in _members(cfg, range(r, r + 1)))

    def waiting(number: int) -> list[str]:
        return [m for m in _members(cfg) if int(m.split(".")[0]) not in watch.lost
                and not store.has(f"ckpt/{number}/paused/{m}")
                and not store.has(f"done/replica{m}")]

    def steps_of(number: int) -> dict[str, int]:
        steps = {}
        for m in _members(cfg):
            paused = store.try_get_json(f"ckpt/{number}/paused/{m}")
            done = store.try_get_json(f"done/replica{m}")
            steps[m] = (paused or done or {}).get("steps", watch.steps.get(int(m.split(".")[0]), 0))
        return steps
    read = 0
    next_eval = cfg.train.eval_every or None
    while not watch.finished:
        events = store.read_stream("events", read)
        read += len(events)
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
        if watch.lost and len(watch.lost) == cfg.cluster.replicas:
            raise JobFailed(f"all {cfg.cluster.replicas} replicas were lost"
                            f"{_exit_detail(local, 'replica', 0)}")
        if time.monotonic() - watch.last_event > cfg.cluster.timeout:
            raise JobFailed(f"no replica reported progress for {cfg.cluster.timeout:.0f} s")
        if driver.due(watch.leading_step):
            written = driver.take(waiting, steps_of)
            if written is not None:
                metrics.write({"event": "checkpoint", "time": time.time() - start_time,
                               "checkpoint": written["checkpoint"], "step": watch.leading_step})
        if next_eval is not None and watch.leading_step >= next_eval:
            loss, acc = _evaluate_current(ps, model, data, cfg.cluster.timeout, perm)
            metrics.write({"event": "eval", "time": time.time() - start_time,
                           "step": watch.leading_step, "test_loss": loss, "test_accuracy": acc})
            progress.message(f"step {watch.leading_step}: test accuracy {acc:.4f}")
            while next_eval <= watch.leading_step:
                next_eval += cfg.train.eval_every
        time.sleep(0.05)
    _show(progress, watch, force=True)
    return watch


def _drive_sandblaster(cfg: JobConfig, store: JobStore, local: LocalCluster | None,
                       metrics: MetricsLog, progress: Progress, ps: PSClient, model, data,
                       start_time: float) -> _Watch:
    """Run Sandblaster L-BFGS from here; the replicas are its workers."""
    from distbelief.algorithms.sandblaster import SandblasterFailed, SandblasterJob, drive

    watch = _Watch(cfg.cluster.replicas)

    def show(iterations: int, loss: float, samples_per_second: float) -> None:
        watch.steps[0] = iterations
        watch.last[0] = {"loss": loss}
        progress.update(iterations, loss=loss, samples_per_second=samples_per_second,
                        staleness=None)

    def on_iteration(k: int) -> None:
        if cfg.train.eval_every and k % cfg.train.eval_every == 0:
            loss, acc = _evaluate_current(ps, model, data, cfg.cluster.timeout)
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


def _restart_replica(cfg: JobConfig, store: JobStore, local: LocalCluster | None, watch: _Watch,
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


def _restart_shard(cfg: JobConfig, store: JobStore, local: LocalCluster | None, watch: _Watch,
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


def _evaluate_current(ps: PSClient, model, data, timeout: float,
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


def _show(progress: Progress, watch: _Watch, force: bool = False) -> None:
    recent = list(watch.last.values())
    loss = sum(e["loss"] for e in recent) / len(recent) if recent else None
    running = [e for e in recent if e["replica"] not in watch.lost | watch.done]
    sps = sum(e["samples_per_second"] for e in (recent if force else running))
    stale = [e["staleness"] for e in recent if e.get("staleness") is not None]
    progress.update(sum(watch.steps.values()), loss=loss, samples_per_second=sps,
                    staleness=sum(stale) / len(stale) if stale else None, force=force)


def _parts(cfg: JobConfig) -> list[int | None]:
    """The partitions of each replica: [None] when replicas are not partitioned."""
    return [None] if cfg.model.partitions == 1 else list(range(cfg.model.partitions))


def _members(cfg: JobConfig, replicas: range | None = None) -> list[str]:
    """Store names of the replica processes ("0", or "0.0", "0.1", ... when partitioned)."""
    return [member_name(r, part) for r in (replicas or range(cfg.cluster.replicas))
            for part in _parts(cfg)]


def _replica_done(store: JobStore, cfg: JobConfig, r: int) -> bool:
    return all(store.has(f"done/replica{m}") for m in _members(cfg, range(r, r + 1)))


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


def role_env(store: JobStore, cfg: JobConfig) -> dict[str, str]:
    """The environment a locally spawned role process needs to join this job's store."""
    return {**_loopback_env(cfg.cluster.host), "DISTBELIEF_STORE": f"{cfg.cluster.host}:{store.port}",
            "DISTBELIEF_TOKEN": store.token, "DISTBELIEF_TIMEOUT": str(cfg.cluster.timeout),
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}


def _loopback_env(host: str) -> dict[str, str]:
    """Keep gloo's channels on the loopback interface when the job is local to this host."""
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        return {"GLOO_SOCKET_IFNAME": "lo"}
    return {}


def _choose_run_dir(cfg: JobConfig) -> Path:
    """The run directory to use; UserError if it already holds a run. Creates nothing."""
    if cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = run_dir.with_name(f"{run_dir.name.split('.')[0]}.{suffix}")
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "summary.json").exists():
        raise UserError(f"run directory {str(run_dir)!r} already holds a run: "
                        "choose another --run-dir or remove it")
    return run_dir


def _create_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run directory {str(run_dir)!r} ({exc.strerror}): "
                        "choose a writable --run-dir") from None


def _write_cluster(run_dir: Path, store: JobStore, cfg: JobConfig, host: str) -> None:
    roles = [{"kind": "coordinator", "id": 0, "pid": os.getpid(), "host": socket.gethostname(),
              "address": host, "port": store.port}]
    members = [("shard", str(s)) for s in range(cfg.cluster.shards)]
    members += [("replica", m) for m in _members(cfg)]
    for kind, name in members:
        info = store.get_json(f"members/{kind}/{name}") or {}
        roles.append({"kind": kind, "id": info.get("id"), "part": info.get("part"),
                      "pid": info.get("pid"), "host": info.get("host"), "port": None})
    (run_dir / "cluster.json").write_text(json.dumps({"roles": roles}, indent=2) + "\n")


def _collect_shard_stats(store: JobStore, shards: int, timeout: float = 10.0) -> list[dict]:
    """Each shard's final counts (written as it stops); {} for a shard that did not answer."""
    deadline = time.monotonic() + timeout
    stats = []
    for s in range(shards):
        try:
            stats.append(store.get_json(f"stats/shard{s}",
                                        timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            stats.append({})
    return stats


def _summary(cfg: JobConfig, job: dict, watch: _Watch, steps: int, test_loss: float,
             test_acc: float, shard_stats: list[dict], layout: Layout, run_dir: Path,
             data, exit_codes: dict[str, int | None]) -> dict:
    wall = time.time() - job["start_time"]
    last = list(watch.last.values())
    stale = [e["staleness"] for e in last if e.get("staleness") is not None]
    return {
        "algorithm": cfg.algorithm, "replicas": cfg.cluster.replicas,
        "shards": cfg.cluster.shards, "steps": steps,
        "total_steps": sum(watch.steps.values()), "wall_seconds": wall,
        "samples_per_second": watch.samples / wall if wall > 0 else 0.0,
        "final_loss": sum(e["loss"] for e in last) / len(last) if last else None,
        "test_loss": test_loss, "test_accuracy": test_acc,
        "test_samples": len(data.y_test), "replicas_lost": len(watch.lost), "lost_replicas": sorted(watch.lost),
        "mean_staleness": sum(stale) / len(stale) if stale else None,
        "late_gradients_dropped": watch.dropped,
        "replica_restarts": {str(r): n for r, n in sorted(watch.restarts.items())},
        "shards_lost": watch.shards_lost,
        "nonfinite_skipped": watch.nonfinite,
        "nonfinite_refused": [s.get("nonfinite") for s in shard_stats],
        "shard_versions": [s.get("version") for s in shard_stats],
        "shard_pushes": [s.get("pushes") for s in shard_stats],
        "exit_codes": exit_codes,
        "run_dir": str(run_dir), "checkpoint": str(run_dir / CHECKPOINT),
        "model": {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                  "parameters": layout.numel},
        "config": {"dataset": cfg.data.dataset, "model": cfg.model.name,
                   **({"n_fetch": cfg.downpour.n_fetch, "n_push": cfg.downpour.n_push}
                      if cfg.algorithm == "downpour" else {}),
                   "rule": cfg.optimizer.rule, "lr": cfg.optimizer.lr,
                   "batch_size": cfg.data.batch_size,
                   "warm_start_steps": cfg.downpour.warm_start_steps, "seed": cfg.train.seed,
                   "sync_fraction": cfg.sync.fraction if cfg.algorithm == "sync" else None,
                   "slow_worker": cfg.cluster.slow_worker,
                   "portions": cfg.sandblaster.portions, "backups": cfg.sandblaster.backups,
                   "line_search": cfg.sandblaster.line_search},
        **({cfg.algorithm: watch.extra} if watch.extra else {}),
        "resumed_from": (job["resume"] or {}).get("checkpoint"),
    }
