"""Which command-line option each algorithm uses, and that every other one is refused.

The table is the specification, written by hand from reading each algorithm's
replica, worker and driver code (not computed from its `honours`): an option
is "used" when the algorithm's processes read it, "refused" when setting it
would change nothing. Setting a refused option to anything but its default
must fail validation with one line naming it and the algorithm; a used one
must pass. A new option or algorithm has to be added here.
"""

from __future__ import annotations

import torch

from distbelief.algorithms.registry import ALGORITHMS
from distbelief.errors import UserError
from distbelief.job import OPTIONS, JobConfig, apply_options

U, R = "used", "refused"
COLUMNS = ("downpour", "sync", "sandblaster", "hogwild", "admm", "easgd")

# option: (a valid value other than its default, its use by each algorithm of COLUMNS)
TABLE: dict[str, tuple[object, tuple[str, ...]]] = {
    # [cluster]; hogwild's workers share one tensor on this host: no shards, no replicas;
    # admm's replicas read their own data (no data servers)
    "replicas":         (3,             (U, U, U, R, U, U)),
    "shards":           (3,             (U, U, U, R, U, U)),
    "host":             ("localhost",   (U, U, U, U, U, U)),
    "port":             (29555,         (U, U, U, U, U, U)),
    "transport":        ("gloo",        (U, U, U, R, U, U)),
    "timeout":          (60.0,          (U, U, U, U, U, U)),
    "token_file":       ("token.txt",   (U, U, U, U, U, U)),
    # every role's heartbeat stops when its main loop stalls (shards, replicas, workers)
    "progress_timeout": (30.0,          (U, U, U, U, U, U)),
    "slow_worker":      ("1:2",         (U, U, U, R, U, U)),   # hogwild's worker has no Slowdown
    "restart_replicas": (True,          (U, R, R, R, U, U)),
    "threads":          (1,             (U, U, U, U, U, U)),
    "shard_layout":     ("chunks",      (U, U, U, R, U, U)),
    "chunk_bytes":      (4096,          (U, U, U, R, U, U)),
    "data_servers":     (1,             (U, U, R, R, R, R)),   # sandblaster's worker loads its data
    # only downpour's and sync's replicas have a GPU path; hogwild's workers share /dev/shm
    "device":           ("cuda",        (U, U, R, R, R, R)),
    # each algorithm's own section
    "n_fetch":          (2,             (U, R, R, R, R, R)),
    "n_push":           (2,             (U, R, R, R, R, R)),
    "warm_start_steps": (5,             (U, R, R, R, R, R)),
    "replica_workers":  (2,             (U, R, R, R, R, R)),
    "max_staleness":    (2,             (U, R, R, R, R, R)),
    "sync_fraction":    (0.5,           (R, U, R, R, U, R)),
    "portions":         (8,             (R, R, U, R, R, R)),
    "backups":          (False,         (R, R, U, R, R, R)),
    "push_every":       (2,             (R, R, U, R, R, R)),
    "history":          (5,             (R, R, U, R, R, R)),
    "line_search":      ("none",        (R, R, U, R, R, R)),
    "tolerance_grad":   (1e-5,          (R, R, U, R, R, R)),
    "tolerance_change": (1e-6,          (R, R, U, R, R, R)),
    "workers":          (3,             (R, R, R, U, R, R)),
    "local_steps":      (3,             (R, R, R, R, U, R)),
    "rho":              (0.5,           (R, R, R, R, U, R)),
    "rho_schedule":     ("balance",     (R, R, R, R, U, R)),
    "rho_max":          (100.0,         (R, R, R, R, U, R)),
    "boundary_rho":     (2.0,           (R, R, R, R, U, R)),
    "alpha":            (0.5,           (R, R, R, R, R, U)),
    "period":           (2,             (R, R, R, R, R, U)),
    # [optimizer]: L-BFGS takes no update rule, only --lr as its step scale
    "rule":             ("momentum",    (U, U, R, U, U, U)),
    "lr":               (0.5,           (U, U, U, U, U, U)),
    "momentum":         (0.5,           (U, U, R, U, U, U)),
    "weight_decay":     (0.01,          (U, U, R, U, U, U)),
    "nesterov":         (True,          (U, U, R, U, U, U)),
    "lr_schedule":      ("cosine",      (U, U, R, U, U, U)),
    "warmup_steps":     (5,             (U, U, R, U, U, U)),
    "lr_step_every":    (100,           (U, U, R, U, U, U)),
    "lr_gamma":         (0.5,           (U, U, R, U, U, U)),
    "clip_grad_norm":   (1.0,           (U, U, R, U, U, U)),
    # [data]; sandblaster cuts all the data into --portions, not batches
    "dataset":          ("digits",      (U, U, U, U, U, U)),
    "batch_size":       (32,            (U, U, R, U, U, U)),
    "num_samples":      (500,           (U, U, U, U, U, U)),
    "prefetch":         (2,             (U, U, R, R, R, R)),
    "seq_len":          (64,            (U, U, U, U, U, U)),   # text:PATH windows, any algorithm
    "val_fraction":     (0.2,           (U, U, U, U, U, U)),   # every algorithm evaluates
    # [model]: downpour's replicas are cut into partitions, admm's by layers only
    "model":            ("mlp",         (U, U, U, U, U, U)),
    "partitions":       (2,             (U, R, R, R, U, R)),
    "split":            ("units",       (U, R, R, R, R, R)),
    "balance":          ("3,3",         (U, R, R, R, U, R)),
    "micro_batches":    (2,             (U, R, R, R, R, R)),
    # [train]: sandblaster's driver reports every iteration and a NaN loss always ends it;
    # its steps are L-BFGS iterations, never epochs; hogwild writes no checkpoints
    "steps":            (10,            (U, U, U, U, U, U)),
    "epochs":           (2.0,           (U, U, R, U, U, U)),
    "seed":             (1,             (U, U, U, U, U, U)),
    "eval_every":       (5,             (U, U, U, U, U, U)),
    "log_every":        (5,             (U, U, R, U, U, U)),
    "run_dir":          ("runs/x",      (U, U, U, U, U, U)),
    "checkpoint_every": ("100",         (U, U, R, R, U, U)),
    "on_nonfinite":     ("stop",        (U, U, R, U, U, U)),
    "tensorboard":      (True,          (U, U, U, U, U, U)),   # the coordinator's metrics writer
    "init_from":        ("runs/x",      (U, U, U, U, U, U)),   # the coordinator's first weights
    # replicas that compute their own forward pass; L-BFGS needs float32 gradients
    "precision":        ("bf16",        (U, U, R, U, U, U)),
    # [task]: every loss and metric, in every role, comes from the task
    "task":             ("regress",     (U, U, U, U, U, U)),
    "loss":             ("l1",          (U, U, U, U, U, U)),
    "metrics":          ("mine:extra",  (U, U, U, U, U, U)),
}

