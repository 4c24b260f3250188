"""The coordinator: runs one job from its config to its summary.

It hosts the job store, checks the data and model up front (so user errors
surface before any process starts), starts the shards, writes the initial
parameters into them (or lets them load a checkpoint, with ``--resume``),
starts the replicas, then watches them (`distbelief.watch`: metrics, progress,
evaluations, checkpoints, lost and replaced roles). At the end it pulls the
final parameters, evaluates them, and writes the checkpoint, ``summary.json``
and ``curves.png``. Every child is reaped on the way out. A hogwild job has no
parameter server and goes its own way (`algorithms/hogwild.py`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from pathlib import Path

import torch

from distbelief.algorithms.schedule import steps_per_replica
from distbelief.checkpoint import CheckpointDriver, read_manifest
from distbelief.config import JobConfig
from distbelief.data.augment import Augmenter
from distbelief.data.server import data_summary
from distbelief.errors import JobFailed, UserError
from distbelief.metrics.log import MetricsLog, Progress
from distbelief.model.flat import flatten_parameters
from distbelief.model.partition import plan_partitions
from distbelief.model.zoo import check_model, load_data_and_model
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.channel import remove_job_files
from distbelief.runtime.launch import EnvRole, LocalCluster
from distbelief.runtime.store import JobStore, new_token
from distbelief.watch import (Watch, drive_sandblaster, evaluate_current, parts, replica_members,
                              wait_for_keys, watch_replicas)

CHECKPOINT = "model.pt"
__all__ = ["CHECKPOINT", "JobFailed", "role_env", "run_job", "wait_for_keys"]


def run_job(cfg: JobConfig, *, show_progress: bool = True, env: EnvRole | None = None,
            resume: str | Path | None = None) -> dict:
    """Run a whole job and return its summary. Blocks until the job ends.

    `resume`: a run directory whose last complete checkpoint the job continues from
    (`cfg` is then that run's config). Raises UserError for bad input and JobFailed
    when the job cannot finish.
    """
    cfg = cfg.validate().resolved()
    if cfg.algorithm == "hogwild":  # no parameter server: one tensor in shared memory
        from distbelief.algorithms.hogwild import run_hogwild_job
        return run_hogwild_job(cfg, show_progress=show_progress, env=env, resume=resume)
    manifest = None
    if resume is not None:
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
    else:
        run_dir = _choose_run_dir(cfg)
    data, model = load_data_and_model(cfg)
    check_model(model, data.input_shape, data.num_classes)
    Augmenter(cfg.augment, data.input_shape)  # augmentation that does not fit: one line, now
    m = cfg.model
    plan = plan_partitions(model, partitions=m.partitions, split=m.split, balance=m.balance,
                           micro_batches=m.micro_batches,
                           sample=data.x_train[: cfg.data.batch_size])
    perm = plan.permutation(model)  # shard order -> the whole model's parameter order
    initial = flatten_parameters(model)
    if perm is not None:
        initial = initial[perm]
    chunk = cfg.cluster.chunk_bytes // 4 if cfg.cluster.shard_layout == "chunks" else None
    if plan.partitions > 1:
        layout, groups = Layout.by_partition(plan.part_numels(model), cfg.cluster.shards,
                                             chunk_numel=chunk)
    elif chunk is not None:
        layout, groups = Layout.chunked(initial.numel(), cfg.cluster.shards, chunk), None
    else:
        layout, groups = Layout.balanced(initial.numel(), cfg.cluster.shards), None
    steps = steps_per_replica(steps=cfg.train.steps, epochs=cfg.train.resolved_epochs,
                              train_samples=len(data.x_train), replicas=cfg.cluster.replicas,
                              batch_size=cfg.data.batch_size * cfg.downpour.replica_workers)
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
                    for part in parts(cfg):
                        local.spawn("replica", r, part=part)
                for d in range(cfg.cluster.data_servers):
                    local.spawn("dataserver", d)
            wait_for_keys(store, [f"shard{s}/up" for s in range(cfg.cluster.shards)], local,
                          cfg, "the parameter shards to start")
            ps = PSClient(store, layout, "coordinator", transport=cfg.cluster.transport,
                          timeout=cfg.cluster.timeout, grad_buffers=0)
            if manifest is None:  # a resumed job's shards loaded their checkpoint
                ps.set(initial).wait(cfg.cluster.timeout)
            store.set_json("job/ready", True)
            wait_for_keys(store, [f"members/replica/{m}" for m in replica_members(cfg)],
                          local, cfg, "the replicas to start")
            wait_for_keys(store, [f"members/dataserver/{d}"
                                  for d in range(cfg.cluster.data_servers)],
                          local, cfg, "the data servers to start")
            _write_cluster(run_dir, store, cfg, host)
            if sandblaster:
                watch = drive_sandblaster(cfg, store, local, metrics, progress, ps, model,
                                           data, job["start_time"])
            else:
                driver = CheckpointDriver(
                    store, run_dir, cfg.train.checkpoint_every, cfg.cluster.shards,
                    cfg.cluster.timeout, start=manifest["checkpoint"] if manifest else 0,
                    meta={"layout": layout.to_json(), "steps": steps},
                    message=progress.message)
                watch = watch_replicas(cfg, store, local, metrics, progress, ps, model, data,
                               job["start_time"], perm, driver, manifest)
            test_loss, test_acc = evaluate_current(ps, model, data, cfg.cluster.timeout, perm)
            metrics.write({"event": "eval", "time": time.time() - job["start_time"],
                           "step": watch.leading_step, "test_loss": test_loss,
                           "test_accuracy": test_acc, "final": True})
            torch.save(model.state_dict(), run_dir / CHECKPOINT)
            ps.close()
            ps = None
            store.set_json("job/stop", True)
            shard_stats = _collect_shard_stats(store, cfg.cluster.shards)
            store_keys = store.raw.num_keys()  # per-step keys are trimmed: a bounded number
            exit_codes = {}
            if local:
                local.wait_exit("shard", 10)
                local.wait_exit("replica", 10)  # their interpreters may take a moment to end
                local.wait_exit("dataserver", 10)
                exit_codes = {c.log_path.stem: c.process.poll() for c in local.children}
        summary = _summary(cfg, job, watch, steps, test_loss, test_acc, shard_stats, layout,
                           run_dir, data, exit_codes)
        done = [d if isinstance(d, dict) else {}  # a Sandblaster worker's is just True
                for d in (store.try_get_json(f"done/replica{m}") for m in replica_members(cfg))]
        summary["pushes_acked"] = sum(d.get("acked", 0) for d in done)
        summary["store_keys"] = store_keys
        summary["data"] = data_summary(store, cfg, dict(zip(replica_members(cfg), done)),
                                       watch.dataservers_lost)
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
    members += [("replica", m) for m in replica_members(cfg)]
    members += [("dataserver", str(d)) for d in range(cfg.cluster.data_servers)]
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


def _summary(cfg: JobConfig, job: dict, watch: Watch, steps: int, test_loss: float,
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
        "layout": layout.describe(),
    }
