"""Tests for distbelief.metrics.plot: run labels and loss/accuracy figures."""

import json

import pytest

from distbelief.errors import UserError
from distbelief.metrics.plot import plot_run, plot_runs, run_label


def make_run(path, *, lr=0.05, replicas=2, summary=True, partial_last_line=False):
    """Write a fake run directory with train/eval events and a summary."""
    path.mkdir(parents=True)
    events = []
    for step in range(1, 6):
        for replica in range(replicas):
            events.append({
                "event": "train", "time": step + 0.1 * replica, "replica": replica, "step": step,
                "loss": 2.0 / step, "samples_per_second": 100.0, "staleness": 1, "versions": [step, step],
            })
        events.append({"event": "eval", "time": step + 0.5, "step": step,
                       "test_loss": 2.0 / step, "test_accuracy": 0.1 * step})
    events.insert(3, {"event": "replica_lost", "time": 2.2, "replica": 1})
    text = "".join(json.dumps(e) + "\n" for e in events)
    if partial_last_line:
        text += '{"event": "train", "ti'
    (path / "metrics.jsonl").write_text(text)
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "algorithm": "downpour", "replicas": replicas, "shards": 2, "steps": 5, "wall_seconds": 6.0,
            "samples_per_second": 200.0, "final_loss": 0.4, "test_accuracy": 0.5, "replicas_lost": 1,
            "config": {"n_fetch": 1, "n_push": 3, "rule": "adagrad", "lr": lr, "batch_size": 32},
        }))
    return path


def test_run_label_has_algorithm_and_settings(tmp_path):
    run = make_run(tmp_path / "a")
    assert run_label(run) == "downpour R=2 S=2 fetch=1 push=3 adagrad lr=0.05"


def test_run_label_tolerates_missing_summary_and_config(tmp_path):
    run = make_run(tmp_path / "bare_run", summary=False)
    assert run_label(run) == "bare_run"
    (run / "summary.json").write_text(json.dumps({"algorithm": "sync", "replicas": 4}))
    assert run_label(run) == "sync R=4"
    (run / "summary.json").write_text("{not json")
    assert run_label(run) == "bare_run"


def test_plot_two_runs(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", lr=0.1, replicas=3, partial_last_line=True)]
    out = plot_runs(runs, tmp_path / "figs" / "compare.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_default_output(tmp_path):
    run = make_run(tmp_path / "a")
    assert plot_run(run) == run / "curves.png"
    assert (run / "curves.png").stat().st_size > 0


def test_plot_run_other_format(tmp_path):
    run = make_run(tmp_path / "a")
    assert plot_run(run, tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")


def test_missing_run_dir(tmp_path):
    with pytest.raises(UserError, match="is not a run directory: it has no metrics.jsonl"):
        plot_run(tmp_path / "nope")


def test_bad_suffix(tmp_path):
    run = make_run(tmp_path / "a")
    with pytest.raises(UserError, match=r"\.png"):
        plot_runs([run], tmp_path / "out.docx")


def test_corrupt_middle_line(tmp_path):
    run = make_run(tmp_path / "a")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "garbage\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(UserError, match="line 3 is not JSON"):
        plot_run(run)
