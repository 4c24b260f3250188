"""Choosing the strategy: profile, enumerate, predict, try, choose.

`make_plan(cfg, fixed)` is what ``distbelief plan`` and ``--strategy auto`` run:

1. profile the model and data on this host (`profile`), and take the hardware
   measured here or given (`links.Hardware`);
2. enumerate every layout the registry's algorithms accept (`candidates`), and
   drop those whose processes do not fit in a host's memory;
3. predict each one's samples/s (`cost.predict`), keep each algorithm's
   fastest layout, and shortlist those, fastest first;
4. run `trials` of the shortlist for `trial_seconds` each through the real
   launcher (`trials`), fastest predicted first but alternating between
   synchronous and asynchronous candidates (`trial_order`), and choose the one
   whose training loss fell fastest per second (statistical efficiency, which no
   cost model of samples/s sees); without trials (or for hosts not here), the
   fastest predicted.

The cost model prunes within an algorithm (replicas, shards, partitions,
cadence), where samples/s decides; the trials decide between algorithms, where
what a sample is worth differs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from distbelief.errors import UserError
from distbelief.job import JobConfig
from distbelief.planner.candidates import Candidate, enumerate_candidates
from distbelief.planner.cost import predict
from distbelief.planner.links import Hardware
from distbelief.planner.profile import Profile, profile_job

TRIAL_STEPS = 1_000_000
"""More steps (or iterations) than any trial's window needs: a trial is stopped, not finished."""
LOG_SECONDS = 0.1
"""A trial's replicas report about this often (--log-every from the predicted step time)."""


@dataclass
class Plan:
    hardware: Hardware
    profile: Profile
    candidates: list[Candidate]
    """Every feasible candidate, best predicted first."""
    shortlist: list[Candidate]
    choice: Candidate
    why: str
    trial_seconds: float
    fixed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "choice": _row(self.choice), "why": self.why,
            "config": self.choice.config.to_dict(),
            "shortlist": [_row(c) for c in self.shortlist],
            "candidates": [_row(c) for c in self.candidates],
            "fixed": self.fixed, "trial_seconds": self.trial_seconds,
            "hardware": self.hardware.to_dict(), "profile": self.profile.to_dict(),
            "planning_seconds": self.seconds,
        }


def _row(c: Candidate) -> dict:
    p = c.prediction
    return {"name": c.name, "algorithm": c.algorithm, "options": c.options, "notes": c.notes,
            "predicted_samples_per_second": p.samples_per_second,
            "predicted_step_seconds": p.step_seconds,
            "predicted_memory_per_process": p.memory_per_process,
            "predicted_memory_per_host": p.memory_per_host,
            "bottleneck": p.bottleneck, "step_parts": p.parts, "measured": c.measured}


def make_plan(cfg: JobConfig, fixed: set[str], *, hardware: Hardware | None = None,
              trials: int = 3, trial_seconds: float = 4.0,
              message: Callable[[str], None] = lambda s: None) -> Plan:
    """Choose the layout and algorithm for `cfg` (see the module docstring). `fixed`: the
    config fields the user set ("section.field", or "algorithm"), which stay as they are.

    Raises UserError when nothing fits (e.g. a model larger than a host's memory).
    """
    began = time.monotonic()
    if trials < 0:
        raise UserError(f"--trials {trials}: give 0 (choose by prediction alone) or more")
    if trial_seconds <= 0:
        raise UserError(f"--trial-seconds {trial_seconds:g}: give a positive number of seconds")
    cfg = cfg.validate()
    if cfg.cluster.device != "cpu":
        raise UserError(f"--device {cfg.cluster.device}: the planner profiles the model on this "
                        "host's CPU and has no cost model of GPUs yet: plan without --device, or "
                        "choose the layout by hand")
    hardware = hardware or Hardware.measure()
    message(f"profiling the model and data on this host ({hardware.cores_per_host} cores)")
    profile = profile_job(cfg, hardware.cores_per_host)
    check_fixed(cfg, fixed, profile)
    candidates = enumerate_candidates(cfg, fixed, profile, hardware)
    if not candidates:
        raise UserError("no algorithm accepts this job with the options given: "
                        "leave some options out (or give --algorithm) and plan again")
    for c in candidates:
        c.prediction = predict(c.layout, profile, hardware)
    fits = [c for c in candidates if c.prediction.memory_per_host <= hardware.memory_per_host]
    if not fits:
        smallest = min(candidates, key=lambda c: c.prediction.memory_per_host)
        raise UserError(
            f"the job does not fit in memory: its smallest layout ({smallest.name}) needs "
            f"{_gib(smallest.prediction.memory_per_host)} on a host, which has "
            f"{_gib(hardware.memory_per_host)}: give more --hosts (or --memory-per-host), "
            "a smaller model or batch, or --partitions to cut the model")
    fits.sort(key=lambda c: -c.prediction.samples_per_second)
    shortlist = _best_per_algorithm(fits)
    message(f"{len(candidates)} candidates, {len(fits)} fit in memory; shortlist: "
            + ", ".join(c.name for c in shortlist))
    tried = []
    for c in trial_order(shortlist) if hardware.hosts == 1 else []:
        if len(tried) == trials:
            break
        reason = untriable(c, profile, trial_seconds)
        if reason:
            c.notes.append(reason)
            message(f"no trial for {c.name}: {reason}")
            continue
        message(f"trial: {c.name} for {trial_seconds:g} s")
        c.measured = trial(c, trial_seconds, profile.initial_loss)
        tried.append(c)
    choice, why = choose(shortlist, tried, hardware)
    return Plan(hardware=hardware, profile=profile, candidates=fits, shortlist=shortlist,
                choice=choice, why=why, trial_seconds=trial_seconds, fixed=sorted(fixed),
                seconds=time.monotonic() - began)