COMPANIONS: dict[str, dict[str, object]] = {
    "loss": {"task": "regress"},
    "chunk_bytes": {"shard_layout": "chunks"},
    "prefetch": {"data_servers": 1},
    "split": {"partitions": 2},
    "balance": {"partitions": 2},
    "micro_batches": {"partitions": 2},
    "nesterov": {"rule": "momentum"},
    "lr_step_every": {"lr_schedule": "step"},
    "lr_gamma": {"lr_schedule": "step", "lr_step_every": 100},
}
"""Options a used option needs beside it to be valid (a refused one is refused alone)."""


def _outcome(option: str, value: object, algorithm: str, use: str) -> str | None:
    """None when validation behaves as the table says, else what went wrong."""
    given = {"algorithm": algorithm, option: value,
             **(COMPANIONS.get(option, {}) if use == U else {})}
    try:
        apply_options(JobConfig(), given).validate()
    except UserError as exc:
        line = str(exc)
        refusal = option_flag(option) in line and (
            f"means nothing for --algorithm {algorithm}" in line
            or ("works with --algorithm" in line and " only" in line))
        if use == R and refusal and "\n" not in line:
            return None
        return f"{given}: want {use}, got {line!r}"
    return None if use == U else f"{given}: want refused, but it was accepted"


def option_flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def test_every_option_is_used_or_refused_as_the_table_says(monkeypatch):
    # --device cuda is valid only where CUDA is: one GPU is faked (validation runs nothing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert tuple(ALGORITHMS) == COLUMNS, "an algorithm is missing from the table's columns"
    assert set(TABLE) == set(OPTIONS) - {"algorithm"}, (
        f"options missing from the table: {sorted(set(OPTIONS) - {'algorithm'} - set(TABLE))}; "
        f"not options: {sorted(set(TABLE) - set(OPTIONS))}")
    wrong = []
    for option, (value, uses) in TABLE.items():
        assert value != OPTIONS[option].default, f"{option}: give a value other than its default"
        for algorithm, use in zip(COLUMNS, uses):
            problem = _outcome(option, value, algorithm, use)
            if problem:
                wrong.append(problem)
    assert not wrong, "\n".join(wrong)
