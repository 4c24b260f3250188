"""The run's metrics as TensorBoard scalars (``--tensorboard``): RUN_DIR/tensorboard/.

`TensorBoardLog` mirrors the events `MetricsLog` writes to ``metrics.jsonl``,
whatever the algorithm, through ``torch.utils.tensorboard.SummaryWriter``. Each
numeric field of an event becomes one scalar (`scalars` says which, with which
tag and step):

- the tag is ``EVENT/FIELD``, with ``/replica_R`` appended when the event names
  a replica: ``train/loss/replica_0``, ``train/samples_per_second/replica_1``,
  ``eval/test_accuracy``, ``round/primal``; a list field gives one scalar per
  element: ``train/versions/shard_S/replica_R`` (the shard versions a replica
  last fetched), ``round/boundary/K`` (ADMM's boundary residuals);
- the step is the event's ``round`` for "round" events (ADMM), else its ``step``;
  an event with neither (``replica_joined``, ``shard_lost``,
  ``dataserver_lost``) has no place on the axis and gives no scalar;
- the wall time is the job's start plus the event's ``time``;
- left out: ``time``, ``total_steps``, ``members``, the replica/shard/server
  numbers (identities, not measurements), booleans, None. NaN and inf are
  written as they are, as in ``metrics.jsonl``.

Scalars are stored as float32, TensorBoard's own precision. The resolved config
is written once as text (tag ``config``). Example::

    with TensorBoardLog(run_dir / "tensorboard", start_time=job_start,
                        config=cfg.to_toml()) as board:
        board.write({"event": "train", "time": 1.5, "replica": 0, "step": 10, "loss": 0.7})
    # then: tensorboard --logdir RUN_DIR/tensorboard

Needs the ``tensorboard`` package (``pip install 'distbelief[tensorboard]'``),
imported only when the log is opened: the config check refuses ``--tensorboard``
up front without it. Not thread-safe: one thread writes, as for `MetricsLog`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

AXES = {"round": "round"}
"""Event kinds whose step axis is another field than ``step``."""
IDENTITIES = ("replica", "shard", "server")
"""Fields that say whose measurement it is: appended to the tag, never a scalar."""
NOT_SCALARS = frozenset({"event", "time", "step", "round", "total_steps", "members",
                         *IDENTITIES})
"""Fields that are no measurement (the axis of a "round" event's ``step`` is its round:
there ``step`` is written)."""
ELEMENTS = {"versions": "shard_"}
"""How the elements of a list field are named in the tag (default: their index)."""
FLUSH_SECONDS = 5  # a live run shows in TensorBoard within seconds (SummaryWriter: 120)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(event: dict[str, Any]) -> list[tuple[str, float, int]]:
    """The (tag, value, step) of each scalar one metrics event gives, in field order.

    Example::

        scalars({"event": "train", "time": 2.0, "replica": 1, "step": 20,
                 "loss": 0.5, "staleness": None, "versions": [7, 9]})
        # [("train/loss/replica_1", 0.5, 20), ("train/versions/shard_0/replica_1", 7.0, 20),
        #  ("train/versions/shard_1/replica_1", 9.0, 20)]
    """
    kind = str(event.get("event"))
    axis = AXES.get(kind, "step")
    step = event.get(axis)
    if not _number(step):
        return []
    skip = NOT_SCALARS - {"step"} if axis != "step" else NOT_SCALARS
    whose = "".join(f"/{key}_{event[key]}" for key in IDENTITIES
                    if event.get(key) is not None)
    out = []
    for name, value in event.items():
        if name in skip:
            continue
        if _number(value):
            out.append((f"{kind}/{name}{whose}", float(value), int(step)))
        elif isinstance(value, (list, tuple)):
            label = ELEMENTS.get(name, "")
            out.extend((f"{kind}/{name}/{label}{k}{whose}", float(v), int(step))
                       for k, v in enumerate(value) if _number(v))
    return out


class TensorBoardLog:
    """Event files of a run's metrics under `log_dir`. Context manager; `write` mirrors
    one metrics event. Opening creates the directory and SummaryWriter's flushing thread;
    closing flushes and ends it."""

    def __init__(self, log_dir: Path, *, start_time: float | None = None,
                 config: str | None = None):
        """`start_time`: the job's start (wall clock, seconds), which the events' ``time``
        counts from (None: the scalars get the time they are written); `config`: the
        resolved config as TOML, written as text."""
        self.log_dir = Path(log_dir)
        self.start_time = start_time
        self.config = config
        self._writer = None

    def __enter__(self) -> TensorBoardLog:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.log_dir), flush_secs=FLUSH_SECONDS)
        if self.config is not None:
            self._writer.add_text("config", "```toml\n" + self.config + "\n```", 0,
                                  walltime=self.start_time)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Flush the event file and end its writer thread; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, event: dict[str, Any]) -> None:
        """Add the scalars of one metrics event (see `scalars`)."""
        assert self._writer is not None, "TensorBoardLog used outside its with-block"
        walltime = None
        if self.start_time is not None and _number(event.get("time")):
            walltime = self.start_time + event["time"]
        for tag, value, step in scalars(event):
            self._writer.add_scalar(tag, value, step, walltime=walltime)
