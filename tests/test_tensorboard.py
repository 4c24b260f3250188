"""``--tensorboard``: the run's metrics as TensorBoard event files under RUN_DIR/tensorboard.

Two short real jobs (Downpour, and ADMM for its "round" events) are read back with
TensorBoard's own EventAccumulator and compared, tag by tag, with metrics.jsonl: the
same steps and the float32 of the same values, nothing missing and nothing extra.
Without the tensorboard package the option is refused before anything starts.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import distbelief
from distbelief import cli
from distbelief.errors import UserError
from distbelief.job import JobConfig, apply_options, load_config
from distbelief.metrics.log import MetricsLog, read_metrics
from distbelief.metrics.tensorboard import TensorBoardLog, scalars


REFUSAL = ("--tensorboard needs the tensorboard package: "
           "pip install 'distbelief[tensorboard]'")

# the numeric fields each event kind carries, written by hand from the writers
# (metrics.report.Reporter, watch.maybe_evaluate, admm.rounds): tag EVENT/FIELD[/replica_R]
FIELDS = {"train": ("loss", "nonfinite", "samples", "samples_per_second", "staleness"),
          "eval": ("test_loss", "test_accuracy"),
          "round": ("step", "rho", "primal", "dual", "rho_from")}


def read_board(log_dir: Path):
    """TensorBoard's own reader of the event files in `log_dir` (one file, no subfolder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.parent for p in log_dir.rglob("events.out.tfevents.*")] == [log_dir]
    return EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def expected_scalars(events: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, float32 value, event time), ...]} as metrics.jsonl says they should be."""
    want: dict[str, list[tuple[int, float, float]]] = {}

    def add(tag: str, step: int, value, time: float) -> None:
        if value is not None:
            want.setdefault(tag, []).append((step, float(np.float32(value)), time))

    for e in events:
        kind = e["event"]
        if kind not in FIELDS:
            continue
        step = e["round"] if kind == "round" else e["step"]
        whose = f"/replica_{e['replica']}" if e.get("replica") is not None else ""
        for name in FIELDS[kind]:
            add(f"{kind}/{name}{whose}", step, e.get(name), e["time"])
        for s, version in enumerate(e.get("versions") or []):
            add(f"train/versions/shard_{s}{whose}", step, version, e["time"])
        for k, residual in enumerate(e.get("boundary") or []):
            add(f"round/boundary/{k}", step, residual, e["time"])
    return want


def assert_board_matches_metrics(run_dir: Path):
    events = read_metrics(run_dir / "metrics.jsonl")
    board = read_board(run_dir / "tensorboard")
    want = expected_scalars(events)
    assert sorted(board.Tags()["scalars"]) == sorted(want)
    offsets = []
    for tag, points in want.items():
        got = board.Scalars(tag)
        assert [(s.step, s.value) for s in got] == [(step, v) for step, v, _ in points], tag
        offsets += [s.wall_time - t for s, (_, _, t) in zip(got, points)]
    # wall time: the job's start (one offset for all) plus the event's time
    assert max(offsets) - min(offsets) < 1e-3
    config = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert config == "```toml\n" + (run_dir / "config.toml").read_text() + "\n```"
    return board


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Downpour run (staleness, shard versions, evaluations) and an ADMM run ("round"
    events), both with --tensorboard."""
    root = tmp_path_factory.mktemp("board")
    downpour = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=2, steps=30,
                                log_every=10, eval_every=20, tensorboard=True,
                                run_dir=str(root / "downpour"))
    admm = distbelief.train(algorithm="admm", dataset="digits", model="linear", replicas=2,
                            shards=1, steps=30, local_steps=10, tensorboard=True,
                            run_dir=str(root / "admm"))
    return {"downpour": Path(downpour["run_dir"]), "admm": Path(admm["run_dir"])}


def test_downpour_scalars_equal_the_metrics_file(runs):
    board = assert_board_matches_metrics(runs["downpour"])
    tags = board.Tags()["scalars"]
    for r in (0, 1):
        assert len(board.Scalars(f"train/loss/replica_{r}")) == 3  # steps 10, 20, 30
        assert f"train/staleness/replica_{r}" in tags
        assert f"train/versions/shard_1/replica_{r}" in tags
    assert [s.step for s in board.Scalars("eval/test_accuracy")][-1] == 30
    assert load_config(runs["downpour"] / "config.toml").train.tensorboard is True