def untriable(c: Candidate, profile: Profile, seconds: float) -> str | None:
    """Why a trial of `seconds` could not measure `c` (None: it can): an algorithm that
    reports once per pass over the data needs two reports in the window."""
    if not c.layout.exchange.full_batch:
        return None
    iteration = profile.train_samples / max(c.prediction.samples_per_second, 1e-9)
    if 2 * iteration > seconds:
        return (f"a pass over the {profile.train_samples:,} samples takes about "
                f"{iteration:.1f} s, and a trial of {seconds:g} s needs two")
    return None


def check_fixed(cfg: JobConfig, fixed: set[str], profile: Profile) -> None:
    """UserError for a fixed option the model cannot take (before any candidate is built)."""
    k = cfg.model.partitions
    if "model.partitions" in fixed and k > 1:
        if not profile.sequential:
            raise UserError(f"--partitions {k} needs the model to be an nn.Sequential: leave "
                            "--partitions out and the planner keeps the model whole")
        if k > profile.layers_with_parameters and cfg.model.split == "layers":
            raise UserError(f"--partitions {k} is more than the model's "
                            f"{profile.layers_with_parameters} layers with parameters: give at "
                            f"most {profile.layers_with_parameters}, or leave --partitions out")


def minimal_toml(cfg: JobConfig) -> str:
    """The config's settings that differ from the defaults, as TOML (the algorithm always)."""
    import tomli_w

    data, default = cfg.to_dict(), JobConfig().to_dict()
    out: dict = {"algorithm": data.pop("algorithm")}
    default.pop("algorithm")
    for section, values in data.items():
        changed = {k: v for k, v in values.items() if v != default[section][k] and v is not None}
        if changed:
            out[section] = changed
    return tomli_w.dumps(out)


def trial(c: Candidate, seconds: float, start_loss: float | None = None) -> dict:
    """Run one candidate's trial (see `trials.run_trial`); `start_loss`: the untrained
    model's loss (`Profile.initial_loss`), where every candidate starts."""
    from distbelief.planner.trials import run_trial

    from distbelief.algorithms.registry import get_algorithm

    log_every = None
    if "train.log_every" in get_algorithm(c.algorithm).honours:
        log_every = max(1, round(LOG_SECONDS / max(c.prediction.step_seconds, 1e-6)))
    return run_trial(trial_config(c.config), seconds, log_every=log_every,
                     start_loss=start_loss)


def trial_config(cfg: JobConfig) -> str:
    """The TOML a trial trains: the candidate's config with more steps than any window needs
    and no periodic evaluation or checkpoint (the trial is stopped, not finished)."""
    data = cfg.to_dict()
    data["train"].update(steps=TRIAL_STEPS, epochs=None, eval_every=0, checkpoint_every=None,
                         run_dir=None)
    return JobConfig.from_dict(data).to_toml()


