"""Hogwild! (Recht et al., 2011), the coordinator side: one shared tensor, W workers.

`run_hogwild_job` runs a ``--algorithm hogwild`` job the way `coordinator.run_job`
runs the others (same store, run directory, launcher, metrics, progress line,
evaluations, ``model.pt``, ``summary.json`` and plot), but with no parameter
server: it puts the seeded model's parameters (and the update rule's zeroed
state) in one job file under /dev/shm, spawns W worker processes (the
"replica" role, `algorithms/hogwild_worker.py`) that map it and update it
without locks, starts them together once every one has mapped it, follows
their events, and evaluates a snapshot of the shared tensor every
``eval_every`` steps of the leading worker and at the end.

A worker that dies ends the job (`JobFailed` naming it, its exit code and the
end of its log): its part of the data would go untrained and its steps
uncounted, so the result would not be the run that was asked for. Start the
run again. Every wait is bounded by ``--timeout``; every child is reaped and
the shared file removed on the way out.

Example::

    summary = run_hogwild_job(JobConfig(algorithm="hogwild").validate().resolved(),
                              show_progress=False, env=None, resume=None)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from distbelief.algorithms.hogwild.worker import STATE_SLOTS
from distbelief.algorithms.schedule import steps_per_replica
from distbelief.config import JobConfig
from distbelief.coordinator import CHECKPOINT, _choose_run_dir, _create_run_dir, role_env
from distbelief.errors import JobFailed, UserError
from distbelief.metrics.log import MetricsLog, Progress
from distbelief.model.evaluate import evaluate
from distbelief.model.flat import flatten_parameters, load_flat
from distbelief.model.zoo import check_model, load_data_and_model
from distbelief.runtime.channel import SharedTensor, job_file, remove_job_files
from distbelief.runtime.launch import LocalCluster
from distbelief.runtime.store import JobStore, new_token
from distbelief.watch import (Watch, _exit_detail, _is_lost, _show, follow_events,
                              maybe_evaluate, wait_for_keys)

MULTI_HOST = ("--algorithm hogwild shares one tensor in this host's memory, so it runs on one "
              "host: start it without torchrun/SLURM (RANK and WORLD_SIZE unset)")


def run_hogwild_job(cfg: JobConfig, *, show_progress: bool, env, resume) -> dict:
    """Run a validated, resolved hogwild job; its summary. Blocks until the job ends.

    Raises UserError for bad input (also: a multi-host launch, `resume`) and JobFailed
    when the job cannot finish."""
    if env is not None:
        raise UserError(MULTI_HOST)
    if resume is not None:
        raise UserError(f"--resume {str(resume)!r}: hogwild runs write no checkpoints to "
                        "resume from; start a new run")
    workers = cfg.hogwild.workers
    run_dir = _choose_run_dir(cfg)
    data, model = load_data_and_model(cfg)
    check_model(model, data.input_shape, data.num_classes)
    if workers > len(data.x_train):
        raise UserError(f"--workers {workers} is more than the {len(data.x_train)} training "
                        f"samples: use at most {len(data.x_train)} workers")
    steps = steps_per_replica(steps=cfg.train.steps, epochs=cfg.train.resolved_epochs,
                              train_samples=len(data.x_train), replicas=workers,
                              batch_size=cfg.data.batch_size)
    initial = flatten_parameters(model)
    store = JobStore.host(cfg.cluster.host, cfg.cluster.port, new_token(),
                          timeout=cfg.cluster.timeout)
    try:
        _create_run_dir(run_dir)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        slots = STATE_SLOTS[cfg.optimizer.rule]
        shared = SharedTensor(job_file(store.token, "hogwild"), initial.numel() * (1 + slots),
                              torch.float32, create=True)
        shared.tensor.zero_()
        params = shared.tensor[: initial.numel()]
        params.copy_(initial)
        job = {"config": cfg.to_dict(), "start_time": time.time(), "steps": steps,
               "input_shape": list(data.input_shape), "num_classes": data.num_classes,
               "run_dir": str(run_dir.resolve()), "resume": None,
               "hogwild": {"file": str(shared.path), "numel": initial.numel(), "slots": slots}}
        store.set_json("job", job)
        store.set_json("job/ready", True)
        return _run(cfg, store, job, run_dir, params, model, data, show_progress)
    finally:
        remove_job_files(store.token)
        store.close()


def _run(cfg: JobConfig, store: JobStore, job: dict, run_dir: Path, params: torch.Tensor,
         model, data, show_progress: bool) -> dict:
    workers, start_time = cfg.hogwild.workers, job["start_time"]
    with LocalCluster(run_dir / "logs", role_env(store, cfg)) as local, \
            MetricsLog(run_dir / "metrics.jsonl") as metrics, \
            Progress(job["steps"] * workers, enabled=show_progress) as progress:
        for w in range(workers):
            local.spawn("replica", w)
        wait_for_keys(store, [f"hogwild/ready/{w}" for w in range(workers)], local, cfg,
                      "the workers to load the data and map the shared parameters")
        _write_cluster(run_dir, store, cfg)
        store.set_json("hogwild/go", True)
        watch = _watch(cfg, store, local, metrics, progress, params, model, data, start_time)
        test_loss, test_acc = _evaluate(params, model, data)
        metrics.write({"event": "eval", "time": time.time() - start_time,
                       "step": watch.leading_step, "test_loss": test_loss,
                       "test_accuracy": test_acc, "final": True})
        torch.save(model.state_dict(), run_dir / CHECKPOINT)
        store.set_json("job/stop", True)
        local.wait_exit("replica", 10)
        exit_codes = {c.log_path.stem: c.process.poll() for c in local.children}
    done = [store.try_get_json(f"done/replica{w}") or {} for w in range(workers)]
    summary = _summary(cfg, job, watch, done, test_loss, test_acc, run_dir, data, exit_codes,
                       params.numel())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from distbelief.metrics.plot import plot_run
    plot_run(run_dir)
    return summary


def _watch(cfg: JobConfig, store: JobStore, local: LocalCluster, metrics: MetricsLog,
           progress: Progress, params: torch.Tensor, model, data, start_time: float) -> Watch:
    """Follow the workers until every one is done; evaluate on the way. JobFailed when one
    dies, produces a non-finite loss under --on-nonfinite stop, or stays silent too long."""
    workers = cfg.hogwild.workers
    watch = Watch(workers)
    read, next_eval = 0, cfg.train.eval_every or None
    while not watch.finished:
        read = follow_events(store, read, watch, metrics, progress)
        bad = store.try_get_json("job/nonfinite")  # before the lost: the worker then exits
        if bad is not None:
            raise JobFailed(f"{bad['client']} produced a non-finite loss and --on-nonfinite "
                            "stop ends the job: lower --lr or check the data, or use "
                            "--on-nonfinite skip to drop such steps and go on")
        for w in set(range(workers)) - watch.done:
            if store.has(f"done/replica{w}"):
                watch.done.add(w)
            elif _is_lost(store, local, "replica", w) and not store.has(f"done/replica{w}"):
                raise JobFailed(f"hogwild worker {w} died at step {watch.steps.get(w, 0)}"
                                f"{_exit_detail(local, 'replica', w)}; the job stops (its part "
                                "of the data would go untrained): start the run again")
        if time.monotonic() - watch.last_event > cfg.cluster.timeout:
            raise JobFailed(f"no hogwild worker reported progress for "
                            f"{cfg.cluster.timeout:.0f} s")
        next_eval = maybe_evaluate(next_eval, cfg.train.eval_every, watch, metrics, progress,
                                   start_time, lambda: _evaluate(params, model, data))
        time.sleep(0.05)
    # a replica appends its last events before it says done: those that came after this
    # loop's last read are still to be taken
    follow_events(store, read, watch, metrics, progress)
    _show(progress, watch, force=True)
    return watch


def _evaluate(params: torch.Tensor, model, data) -> tuple[float, float]:
    """(test loss, accuracy) of a snapshot of the shared parameters, loaded into `model`."""
    load_flat(model, params.clone())
    return evaluate(model, data.x_test, data.y_test)


def _write_cluster(run_dir: Path, store: JobStore, cfg: JobConfig) -> None:
    roles = [{"kind": "coordinator", "id": 0, "pid": os.getpid(), "host": socket.gethostname(),
              "address": cfg.cluster.host, "port": store.port}]
    for w in range(cfg.hogwild.workers):
        info = store.try_get_json(f"members/replica/{w}") or {}
        roles.append({"kind": "worker", "id": w, "pid": info.get("pid"),
                      "host": info.get("host"), "port": None})
    (run_dir / "cluster.json").write_text(json.dumps({"roles": roles}, indent=2) + "\n")


def _summary(cfg: JobConfig, job: dict, watch: Watch, done: list[dict], test_loss: float,
             test_acc: float, run_dir: Path, data, exit_codes: dict, numel: int) -> dict:
    wall = time.time() - job["start_time"]
    last = list(watch.last.values())
    starts = [d["start"] for d in done if "start" in d]
    ends = [d["end"] for d in done if "end" in d]
    train_seconds = max(ends) - min(starts) if starts and ends else None
    samples = sum(d.get("samples", 0) for d in done)
    workers = cfg.hogwild.workers
    return {
        "algorithm": "hogwild", "workers": workers, "steps": job["steps"],
        "total_steps": sum(watch.steps.values()), "wall_seconds": wall,
        "samples_per_second": watch.samples / wall if wall > 0 else 0.0,
        "train_seconds": train_seconds, "train_samples": samples,
        # CPU time the workers' processes used while training: independent of other load
        "train_cpu_seconds": sum(d.get("cpu_seconds", 0.0) for d in done),
        "train_samples_per_second": samples / train_seconds if train_seconds else None,
        "final_loss": sum(e["loss"] for e in last) / len(last) if last else None,
        "test_loss": test_loss, "test_accuracy": test_acc, "test_samples": len(data.y_test),
        "updates_applied": sum(d.get("updates", 0) for d in done),
        "worker_updates": [d.get("updates") for d in done],
        "nonfinite_skipped": watch.nonfinite, "replicas_lost": 0,
        "threads_per_worker": cfg.cluster.threads_per_process(workers),
        "exit_codes": exit_codes, "run_dir": str(run_dir),
        "checkpoint": str(run_dir / CHECKPOINT),
        "model": {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                  "parameters": numel},
        "config": {"dataset": cfg.data.dataset, "model": cfg.model.name, "workers": workers,
                   "rule": cfg.optimizer.rule, "lr": cfg.optimizer.lr,
                   "batch_size": cfg.data.batch_size, "seed": cfg.train.seed},
    }