def test_admm_rounds_give_residuals_by_round(runs):
    board = assert_board_matches_metrics(runs["admm"])
    rounds = [e for e in read_metrics(runs["admm"] / "metrics.jsonl") if e["event"] == "round"]
    assert [s.step for s in board.Scalars("round/dual")] == [1, 2, 3]
    assert [s.step for s in board.Scalars("round/rho")] == [e["round"] for e in rounds]
    # the last round's primal residual is never measured (None): no point for it
    assert [s.step for s in board.Scalars("round/primal")] == [
        e["round"] for e in rounds if e["primal"] is not None]


def test_no_writer_thread_is_left_behind(runs):
    assert not [t for t in threading.enumerate() if "AsyncWriter" in type(t).__name__]


def test_tensorboard_is_off_by_default():
    assert JobConfig().train.tensorboard is False


def test_a_synthetic_round_event_round_trips(tmp_path):
    """A dual-layers ADMM round (boundary residuals) and Sandblaster's replica-less train
    event, written and read back; NaN stays NaN; events without a step give nothing."""
    events = [
        {"event": "replica_joined", "time": 0.5, "replica": 0},
        {"event": "round", "time": 1.25, "round": 4, "step": 40, "rho": 0.1, "primal": 0.3,
         "dual": 1e-7, "members": [0, 1], "boundary": [0.01, 2.5e-3], "rho_from": 0.05},
        {"event": "train", "time": 2.0, "replica": None, "step": 3, "total_steps": 9,
         "loss": math.nan, "samples": 64, "samples_per_second": 1234.5, "workers": 2},
        {"event": "eval", "time": 3.0, "step": 3, "test_loss": 0.2, "test_accuracy": 0.9,
         "final": True},
    ]
    with TensorBoardLog(tmp_path / "tb", start_time=1000.0, config="a = 1\n") as board:
        for e in events:
            board.write(e)
    acc = read_board(tmp_path / "tb")
    got = {tag: [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)]
           for tag in acc.Tags()["scalars"]}
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    assert {t: v for t, v in got.items() if t != "train/loss"} == {
        "round/step": [(4, 40.0, 1001.25)], "round/rho": [(4, f32(0.1), 1001.25)],
        "round/primal": [(4, f32(0.3), 1001.25)], "round/dual": [(4, f32(1e-7), 1001.25)],
        "round/boundary/0": [(4, f32(0.01), 1001.25)],
        "round/boundary/1": [(4, f32(2.5e-3), 1001.25)],
        "round/rho_from": [(4, f32(0.05), 1001.25)],
        "train/samples": [(3, 64.0, 1002.0)], "train/samples_per_second": [(3, 1234.5, 1002.0)],
        "train/workers": [(3, 2.0, 1002.0)],
        "eval/test_loss": [(3, f32(0.2), 1003.0)], "eval/test_accuracy": [(3, f32(0.9), 1003.0)]}
    (step, loss, _), = got["train/loss"]
    assert step == 3 and math.isnan(loss)
    assert scalars(events[0]) == []


def test_metrics_log_mirrors_every_event_and_closes_its_mirrors(tmp_path):
    class Mirror:
        def __init__(self):
            self.events, self.state = [], "new"

        def __enter__(self):
            self.state = "open"
            return self

        def __exit__(self, *exc):
            self.state = "closed"

        def write(self, event):
            self.events.append(event)

    mirror = Mirror()
    with pytest.raises(RuntimeError), MetricsLog(tmp_path / "m.jsonl", mirrors=[mirror]) as log:
        assert mirror.state == "open"
        log.write({"event": "eval", "time": 1.0, "step": 2, "test_accuracy": 0.5})
        raise RuntimeError("the job failed")
    assert mirror.state == "closed"
    assert mirror.events == read_metrics(tmp_path / "m.jsonl")


@pytest.fixture
def without_tensorboard(monkeypatch):
    """importlib.util.find_spec answers None for the tensorboard package only."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "tensorboard" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_without_the_package_validation_refuses_in_one_line(without_tensorboard):
    with pytest.raises(UserError) as refused:
        apply_options(JobConfig(), {"tensorboard": True}).validate()
    assert str(refused.value) == REFUSAL
    apply_options(JobConfig(), {"tensorboard": False}).validate()  # off: nothing needed


def test_without_the_package_the_command_exits_2_before_starting(without_tensorboard, tmp_path,
                                                                 monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
    try:
        code = cli.main(["train", "--dataset", "digits", "--model", "mlp", "--quiet",
                         "--steps", "5", "--run-dir", "run", "--tensorboard"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"distbelief: error: {REFUSAL}\n"
    assert not (tmp_path / "run").exists()
