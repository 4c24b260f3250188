"""The coordinator: runs one job from its config to its summary, whatever the algorithm.

It hosts the job store, checks the data and model up front (so user errors
surface before any process starts), builds the parameters' home
(`distbelief.parameters`: the shards, or one shared tensor), starts the roles,
then lets the algorithm run its course: the generic watch loop
(`distbelief.watch`: metrics, progress, evaluations, checkpoints, lost and
replaced roles) or the algorithm's own driver. At the end it evaluates the
final parameters and writes the checkpoint, ``summary.json`` and
``curves.png``. Every child is reaped on the way out.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from distbelief.algorithms.base import Algorithm, Coordination, Watch
from distbelief.algorithms.registry import get_algorithm
from distbelief.checkpoint import CheckpointDriver, read_manifest
from distbelief.data.augment import Augmenter
from distbelief.data.server import data_summary
from distbelief.errors import JobFailed, UserError
from distbelief.job import JobConfig
from distbelief.metrics.log import MetricsLog, Progress
from distbelief.metrics.tensorboard import TensorBoardLog
from distbelief.data.feed import describe_data, load_data_and_model
from distbelief.model.initial import load_initial
from distbelief.model.buffers import (average, buffer_state, decode, encode, has_buffers,
                                      load_buffers)
from distbelief.model.zoo import check_model
from distbelief.task import Task, task_of
from distbelief.parameters import home_for
from distbelief.rundir import (CHECKPOINT, CLUSTER, choose_run_dir, create_run_dir,
                               write_atomic, write_cluster, write_text_atomic)
from distbelief.runtime.secret import JobSecret
from distbelief.runtime.shm import remove_files_of, remove_job_files
from distbelief.runtime.launch import EnvRole, LocalCluster, loopback_env, role_env
from distbelief.runtime.store import JobStore, new_token
from distbelief.watch import (exit_detail, is_lost, parts, replica_members, start_liveness,
                              wait_for_keys, watch_replicas)

__all__ = ["JobFailed", "check_launch", "run_job"]


CURVES_ENV = "DISTBELIEF_CURVES"
"""Set to 0, a job ends without drawing run_dir/curves.png (`distbelief plot` draws it
later): many short runs, such as the test suite's, spend a second of CPU each on it."""


