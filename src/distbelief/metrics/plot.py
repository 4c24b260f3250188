"""Plot training runs: training loss and the task's test metric against wall-clock time.

A run directory holds ``metrics.jsonl`` (one JSON event per line, each with
``"event"`` and ``"time"`` in seconds since the job started) and
``summary.json``. ``"train"`` events (``loss``) and ``"eval"`` events (the
task's headline metric, named in the summary's ``task``: ``test_accuracy``
when classifying, ``test_rmse`` for regression, ``test_perplexity`` for
sequences) are drawn, and when a run has ``"round"`` events (ADMM's)
a third panel shows their residuals by round (primal, dual, and each
boundary's of a dual-layers split); any other event is ignored. Example::

    plot_runs([Path("runs/a"), Path("runs/b")], Path("compare.png"))
    plot_run(Path("runs/a"))          # writes runs/a/curves.png
    fig = figure_runs([Path("runs/a")])  # the matplotlib Figure, to inspect or adapt

Figures are built without pyplot: no global state, nothing to close, no window
and no display needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from distbelief.errors import UserError
from distbelief.metrics.log import read_metrics


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json as a dict, or {} when it is missing or unreadable (runs still in progress)."""
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_label(run_dir: Path) -> str:
    """A short legend label from the run's summary, e.g. "downpour R=2 S=2 fetch=1 push=1 adagrad lr=0.05".

    Missing keys are left out; with no usable summary the directory name is used.
    Never raises for a missing or malformed summary.
    """
    summary = _read_summary(run_dir)
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}

    def pick(key: str) -> Any:
        return summary.get(key, config.get(key))

    parts = []
    for key, fmt in (
        ("algorithm", "{}"),
        ("replicas", "R={}"),
        ("workers", "W={}"),
        ("shards", "S={}"),
        ("n_fetch", "fetch={}"),
        ("n_push", "push={}"),
        ("sync_fraction", "F={:g}"),
        ("portions", "P={}"),
        ("rule", "{}"),
        ("lr", "lr={:g}"),
    ):
        value = pick(key)
        if value is None:
            continue
        try:
            parts.append(fmt.format(value))
        except (TypeError, ValueError):  # e.g. lr given as a string
            parts.append(f"{fmt.split('=')[0]}={value}" if "=" in fmt else str(value))
    return " ".join(parts) or Path(run_dir).name


def _read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a run that carry a wall-clock time (UserError: not a run directory)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory: it has no metrics.jsonl; "
                        "give a directory that 'distbelief train' wrote")
    return [e for e in read_metrics(path)
            if isinstance(e, dict) and isinstance(e.get("time"), (int, float))]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _loss_curve(events: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Train losses in time order, smoothed by a running mean over one report per replica."""
    train = sorted(
        (e for e in events if e.get("event") == "train" and _number(e.get("loss"))), key=lambda e: e["time"]
    )
    width = max(1, len({e.get("replica") for e in train}))
    times, losses, window = [], [], []
    for e in train:
        window.append(float(e["loss"]))
        if len(window) > width:
            window.pop(0)
        times.append(float(e["time"]))
        losses.append(sum(window) / len(window))
    return times, losses


def headline(run_dir: Path) -> str:
    """The run's headline test metric (its summary's ``task``), "accuracy" when unknown."""
    task = _read_summary(run_dir).get("task")
    name = task.get("headline") if isinstance(task, dict) else None
    return name if isinstance(name, str) else "accuracy"


def _metric_curve(events: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Eval events' ``key`` (e.g. ``test_accuracy``) in time order."""
    evals = sorted(
        (e for e in events if e.get("event") == "eval" and _number(e.get(key))),
        key=lambda e: e["time"],
    )
    return [float(e["time"]) for e in evals], [float(e[key]) for e in evals]