def trial_order(shortlist: list[Candidate]) -> list[Candidate]:
    """The shortlist in the order to try it: fastest predicted first, alternating between
    candidates whose steps wait for the others (synchronous: sync, ADMM's rounds) and those
    that run on their own (asynchronous), so that a few trials see both. What a sample is
    worth differs most between the two, and the cost model sees only samples/s."""
    waits = [c for c in shortlist if c.layout.exchange.quorum]
    free = [c for c in shortlist if not c.layout.exchange.quorum]
    first, second = (waits, free) if waits and shortlist[0] is waits[0] else (free, waits)
    order = []
    for i in range(max(len(first), len(second))):
        order += [group[i] for group in (first, second) if i < len(group)]
    return order


def _best_per_algorithm(ranked: list[Candidate]) -> list[Candidate]:
    seen, best = set(), []
    for c in ranked:
        if c.algorithm not in seen:
            seen.add(c.algorithm)
            best.append(c)
    return best


def choose(shortlist: list[Candidate], tried: list[Candidate], hardware: Hardware
           ) -> tuple[Candidate, str]:
    """The candidate to train and one sentence of why."""
    measured = [c for c in tried if c.measured and c.measured["status"] == "ok"
                and c.measured["loss_drop_per_second"] is not None]
    if measured:
        best = max(measured, key=lambda c: (c.measured["loss_drop_per_second"],
                                            c.measured["samples_per_second"] or 0.0))
        others = [c for c in measured if c is not best]
        m = best.measured
        why = (f"{best.name}: its training loss fell fastest in the trials "
               f"({m['loss_drop_per_second']:.3g}/s at {m['samples_per_second'] or 0:,.0f} "
               "samples/s")
        if others:
            runner = max(others, key=lambda c: c.measured["loss_drop_per_second"])
            why += f"; next {runner.name} at {runner.measured['loss_drop_per_second']:.3g}/s"
        return best, why + ")"
    best = shortlist[0]
    reason = ("no trial ran" if not tried else "no trial reported a falling loss")
    if hardware.hosts > 1:
        reason = f"trials run on one host and this plan is for {hardware.hosts}"
    p = best.prediction
    return best, (f"{best.name}: the fastest predicted ({p.samples_per_second:,.0f} samples/s, "
                  f"bound by {p.bottleneck}); chosen on the cost model alone as {reason}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def host_commands(cfg: JobConfig, hardware: Hardware, config_file: str,
                  master: str = "HOST0", port: int = 29500) -> list[str]:
    """For a plan over several hosts: the command each host runs (its ranks, one process
    each, the coordinator on the first host). World size 1 + S + R*K."""
    from distbelief.algorithms.registry import get_algorithm

    algorithm = get_algorithm(cfg.algorithm)
    resolved = cfg.resolved()
    shards = resolved.cluster.shards if algorithm.parameters == "served" else 0
    world = 1 + shards + algorithm.replicas(resolved) * resolved.model.partitions
    per_host = math.ceil(world / hardware.hosts)
    commands = []
    for h in range(hardware.hosts):
        ranks = range(h * per_host, min(world, (h + 1) * per_host))
        if not ranks:
            continue
        procs = " & ".join(
            f"RANK={r} distbelief train {config_file} --token-file ~/.distbelief-token"
            for r in ranks)
        commands.append(f"# host {h}: ranks {ranks[0]}..{ranks[-1]}\n"
                        f"export MASTER_ADDR={master} MASTER_PORT={port} WORLD_SIZE={world}; "
                        f"{procs}{' & wait' if len(ranks) > 1 else ''}")
    return commands


def plan_table(plan: Plan, limit: int = 12) -> str:
    """The plan as a text table: the shortlist (tried ones with their measurements), then the
    next best predicted candidates, then the choice and why."""
    rows = [("candidate", "pred. samples/s", "meas. samples/s", "loss drop/s", "memory/proc",
             "bound by")]
    shown = list(plan.shortlist)
    shown += [c for c in plan.candidates if c not in shown][:max(0, limit - len(shown))]
    for c in shown:
        p, m = c.prediction, c.measured or {}
        measured = (f"{m['samples_per_second']:,.0f}" if m.get("samples_per_second") is not None
                    else m.get("status", "-") if m.get("status") != "ok" else "1 report")
        drop = m.get("loss_drop_per_second")
        rows.append((("* " if c is plan.choice else "  ") + c.name,
                     f"{p.samples_per_second:,.0f}", measured,
                     f"{drop:.3g}" if drop is not None else "-",
                     f"{p.memory_per_process / 2**20:,.0f} MiB", p.bottleneck))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    more = len(plan.candidates) - len(shown)
    if more > 0:
        lines.append(f"  ... and {more} more candidates (plan.json lists them all)")
    lines.append(f"chosen: {plan.why}")
    return "\n".join(lines)