def run_job(cfg: JobConfig, *, show_progress: bool = True, env: EnvRole | None = None,
            resume: str | Path | None = None, plan: dict | None = None) -> dict:
    """Run a whole job and return its summary. Blocks until the job ends.

    `resume`: a run directory whose last complete checkpoint the job continues from
    (`cfg` is then that run's config). `plan`: the plan that chose `cfg` (``--strategy
    auto``), recorded in the summary. Raises UserError for bad input and JobFailed
    when the job cannot finish.
    """
    cfg = cfg.validate().resolved()
    algorithm = get_algorithm(cfg.algorithm)
    check_launch(algorithm, env, resume)
    manifest = None
    if resume is not None:
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
        _remove_leftovers(run_dir)
    else:
        run_dir = choose_run_dir(cfg.train.run_dir, cfg.algorithm)
    data, model = load_data_and_model(cfg)
    task = task_of(cfg)
    check_model(model, data.input_shape, data.targets, task, cfg.model.name)
    if not algorithm.trains_buffers and has_buffers(model):
        names = ", ".join(list(buffer_state(model))[:3])
        raise UserError(f"--model {cfg.model.name} has buffers ({names}: BatchNorm's running "
                        f"statistics or the like) that --algorithm {algorithm.name} does not "
                        "train: use --algorithm downpour or sync, or a model without them "
                        "(e.g. LayerNorm in place of BatchNorm)")
    Augmenter(cfg.augment, data.input_shape)  # augmentation that does not fit: one line, now
    if cfg.train.init_from is not None and manifest is None:  # a resumed run has its own
        load_initial(model, cfg.train.init_from, model_name=cfg.model.name)
    home = home_for(algorithm.parameters, cfg, model, data)  # takes the initial parameters
    steps = algorithm.steps(cfg, len(data.train))
    if env is None:
        host, port = cfg.cluster.host, cfg.cluster.port
        store = JobStore.host(host, port, new_token(), timeout=cfg.cluster.timeout)
    elif env.agent_store:  # torchrun's agent already hosts a store at MASTER_ADDR:MASTER_PORT
        host, port = env.master_addr, env.master_port
        store = JobStore.connect(host, port, env.token, timeout=cfg.cluster.timeout)
    else:
        host, port = "0.0.0.0", env.master_port
        store = JobStore.host(host, port, env.token, timeout=cfg.cluster.timeout)
    loopback = loopback_env(host)
    saved_env = {k: os.environ.get(k) for k in loopback}
    try:
        create_run_dir(run_dir)  # only once the data, model and port are known to be good
        if manifest is None:
            write_text_atomic(run_dir / "config.toml", cfg.to_toml())
        job = {"config": cfg.to_dict(), "start_time": time.time(), "steps": steps,
               "shard_updates": algorithm.shard_updates(cfg, steps),
               **describe_data(data), "run_dir": str(run_dir.resolve()), "resume": manifest,
               **home.job_fields(store)}
        if cfg.train.init_from is not None and manifest is None and has_buffers(model):
            # the trained buffers too: each replica's reporter starts from its key's
            loaded = encode(buffer_state(model))
            for member in replica_members(cfg, range(algorithm.replicas(cfg))):
                store.set_json(f"buffers/{member}", loaded)
        store.set_json("job", job)
        os.environ.update(loopback)  # the coordinator's own channels too
        mirrors = ([TensorBoardLog(run_dir / "tensorboard", start_time=job["start_time"],
                                   config=cfg.to_toml())] if cfg.train.tensorboard else [])
        with LocalCluster(run_dir / "logs", role_env(store, cfg)) as cluster, \
                MetricsLog(run_dir / "metrics.jsonl", mirrors=mirrors) as metrics, \
                Progress(algorithm.progress_total(cfg, steps), enabled=show_progress) as progress:
            local = cluster if env is None else None
            replicas = algorithm.replicas(cfg)
            if local:  # all at once: their start-up (imports, data) overlaps
                for s in range(home.shards):
                    local.spawn("shard", s)
                for r in range(replicas):
                    for part in parts(cfg):
                        local.spawn("replica", r, part=part)
                for d in range(cfg.cluster.data_servers):
                    local.spawn("dataserver", d)

            def wait_for(keys: list[str], what: str) -> None:
                wait_for_keys(store, keys, local, cfg.cluster.timeout, what)

            home.start(store, manifest is not None, wait_for)
            store.set_json("job/ready", True)
            members = replica_members(cfg, range(replicas))
            wait_for([f"members/replica/{m}" for m in members], "the replicas to start")
            wait_for([f"members/dataserver/{d}" for d in range(cfg.cluster.data_servers)],
                     "the data servers to start")
            _write_cluster(run_dir, store, home.shards, members, cfg.cluster.data_servers, host,
                           algorithm.replica_kind)
            # every role registered: each must beat within LOST_AFTER of now (this clock)
            liveness = start_liveness(store, home.shards, members, cfg.cluster.data_servers)
            watch = Watch(replicas)
            co = Coordination(
                config=cfg, store=store, ps=home.ps, watch=watch, start_time=job["start_time"],
                write_event=metrics.write, message=progress.message, show=progress.update,
                is_lost=lambda r: is_lost(store, local, liveness, "replica", r,
                                          cfg.model.partitions),
                exit_detail=lambda r: exit_detail(local, "replica", r), wait_for=wait_for,
                evaluate=lambda: _evaluate(home, model, data.watched[1], store, members),
                watched=data.watched[0], resume=manifest)
            algorithm.start(co)
            if algorithm.drives_itself:
                algorithm.drive(co)
            else:
                driver = CheckpointDriver(
                    store, run_dir, cfg.train.checkpoint_every, home.shards, cfg.cluster.timeout,
                    start=manifest["checkpoint"] if manifest else 0,
                    meta={"layout": job.get("layout"), "steps": steps}, message=progress.message)
                watch_replicas(co, algorithm, local, liveness, home.shards, driver, manifest)
            # the test split is read once, here; with --val-fraction the validation split too
            tested = task.fields(_evaluate(home, model, data.test, store, members))
            if data.val is not None:
                tested.update(task.fields(_evaluate(home, model, data.val, store, members),
                                          "val_"))
            metrics.write({"event": "eval", "time": time.time() - job["start_time"],
                           "step": watch.leading_step, **tested, "final": True})
            state = model.state_dict()
            write_atomic(run_dir / CHECKPOINT, lambda f: torch.save(state, f))
            home.stop(store)
            store.set_json("job/stop", True)
            shard_stats = home.final_stats(store)
            store_keys = store.raw.num_keys()  # per-step keys are trimmed: a bounded number
            exit_codes = {}
            if local:
                local.wait_exit("shard", 10)
                local.wait_exit("replica", 10)  # their interpreters may take a moment to end
                local.wait_exit("dataserver", 10)
                exit_codes = {c.log_path.stem: c.process.poll() for c in local.children}
        done = [d if isinstance(d, dict) else {}  # None: a lost replica wrote none
                for d in (store.try_get_json(f"done/replica{m}") for m in members)]
        summary = {**_summary(cfg, algorithm, job, watch, task, tested, run_dir, data,
                              exit_codes, home.numel),
                   **home.summary(shard_stats, done), **algorithm.summary(cfg, watch, done),
                   "pushes_acked": sum(d.get("acked", 0) for d in done),
                   "transport_bytes": {k: sum((d.get("transport_bytes") or {}).get(k, 0)
                                              for d in done) for k in ("shm", "gloo")},
                   "store_keys": store_keys,
                   "data": data_summary(store, cfg, dict(zip(members, done)),
                                        watch.dataservers_lost)}
        if plan is not None:
            summary["plan"] = plan
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if os.environ.get(CURVES_ENV, "1") != "0":  # a second of CPU: skipped in sweeps
            from distbelief.metrics.plot import plot_run
            plot_run(run_dir)
        return summary
    finally:
        home.close()
        remove_job_files(store.token)
        store.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _evaluate(home, model: torch.nn.Module, samples, store: JobStore, members: list[str]
              ) -> dict[str, float]:
    """The task's metrics over `samples` (a split) of the current parameters (from their
    home) with the mean of the buffers the replicas last published
    (`distbelief.model.buffers`), both loaded into `model`, which is then what a checkpoint
    or model.pt saves."""
    states = [decode(value) for value in (store.try_get_json(f"buffers/{m}") for m in members)
              if value]
    if states:
        load_buffers(model, average(states))
    return home.evaluate(model, samples)