def _residual_curves(events: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The residuals of "round" events: {"primal": (rounds, values), "dual": ..., "boundary0": ...}."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for e in sorted((e for e in events if e.get("event") == "round"), key=lambda e: e["round"]):
        values = {"primal": e.get("primal"), "dual": e.get("dual"),
                  **{f"boundary{k}": b for k, b in enumerate(e.get("boundary") or [])}}
        for name, value in values.items():
            if _number(value) and value > 0:
                rounds, ys = curves.setdefault(name, ([], []))
                rounds.append(int(e["round"]))
                ys.append(float(value))
    return curves


def _check_format(out: Path) -> None:
    """Raises UserError unless ``out``'s suffix is a format matplotlib can save."""
    supported = FigureCanvasBase.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UserError(
            f"cannot save a plot as {str(out)!r}: use one of the suffixes "
            f"{', '.join('.' + s for s in sorted(supported))}"
        )


def figure_runs(run_dirs: list[Path]) -> Figure:
    """The figure `plot_runs` saves: training loss (left axes) and the task's headline test
    metric (right: accuracy, RMSE or perplexity) against wall-clock seconds, one line per run in each, labelled by ``run_label``.

    The loss line of a run is its train events' losses in time order, each the mean of
    the last R reports (R: the replicas that reported). Runs with equal labels get
    their directory name appended. The figure is not registered with pyplot: nothing
    needs closing.

    Raises:
        UserError: no runs given; a run directory without metrics.jsonl; a bad metrics line.
    """
    if not run_dirs:
        raise UserError("no run directories given: name at least one run to plot")
    runs = [(Path(d), _read_events(Path(d))) for d in run_dirs]
    labels = [run_label(d) for d, _ in runs]
    labels = [
        f"{label} ({d.name})" if labels.count(label) > 1 else label for label, (d, _) in zip(labels, runs)
    ]
    residuals = [_residual_curves(events) for _, events in runs]
    metrics = [headline(d) for d, _ in runs]
    panels = 3 if any(residuals) else 2
    fig = Figure(figsize=(6 * panels, 4.5))
    ax_loss, ax_acc, *ax_res = fig.subplots(1, panels)
    all_positive, any_loss, any_val = True, False, False
    for index, ((_, events), label) in enumerate(zip(runs, labels)):
        colour = f"C{index % 10}"
        times, losses = _loss_curve(events)
        all_positive &= all(v > 0 for v in losses)
        any_loss |= bool(losses)
        ax_loss.plot(times, losses, color=colour, label=label)
        times, values = _metric_curve(events, "test_" + metrics[index])
        ax_acc.plot(times, values, color=colour, marker="o", markersize=3, label=label)
        times, values = _metric_curve(events, "val_" + metrics[index])
        if values:  # --val-fraction: the evaluations during the run read the validation split
            any_val = True
            ax_acc.plot(times, values, color=colour, linestyle="--", marker="x", markersize=3,
                        label=f"{label} (validation)")
        for (name, (rounds, values)), style in zip(residuals[index].items(),
                                                   ("-", "--", ":", "-.", "-", "--")):
            ax_res[0].plot(rounds, values, color=colour, linestyle=style,
                           label=f"{name} ({label})" if len(runs) > 1 else name)
    if all_positive and any_loss:  # cross-entropy spans decades; log shows late differences
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="wall-clock seconds", ylabel="training loss (mean over replicas)", title="Training loss")
    shown = " / ".join(dict.fromkeys(m.replace("_", " ") for m in metrics))
    split = "validation (dashed) and test" if any_val else "test"
    ax_acc.set(xlabel="wall-clock seconds", ylabel=f"{split} {shown}",
               title=f"{split[0].upper()}{split[1:]} {shown}")
    if ax_res:
        ax_res[0].set(xlabel="round", ylabel="residual", yscale="log",
                      title="ADMM residuals (primal, dual, boundaries)")
        ax_res[0].legend(fontsize="small", loc="upper right")
    for ax in (ax_loss, ax_acc, *ax_res):
        ax.grid(True, alpha=0.3)
    # accuracy rises to the lower right's empty corner; RMSE and perplexity fall away from it
    ax_acc.legend(fontsize="small", loc="lower right" if "accuracy" in metrics[0] else "upper right")
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw `figure_runs(run_dirs)` and save it to ``out``; returns ``out``.

    Raises:
        UserError: as `figure_runs`, or a file suffix matplotlib cannot write.
    """
    out = Path(out)
    if not run_dirs:
        raise UserError("no run directories given: name at least one run to plot")
    _check_format(out)
    fig = figure_runs(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Plot one run to ``out`` (default ``run_dir/curves.png``); returns the path.

    Raises:
        UserError: as ``plot_runs``.
    """
    return plot_runs([Path(run_dir)], Path(out) if out is not None else Path(run_dir) / "curves.png")
