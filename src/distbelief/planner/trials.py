"""Short measured trials of a candidate, through the real launcher.

`run_trial` starts ``distbelief train`` on the candidate's config in a child
process (the command a user would run, with a throw-away run directory), reads
its ``metrics.jsonl`` as it grows, and stops the job with SIGTERM (the command
then stops every process of the job) once `seconds` of training have been
reported after the first training event, so start-up is not counted. From
the events of that window:

- samples per second: the samples reported after the first event over the
  window's length;
- loss drop per second: from `start_loss` (the untrained model's loss, the same
  for every candidate: they all start from the same seeded weights) to the mean
  training loss reported in the window's last quarter (every replica's reports
  pooled), over the window's length: statistical efficiency, what the planner
  ranks by. A run whose loss blew up and came down again gets what it ends at,
  not credit for the fall (a slope would give it that).

Blocks for start-up plus `seconds` (bounded by `startup_timeout`).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distbelief.metrics.log import read_metrics

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                  "TORCHELASTIC_RUN_ID")
"""A trial is a local job even when the planner runs as one rank of a multi-host job."""
REPORT_GRACE = 1.0
"""Seconds past the window a trial waits for the window's last report."""


def loss_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of loss against time over (time, loss) points; None under two
    distinct times.

    >>> loss_slope([(0.0, 2.0), (1.0, 1.5), (2.0, 1.0)])
    -0.5
    """
    if len({t for t, _ in points}) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    ml = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - ml) for t, v in points) / var


def window_stats(events: list[dict], seconds: float, start_loss: float | None = None) -> dict:
    """Samples/s and loss drop/s of the train events within `seconds` of the first one (see
    the module docstring); `start_loss` None: the first report's loss."""
    train = [e for e in events if e.get("event") == "train" and e.get("loss") is not None]
    if not train:
        return {"samples_per_second": 0.0, "loss_drop_per_second": None, "events": 0,
                "window_seconds": 0.0}
    t0 = train[0]["time"]
    window = [e for e in train if e["time"] <= t0 + seconds]
    span = window[-1]["time"] - t0
    samples = sum(e.get("samples", 0) for e in window[1:])
    last = [e["loss"] for e in window if e["time"] >= t0 + 0.75 * span] or [window[-1]["loss"]]
    end_loss = sum(last) / len(last)
    start = window[0]["loss"] if start_loss is None else start_loss
    slope = loss_slope([(e["time"], e["loss"]) for e in window])
    finite = math.isfinite(end_loss)
    return {"samples_per_second": samples / span if span > 0 else None,
            "loss_drop_per_second": ((start - end_loss) / span if span > 0 and len(window) > 1
                                     and finite else None),
            "events": len(window), "window_seconds": span, "start_loss": start,
            "end_loss": end_loss if finite else None,
            "loss_slope": slope, "first_loss": window[0]["loss"]}


def run_trial(config_toml: str, seconds: float, *, log_every: int | None = None,
              start_loss: float | None = None, startup_timeout: float = 60.0,
              keep_dir: Path | None = None) -> dict:
    """Train `config_toml` (a TOML text) for about `seconds` after its first report; the
    window's statistics plus "status": "ok", "failed" (with the command's last words) or
    "no start" (nothing reported within `startup_timeout`)."""
    with tempfile.TemporaryDirectory(prefix="distbelief-trial-") as tmp:
        root = keep_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = root / "trial.toml"
        config.write_text(config_toml)
        run_dir = root / "run"
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        cmd = [sys.executable, "-m", "distbelief.cli", "train", str(config), "--quiet",
               "--run-dir", str(run_dir)]
        if log_every is not None:  # (an algorithm that reports every iteration takes none)
            cmd += ["--log-every", str(log_every)]
        started = time.monotonic()
        with open(root / "trial.log", "w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                status = _follow(proc, run_dir / "metrics.jsonl", seconds, startup_timeout)
            finally:
                _stop(proc)
            log.seek(0)
            tail = log.read().strip().splitlines()[-1:] or [""]
        events = _read_events(run_dir / "metrics.jsonl")
        stats = window_stats(events, seconds, start_loss)
        if status == "exited" and proc.returncode not in (0, None) and stats["events"] < 2:
            status = "failed"
        stats["status"] = "ok" if status in ("window", "exited") else status
        stats["wall_seconds"] = time.monotonic() - started
        if stats["status"] != "ok":
            stats["error"] = tail[0]
        return stats


def _follow(proc: subprocess.Popen, metrics: Path, seconds: float, startup_timeout: float) -> str:
    """Wait until the window is full ("window"), the job ended ("exited") or nothing was
    reported within the start-up timeout ("no start")."""
    deadline = time.monotonic() + startup_timeout
    first_seen = None
    while True:
        if proc.poll() is not None:
            return "exited"
        events = _read_events(metrics)
        train = [e for e in events if e.get("event") == "train"]
        now = time.monotonic()
        if train and first_seen is None:
            first_seen = now
        if train and train[-1]["time"] - train[0]["time"] >= seconds:
            return "window"
        if first_seen is not None and now - first_seen >= seconds + REPORT_GRACE:
            return "window"  # a candidate that reports seldom (a long L-BFGS iteration)
        if first_seen is None and now > deadline:
            return "no start"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (the command stops its job's processes), then SIGKILL the whole session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this trial's processes
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_events(path: Path) -> list[dict]:
    """The run's metrics so far (none before the job has written any)."""
    return read_metrics(path) if path.is_file() else []