def check_launch(algorithm: Algorithm, env: EnvRole | None, resume: str | Path | None) -> None:
    """UserError when the algorithm cannot run the way it was started."""
    if env is not None and algorithm.parameters == "shared":
        raise UserError(multi_host_refusal(algorithm))
    if resume is not None and "train.checkpoint_every" not in algorithm.honours:
        raise UserError(f"--resume {str(resume)!r}: {algorithm.name} runs write no checkpoints "
                        "to resume from; start a new run")


def multi_host_refusal(algorithm: Algorithm) -> str:
    return (f"--algorithm {algorithm.name} shares one tensor in this host's memory, so it runs "
            "on one host: start it without torchrun/SLURM (RANK and WORLD_SIZE unset)")


def _write_cluster(run_dir: Path, store: JobStore, shards: int, members: list[str],
                   dataservers: int, host: str, replica_kind: str) -> None:
    roles = [{"kind": "coordinator", "id": 0, "pid": os.getpid(), "host": socket.gethostname(),
              "address": host, "port": store.port}]
    names = [("shard", str(s)) for s in range(shards)]
    names += [("replica", m) for m in members]
    names += [("dataserver", str(d)) for d in range(dataservers)]
    for kind, name in names:
        info = store.get_json(f"members/{kind}/{name}") or {}
        roles.append({"kind": replica_kind if kind == "replica" else kind, "id": info.get("id"), "part": info.get("part"),
                      "pid": info.get("pid"), "host": info.get("host"), "port": None})
    write_cluster(run_dir, roles, JobSecret(store.token).job_id)


def _remove_leftovers(run_dir: Path) -> None:
    """A run directory's earlier job ended without removing its shared-memory files (its
    coordinator was killed, and with it every role): remove them, once that coordinator's
    process is gone."""
    try:
        before = json.loads((run_dir / CLUSTER).read_text())
    except (OSError, ValueError):
        return
    pids = [r.get("pid") for r in before.get("roles", []) if r.get("kind") == "coordinator"]
    if any(isinstance(pid, int) and _alive(pid) for pid in pids):
        return  # still running: not leftovers
    remove_files_of(str(before.get("job_id") or ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def _summary(cfg: JobConfig, algorithm: Algorithm, job: dict, watch: Watch, task: Task,
             tested: dict[str, float], run_dir: Path, data, exit_codes: dict[str, int | None],
             numel: int) -> dict:
    """The fields every algorithm's summary has (the home and the algorithm add theirs)."""
    wall = time.time() - job["start_time"]
    last = list(watch.last.values())
    stale = [e["staleness"] for e in last if e.get("staleness") is not None]
    return {
        "algorithm": cfg.algorithm, "replicas": algorithm.replicas(cfg), "steps": job["steps"],
        "total_steps": sum(watch.steps.values()), "wall_seconds": wall,
        "samples_per_second": watch.samples / wall if wall > 0 else 0.0,
        "final_loss": sum(e["loss"] for e in last) / len(last) if last else None,
        "task": {"name": task.name, "loss": task.loss_name, "headline": task.headline,
                 "metrics": task.metrics_spec},
        **tested, "test_samples": len(data.test),
        **({"val_samples": len(data.val)} if data.val is not None else {}),
        "replicas_lost": len(watch.lost),
        "lost_replicas": sorted(watch.lost),
        "mean_staleness": sum(stale) / len(stale) if stale else None,
        "late_gradients_dropped": watch.dropped,
        "replica_restarts": {str(r): n for r, n in sorted(watch.restarts.items())},
        "shards_lost": watch.shards_lost,
        "nonfinite_skipped": watch.nonfinite,
        "exit_codes": exit_codes,
        "run_dir": str(run_dir), "checkpoint": str(run_dir / CHECKPOINT),
        "model": {**describe_data(data), "parameters": numel},
        "config": {"dataset": cfg.data.dataset, "model": cfg.model.name,
                   "rule": cfg.optimizer.rule, "lr": cfg.optimizer.lr,
                   "batch_size": cfg.data.batch_size, "seed": cfg.train.seed,
                   "slow_worker": cfg.cluster.slow_worker, **algorithm.summary_config(cfg)},
        "resumed_from": (job["resume"] or {}).get("checkpoint"),
    }
