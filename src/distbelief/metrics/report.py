"""A training worker's progress reports: "train" events on the store stream ``events``.

Every training worker reports the same way, whatever its algorithm (Downpour
and synchronous replicas, Hogwild workers): it tells a `Reporter` about each
step and each answer from the shards, and the reporter appends one "train"
event per reporting period to the store stream ``events``, which the
coordinator follows (progress line, metrics, evaluations)::

    {"event": "train", "time": seconds since the job started, "replica": r,
     "step": steps done, "total_steps": this worker's steps,
     "loss": mean loss of the period's finite steps (NaN if none),
     "nonfinite": steps of the period skipped for a NaN/inf loss or gradient,
     "samples": samples of the period, "samples_per_second": samples / seconds,
     "staleness": mean staleness of the period's acknowledged pushes (None if none),
     "versions": the parameter versions last fetched from each shard ([] if none),
     "dropped": gradients of the period left out of their step}   # count_dropped only

Counters are per period: they restart after each event. ``acked`` and
``dropped_total`` count over the whole run.

Not thread-safe: one thread (the worker's main thread) calls every method.

Example::

    report = Reporter.for_role(ctx, total=100)   # ctx: the worker's RoleContext
    for step in range(100):
        loss = train_one_batch()
        report.step(loss, samples=64)             # raises under --on-nonfinite stop
        report.maybe_log(step)                    # an event every log_every steps
    report.maybe_log(99, force=True)              # the last steps' event
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from distbelief.runtime.store import JobStore

if TYPE_CHECKING:
    from distbelief.runtime.context import RoleContext

STREAM = "events"


class Reporter:
    """Collects loss, samples, staleness, skipped and dropped steps; writes "train" events."""

    def __init__(self, store: JobStore, replica: int, total: int, *, every: int,
                 start_time: float, stop_on_nonfinite: bool = False, enabled: bool = True,
                 count_dropped: bool = False):
        """`replica`: the reporting worker's number; `total`: its steps; `every`: steps per
        event (`maybe_log`); `start_time`: the job's start (wall clock, seconds);
        `stop_on_nonfinite`: `step` with a NaN/inf loss sets ``job/nonfinite`` and raises;
        `enabled`: False on the partitions of a replica that do not see the loss (every
        method but `acks` does nothing); `count_dropped`: events carry "dropped"."""
        self.store, self.replica, self.total, self.every = store, replica, total, every
        self.start_time, self.stop_on_nonfinite = start_time, stop_on_nonfinite
        self.enabled, self.count_dropped = enabled, count_dropped
        self.losses: list[float] = []
        self.staleness: list[int] = []
        self.samples = 0
        self.nonfinite = 0  # steps skipped since the last event: NaN/inf loss or gradient
        self.dropped = 0  # gradients dropped since the last event
        self.dropped_total = 0
        self.acked = 0  # pushes a shard applied and acknowledged, over the whole run
        self.since = time.perf_counter()
        self.last_step = -1
        self._buffers = None  # (module, store key): `keep_buffers`

    @classmethod
    def for_role(cls, ctx: RoleContext, total: int, *, enabled: bool = True,
                 count_dropped: bool = False, module=None, rename=None) -> Reporter:
        """The reporter of the worker `ctx`, with the job's ``log_every`` and
        ``--on-nonfinite``; `module`: the worker's model (or partition), whose buffers it
        publishes (`keep_buffers`, with `rename`)."""
        report = cls(ctx.store, ctx.ident, total, every=ctx.config.train.log_every,
                     start_time=ctx.job["start_time"],
                     stop_on_nonfinite=ctx.config.train.on_nonfinite == "stop",
                     enabled=enabled, count_dropped=count_dropped)
        if module is not None:
            report.keep_buffers(module, ctx.member, rename)
            resumed = ((ctx.job.get("resume") or {}).get("buffers") or {}).get(ctx.member)
            report.restore_buffers(resumed)
        return report

    def keep_buffers(self, module, member: str, rename=None) -> None:
        """Publish `module`'s buffers (BatchNorm's running statistics and the like) to the
        store key ``buffers/<member>`` with every report and the last one, also when not
        `enabled` (a partition that does not see the loss holds buffers too), for the
        coordinator to average (`distbelief.model.buffers`). `rename(name)`: the whole
        model's name of a partition's buffer (`PartitionPlan.whole_name`; None: one the
        whole model does not have, not published). A module without buffers publishes
        nothing."""
        from distbelief.model.buffers import has_buffers

        self._buffers = ((module, f"buffers/{member}", rename) if has_buffers(module)
                         else None)

    def restore_buffers(self, resumed: dict | None) -> None:
        """Load the kept module's buffers as this member last published them (a replacement
        goes on from its predecessor's), else from `resumed` (the checkpoint's, encoded);
        neither: the module keeps its own."""
        if self._buffers is None:
            return
        from distbelief.model.buffers import decode, load_buffers

        module, key, rename = self._buffers
        saved = self.store.try_get_json(key) or resumed
        if not saved:
            return
        local = {name: name for name, _ in module.named_buffers()}
        if rename is not None:
            local = {rename(name): name for name in local if rename(name) is not None}
        load_buffers(module, {local[name]: value for name, value in decode(saved).items()
                              if name in local})

    def publish_buffers(self) -> None:
        """Publish the kept module's buffers now (nothing without one)."""
        if self._buffers is None:
            return
        from distbelief.model.buffers import buffer_state, encode

        module, key, rename = self._buffers
        state = buffer_state(module)
        if rename is not None:
            state = {rename(name): value for name, value in state.items()
                     if rename(name) is not None}
        self.store.set_json(key, encode(state))

    def step(self, loss: float | None, samples: int) -> None:
        """A step of `samples` samples with this loss. A NaN/inf loss counts as a skipped
        step, and with `stop_on_nonfinite` sets ``job/nonfinite`` and raises
        FloatingPointError (the coordinator then ends the job)."""
        if not self.enabled:
            return
        if math.isfinite(loss):
            self.losses.append(loss)
            self.samples += samples
            return
        self.skip_nonfinite(samples)
        if self.stop_on_nonfinite:
            self.store.set_json("job/nonfinite", {"client": f"replica{self.replica}",
                                                  "loss": str(loss)})
            raise FloatingPointError(f"replica {self.replica}: the training loss is {loss}; "
                                     "lower --lr or check the data")

    def skip_nonfinite(self, samples: int) -> None:
        """A step skipped for a NaN/inf loss or gradient, the caller having decided not to
        stop (no ``job/nonfinite``, no exception)."""
        if not self.enabled:
            return
        self.nonfinite += 1
        self.samples += samples

    def acks(self, acks: Iterable[tuple[int, int | None]]) -> None:
        """Record the shards' answers (shard, staleness); staleness None: a push refused as
        non-finite. Counted even when not `enabled` (`acked` is the run's total)."""
        staleness = [s for _, s in acks if s is not None]
        self.staleness.extend(staleness)
        self.acked += len(staleness)

    def drop(self, count: int) -> None:
        """`count` of this worker's gradients were left out of their step."""
        self.dropped += count
        self.dropped_total += count

    def maybe_log(self, step: int, versions: Iterable[int] = (), force: bool = False) -> None:
        """`log` after every `every`-th step (any step when `force`), unless this step was
        already reported or nothing happened since the last event. The kept module's
        buffers are published at the same steps, whether or not `enabled`."""
        if not force and (step + 1) % self.every != 0:
            return
        if self.enabled and step != self.last_step and (self.losses or self.nonfinite):
            self.log(step, versions)
        else:
            self.publish_buffers()

    def log(self, step: int, versions: Iterable[int] = ()) -> None:
        """Append the "train" event of the steps up to `step` (0-based) and start a new
        period. `versions`: the parameter versions last fetched from each shard. Publishes
        the kept module's buffers (`keep_buffers`), also when not `enabled`."""
        self.publish_buffers()
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        event = {"event": "train", "time": time.time() - self.start_time,
                 "replica": self.replica, "step": step + 1, "total_steps": self.total,
                 "loss": sum(self.losses) / len(self.losses) if self.losses else math.nan,
                 "nonfinite": self.nonfinite, "samples": self.samples,
                 "samples_per_second": self.samples / elapsed,
                 "staleness": (sum(self.staleness) / len(self.staleness)
                               if self.staleness else None),
                 "versions": list(versions)}
        if self.count_dropped:
            event["dropped"] = self.dropped
        self.store.append(STREAM, event)
        self.losses, self.staleness, self.samples, self.nonfinite, self.dropped = [], [], 0, 0, 0
        self.since = time.perf_counter()
        self.last_step = step
