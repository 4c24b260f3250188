"""The Python API: `train` a job and `load_model` from a run directory.

Example::

    import distbelief
    summary = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=2, steps=300)
    model = distbelief.load_model(summary["run_dir"])

A model factory or dataset factory may be given as a function instead of a
"module:function" string; it must be defined at the top level of an importable
module or of the script being run, because every role process imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distbelief.job import JobConfig, apply_options, load_config
from distbelief.errors import UserError

if TYPE_CHECKING:
    from torch import nn


def train(config: JobConfig | dict | str | Path | None = None, *, show_progress: bool = False,
          resume: str | Path | None = None, **options: Any) -> dict | None:
    """Run a job and return its summary (a dict, also written to RUN_DIR/summary.json).

    `config` is a JobConfig, a nested dict as in the TOML file, or a TOML path;
    `options` override it with the command line's names (replicas=2, lr=0.1,
    model=my_factory, ...). Blocks until the job ends. When this process was
    started as one role of a multi-host job (RANK/WORLD_SIZE set) and is not the
    coordinator, it runs that role and returns None. Such a job needs the same secret
    token on every host (``token_file=`` or DISTBELIEF_TOKEN): UserError without one.

    `resume` continues the run in that directory from its last complete checkpoint,
    with its own config (no other config or options may be given).

    Raises UserError for bad input and coordinator.JobFailed when the job cannot finish.
    """
    if resume is not None:
        given = sorted(k for k, v in options.items() if v is not None)
        if config is not None or given:
            raise UserError(f"--resume continues a run with its own config, but "
                            f"{', '.join('--' + g.replace('_', '-') for g in given) or 'a config file'}"
                            " was given too: leave the other options out")
        saved = Path(resume) / "config.toml"
        if not saved.is_file():
            raise UserError(f"--resume {str(resume)!r}: not a run directory (no config.toml): "
                            "give the directory a train run printed")
        config = saved
    cfg = resolve_config(config, options)
    from distbelief.runtime.launch import EnvRole, read_token_file
    from distbelief.runtime.zygote import prestart

    env = EnvRole.detect(token_file=cfg.cluster.token_file)
    if env is None and cfg.cluster.token_file is not None:
        # checked as on many hosts, but a local job keeps its own random token (see the field)
        read_token_file(cfg.cluster.token_file)
    if env is None:  # a local cluster: the role launcher's imports overlap with the job's
        prestart()
    from distbelief.coordinator import check_launch, run_job

    if env is not None:
        from distbelief.algorithms.registry import get_algorithm

        check_launch(get_algorithm(cfg.algorithm), env, resume)
    if env is not None and cfg.cluster.data_servers:
        raise UserError(f"--data-servers {cfg.cluster.data_servers} needs the local launcher, "
                        "but this process was started as one rank of a multi-host job: leave "
                        "--data-servers out (augmentation still works inline)")
    if env is not None:
        role, ident, part = env.role(cfg.cluster.shards, cfg.cluster.replicas,
                                     cfg.model.partitions)
        _ = env.token  # every rank refuses a job without a secret token before it connects
        _choose_gloo_interface(env.master_addr)
        if role != "coordinator":
            from distbelief.roles import run_role
            from distbelief.runtime.store import JobStore
            store = JobStore.connect(env.master_addr, env.master_port, env.token,
                                     timeout=cfg.cluster.timeout)
            run_role(store, role, ident, part)
            return None
    return run_job(cfg, show_progress=show_progress, env=env, resume=resume)


def _choose_gloo_interface(master_addr: str) -> None:
    """Unless the user chose one, gloo binds the interface that reaches the coordinator: left
    to itself it binds what the hostname resolves to, or loopback when it resolves to nothing,
    and no peer on another host could connect."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    from distbelief.runtime.netif import interface_towards

    interface = interface_towards(master_addr)
    if interface is not None and interface != "lo":
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def resolve_config(config: JobConfig | dict | str | Path | None, options: dict[str, Any]
                   ) -> JobConfig:
    """The validated config from a base config and flat overrides."""
    if isinstance(config, JobConfig):
        base = config
    elif isinstance(config, dict):
        base = JobConfig.from_dict(config)
    else:
        base = load_config(config)
    options = {k: _as_spec(v, k) for k, v in options.items()}
    return apply_options(base, options).validate()


def load_model(run_dir: str | Path) -> nn.Module:
    """The trained model of a finished run, rebuilt from its config and checkpoint."""
    from distbelief.inference import load_model as load

    return load(run_dir)


def _as_spec(value: Any, option: str) -> Any:
    """Functions given for model/dataset become "module:function" specs the roles can import."""
    if callable(value) and option in ("model", "dataset"):
        from distbelief.plugins import callable_spec
        return callable_spec(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value

