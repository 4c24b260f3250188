"""Tests for distbelief.metrics.plot: run labels and loss/accuracy figures."""

import json

import pytest

from distbelief.errors import UserError
from distbelief.metrics.plot import figure_runs, plot_run, plot_runs, run_label


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


def expected_curves(run_dir, replicas):
    """(times, losses, eval times, accuracies) as the figure must draw them, computed from
    metrics.jsonl here: each loss the mean of the run's last `replicas` train reports."""
    events = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # the partial last line
            pass
    train = sorted((e for e in events if e["event"] == "train"), key=lambda e: e["time"])
    raw = [e["loss"] for e in train]
    losses = [sum(raw[max(0, i + 1 - replicas):i + 1]) / len(raw[max(0, i + 1 - replicas):i + 1])
              for i in range(len(raw))]
    evals = sorted((e for e in events if e["event"] == "eval"), key=lambda e: e["time"])
    return ([e["time"] for e in train], losses,
            [e["time"] for e in evals], [e["test_accuracy"] for e in evals])


def test_plot_two_runs(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", lr=0.1, replicas=3, partial_last_line=True)]
    out = plot_runs(runs, tmp_path / "figs" / "compare.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = figure_runs(runs)
    ax_loss, ax_acc = fig.axes
    assert [line.get_label() for line in ax_loss.lines] == [run_label(r) for r in runs]
    assert [line.get_label() for line in ax_acc.lines] == [run_label(r) for r in runs]
    assert run_label(runs[0]) != run_label(runs[1])
    for run, replicas, loss_line, acc_line in zip(runs, (2, 3), ax_loss.lines, ax_acc.lines):
        times, losses, eval_times, accuracies = expected_curves(run, replicas)
        assert len(times) == 5 * replicas  # every train report, none of the other events
        assert list(loss_line.get_xdata()) == pytest.approx(times)
        assert list(loss_line.get_ydata()) == pytest.approx(losses)
        assert list(acc_line.get_xdata()) == pytest.approx(eval_times)
        assert list(acc_line.get_ydata()) == pytest.approx(accuracies)
        assert loss_line.get_color() == acc_line.get_color()  # one colour per run
    assert ax_loss.lines[0].get_color() != ax_loss.lines[1].get_color()
    assert ax_loss.get_yscale() == "log"
    assert [t.get_text() for t in ax_acc.get_legend().get_texts()] == [run_label(r) for r in runs]


def test_one_replica_loss_line_is_the_train_losses(tmp_path):
    run = make_run(tmp_path / "a", replicas=1)
    [loss_line] = figure_runs([run]).axes[0].lines
    assert list(loss_line.get_ydata()) == pytest.approx([2.0 / step for step in range(1, 6)])
    assert list(loss_line.get_xdata()) == pytest.approx([1, 2, 3, 4, 5])


def test_equal_labels_get_the_directory_name(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b")]
    labels = [line.get_label() for line in figure_runs(runs).axes[0].lines]
    assert labels == [f"{run_label(runs[0])} (a)", f"{run_label(runs[1])} (b)"]


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
