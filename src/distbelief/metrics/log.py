"""The run's metrics file and the live progress line.

`MetricsLog` appends one JSON object per line to ``metrics.jsonl`` and flushes
each line, so a run that dies keeps every event written before; its mirrors
(``--tensorboard``: `metrics.tensorboard.TensorBoardLog`) get each event too. `Progress`
shows step, loss, samples/s and mean staleness: a rich progress bar on a
terminal, a plain line every few seconds otherwise (logs, CI).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from distbelief.errors import UserError


class MetricsLog:
    """Append-only JSON-lines writer. Context manager; one writer thread.

    `mirrors`: other writers of the same events (context managers with ``write(event)``,
    e.g. `TensorBoardLog`), entered and exited with this one, each event written to
    ``metrics.jsonl`` first."""

    def __init__(self, path: Path, *, mirrors: Iterable[Any] = ()):
        self.path = Path(path)
        self.mirrors = list(mirrors)
        self._file: TextIO | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> MetricsLog:
        with contextlib.ExitStack() as stack:  # a mirror that fails to open closes the rest
            self._file = stack.enter_context(open(self.path, "a", encoding="utf-8"))
            for mirror in self.mirrors:
                stack.enter_context(mirror)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._file = None, None

    def write(self, event: dict[str, Any]) -> None:
        assert self._file is not None, "MetricsLog used outside its with-block"
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        for mirror in self.mirrors:
            mirror.write(event)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every event of a metrics.jsonl file, in order.

    A last line that does not parse is skipped (a live run is still writing it).

    Raises:
        UserError: the file is missing, or another line is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist: give a run directory that "
                        "'distbelief train' wrote")
    lines = path.read_text(encoding="utf-8").split("\n")
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # half-written last line of a live run
                continue
            raise UserError(f"{str(path)!r} line {number} is not JSON: delete or repair "
                            "that line") from None
    return events


class Progress:
    """Live progress of the whole job (all replicas' steps together)."""

    def __init__(self, total_steps: int, *, stream: TextIO | None = None, interval: float = 5.0,
                 enabled: bool = True):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.interval = interval
        self.enabled = enabled
        self._rich = None
        self._task = None
        self._last_print = 0.0

    def __enter__(self) -> Progress:
        if self.enabled and self.stream.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn)
            self._rich = RichProgress(TextColumn("[bold]steps"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self._rich.__enter__()
            self._task = self._rich.add_task("train", total=self.total, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def update(self, done: int, *, loss: float | None, samples_per_second: float,
               staleness: float | None, note: str | None = None, force: bool = False) -> None:
        """Redraw the line: `done` of the total, the loss, throughput, staleness, and the
        algorithm's `note` (e.g. ADMM's round and residuals)."""
        if not self.enabled:
            return
        info = describe(loss, samples_per_second, staleness)
        if note:
            info += "  " + note
        if self._rich is not None:
            self._rich.update(self._task, completed=done, info=info)
            return
        now = time.monotonic()
        if force or now - self._last_print >= self.interval:
            self._last_print = now
            print(f"step {done}/{self.total}  {info}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(text)
        else:
            print(text, file=self.stream, flush=True)


def describe(loss: float | None, samples_per_second: float, staleness: float | None) -> str:
    parts = [f"loss {loss:.4f}" if loss is not None else "loss -",
             f"{samples_per_second:,.0f} samples/s"]
    parts.append(f"staleness {staleness:.2f}" if staleness is not None else "staleness -")
    return "  ".join(parts)
