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
          resume: str | Path | None = None, strategy: str = "manual",
          trials: int | None = None, trial_seconds: float | None = None,
          **options: Any) -> dict | None:
    """Run a job and return its summary (a dict, also written to RUN_DIR/summary.json).

    `config` is a JobConfig, a nested dict as in the TOML file, or a TOML path;
    `options` override it with the command line's names (replicas=2, lr=0.1,
    model=my_factory, ...). Blocks until the job ends. When this process was
    started as one role of a multi-host job (RANK/WORLD_SIZE set) and is not the
    coordinator, it runs that role and returns None. Such a job needs the same secret
    token on every host (``token_file=`` or DISTBELIEF_TOKEN): UserError without one.

    `resume` continues the run in that directory from its last complete checkpoint,
    with its own config (no other config or options may be given).

    ``strategy="auto"`` first plans (`plan`: profile, predict, short trials) and trains
    with the choice; the options given (and the config file's settings) are kept, the
    planner chooses only the rest, and ``summary["plan"]`` records the plan. `trials` and
    `trial_seconds` are the planner's (default 3 trials of 4 s; see `plan`).

    Raises UserError for bad input and coordinator.JobFailed when the job cannot finish.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}: "
                        "give manual (the options as given) or auto (planned)")
    if strategy != "auto" and (trials is not None or trial_seconds is not None):
        raise UserError(f"--{'trials' if trials is not None else 'trial-seconds'} is for "
                        "--strategy auto, which plans with trials: add --strategy auto or "
                        "leave it out")
    if strategy == "auto" and resume is not None:
        raise UserError("--strategy auto plans a new run, but --resume continues one with its "
                        "own config: leave --strategy out")
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
    planned = None
    if strategy == "auto":
        from distbelief.runtime.launch import EnvRole

        if EnvRole.detect(token_file=cfg.cluster.token_file) is not None:
            raise UserError("--strategy auto plans on one host, but this process is one rank of "
                            "a multi-host job (RANK/WORLD_SIZE set), where every rank must run "
                            "the same config: run 'distbelief plan --hosts H' first and give "
                            "every host the plan.toml it writes")
        from distbelief.planner import make_plan

        plan_ = make_plan(cfg, given_fields(config, options),
                          trials=3 if trials is None else trials,
                          trial_seconds=4.0 if trial_seconds is None else trial_seconds,
                          message=_printer(show_progress))
        cfg, planned = plan_.choice.config, plan_.to_dict()
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
    return run_job(cfg, show_progress=show_progress, env=env, resume=resume, plan=planned)


STRATEGIES = ("manual", "auto")


def plan(config: JobConfig | dict | str | Path | None = None, *, trials: int = 3,
         trial_seconds: float = 4.0, hosts: int | None = None,
         cores_per_host: int | None = None, memory_per_host: str | int | None = None,
         link_bandwidth: str | float | None = None, output: str | Path | None = None,
         show_progress: bool = False, **options: Any) -> dict:
    """Choose how to run a job on this host (or on `hosts` hosts described by the other
    arguments) and return the plan as a dict (also written to OUTPUT/plan.json, with the
    chosen config as OUTPUT/plan.toml when `output` is given).

    `config` and `options` are as for `train`; the options given are kept and the planner
    chooses the rest: the algorithm, replicas, shards, partitions and split, data servers
    and the algorithm's own cadence. `trials`: candidates tried for `trial_seconds` each
    (0: choose by the cost model alone). Started as one rank of a multi-host job
    (RANK/WORLD_SIZE and the job's token set, on every host), it first measures the hosts
    and the links between them; rank 0 plans for them, every other rank returns
    ``{"role": "peer", "rank": r}``. Example::

        plan = distbelief.plan(dataset="mnist1d", model="cnn", output="plan")
        distbelief.train("plan/plan.toml")
    """
    from distbelief.planner import Hardware, host_commands, make_plan, parse_bandwidth, parse_memory
    from distbelief.planner.plan import minimal_toml, plan_table

    cfg = resolve_config(config, options)
    from distbelief.runtime.launch import EnvRole

    env = EnvRole.detect(token_file=cfg.cluster.token_file)
    if env is not None:  # every host runs the planner: measure them, rank 0 plans
        given = [n for n, v in (("hosts", hosts), ("cores-per-host", cores_per_host),
                                ("memory-per-host", memory_per_host),
                                ("link-bandwidth", link_bandwidth)) if v is not None]
        if given:
            raise UserError(f"--{given[0]} describes hosts that are not here, but this process "
                            "is one rank of a multi-host job (RANK/WORLD_SIZE set), whose hosts "
                            f"are measured: leave --{given[0]} out, or plan outside the job")
        from distbelief.planner.hosts import measure_between_hosts

        _ = env.token  # refused before connecting without the job's secret token
        _choose_gloo_interface(env.master_addr)
        try:
            measured = measure_between_hosts(env, timeout=cfg.cluster.timeout)
        except TimeoutError as exc:
            raise UserError(f"{exc} (after {cfg.cluster.timeout:g} s): start 'distbelief plan' "
                            "with the same rank variables on every host") from None
        if measured is None:
            return {"role": "peer", "rank": env.rank}
        hardware = measured
    else:
        hardware = None
    hardware = hardware or Hardware.measure(
        hosts=hosts, cores_per_host=cores_per_host,
        memory_per_host=(parse_memory(memory_per_host) if isinstance(memory_per_host, str)
                         else memory_per_host),
        link_bandwidth=(parse_bandwidth(link_bandwidth) if isinstance(link_bandwidth, str)
                        else link_bandwidth))
    result = make_plan(cfg, given_fields(config, options), hardware=hardware, trials=trials,
                       trial_seconds=trial_seconds, message=_printer(show_progress))
    data = result.to_dict()
    data["table"] = plan_table(result)
    config_file = str(Path(output) / "plan.toml") if output is not None else "plan.toml"
    data["commands"] = (host_commands(result.choice.config, hardware, config_file)
                        if hardware.hosts > 1 else
                        [f"distbelief train {config_file}"])
    if output is not None:
        import json

        from distbelief.rundir import write_text_atomic

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "plan.toml", minimal_toml(result.choice.config))
        write_text_atomic(out / "plan.json", json.dumps(data, indent=2, default=str) + "\n")
        data["files"] = [str(out / "plan.json"), str(out / "plan.toml")]
    return data


def given_fields(config: JobConfig | dict | str | Path | None, options: dict[str, Any]
                 ) -> set[str]:
    """The config fields ("section.field", or "algorithm") the user set: the options given
    and the settings of the config (a file's or dict's keys; a JobConfig's non-defaults)."""
    from distbelief.job import OPTION_FIELDS, load_raw

    fixed = {OPTION_FIELDS[k] for k, v in options.items() if v is not None and k in OPTION_FIELDS}
    if config is None:
        return fixed
    if isinstance(config, JobConfig):
        data, default = config.to_dict(), JobConfig().to_dict()
        for section, values in data.items():
            if not isinstance(values, dict):
                if values != default[section]:
                    fixed.add(section)
                continue
            fixed |= {f"{section}.{k}" for k, v in values.items() if v != default[section][k]}
        return fixed
    raw = config if isinstance(config, dict) else load_raw(config)
    for section, values in raw.items():
        if isinstance(values, dict):
            fixed |= {f"{section}.{k}" for k in values}
        else:
            fixed.add(section)
    return fixed


def _printer(show: bool):
    import sys

    return (lambda line: print(f"distbelief plan: {line}", file=sys.stderr)) if show else \
        (lambda line: None)


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

