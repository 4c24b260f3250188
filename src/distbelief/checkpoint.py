"""Checkpoints that survive a kill mid-write, and the protocol that makes them consistent.

Layout of a run directory's checkpoints::

    checkpoints/ckpt-000003/shard0.pt     each shard's slice, update-rule state, version
    checkpoints/ckpt-000003/sync.pt       (sync) the replicas' shared rule state
    checkpoints/manifest.json             names the last complete set and holds each
                                          replica's buffers (`distbelief.model.buffers`);
                                          written last

Every file is written to a temporary name, fsynced and renamed, and the
manifest is replaced only once every file of its set is in place, so a process
killed at any moment leaves the previous manifest and its set loadable.

Consistency: Downpour replicas push asynchronously, so a checkpoint is taken
at a brief pause. The coordinator sets ``ckpt/request``; each replica process,
at its next push boundary, waits for its pushes to be applied, records its step
count under ``ckpt/<c>/paused/<member>`` and waits; once every running replica
paused, the coordinator sets ``ckpt/<c>/write``, each shard writes its file and
answers ``ckpt/<c>/shard<s>``; the coordinator writes the manifest and sets
``ckpt/<c>/go``. The manifest thus holds every replica's exact step count and
shards that contain exactly those steps' pushes.

Example::

    write_atomic(path, {"params": tensor})          # torch.save, fsync, rename
    manifest = read_manifest(run_dir)                # UserError when there is none
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distbelief import rundir
from distbelief.config import parse_every
from distbelief.errors import UserError

MANIFEST = "manifest.json"
KEEP = 2  # checkpoint sets kept on disk (the manifest's and the one before)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def set_dir(run_dir: str | Path, number: int) -> Path:
    return checkpoints_dir(run_dir) / f"ckpt-{number:06d}"


def write_atomic(path: Path, obj: Any) -> None:
    """torch.save `obj` to `path` so that a reader sees the old file or the whole new one
    (`distbelief.rundir.write_atomic`: temporary file, fsync, rename)."""
    rundir.write_atomic(path, lambda f: torch.save(obj, f))


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    """Replace the manifest atomically (after every file it names is in place)."""
    folder = checkpoints_dir(run_dir)
    rundir.write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _prune(folder, manifest["checkpoint"])


def read_manifest(run_dir: str | Path) -> dict:
    """The last complete checkpoint of a run; UserError when it has none."""
    path = checkpoints_dir(run_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no checkpoint ({path} is missing): train with "
                        "--checkpoint-every N (steps) or Ns (seconds) to be able to resume")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint manifest {path} is unreadable ({exc}): resume from a copy "
                        "of the run, or start again") from None


def load_file(run_dir: str | Path, manifest: dict, name: str) -> dict:
    """One file of the manifest's set (weights only: nothing is unpickled but tensors)."""
    path = set_dir(run_dir, manifest["checkpoint"]) / name
    if not path.is_file():
        raise UserError(f"checkpoint file {path} named by the manifest is missing: the run "
                        "directory is damaged; resume from a copy")
    return torch.load(path, weights_only=True)


def _prune(folder: Path, latest: int) -> None:
    sets = sorted(p for p in folder.glob("ckpt-*") if p.is_dir())
    for old in sets:
        number = int(old.name.split("-")[1])
        if number <= latest - KEEP or number > latest:  # > latest: a set never completed
            shutil.rmtree(old, ignore_errors=True)




class ReplicaGate:
    """The replica side of the checkpoint pause. One per replica process; its thread only.

    ``due()`` is cheap (one store read at most every `period` seconds); when it
    is true, the caller finishes its pushes and calls ``pause(steps_done)``,
    which blocks until the coordinator lets the replicas go on (or `timeout`).
    """

    def __init__(self, store, member: str, timeout: float, period: float = 0.2):
        self.store, self.member, self.timeout, self.period = store, member, timeout, period
        # a request made before this replica started is answered unless that checkpoint
        # is finished: the coordinator waits for every replica, a late starter included
        request = store.try_get_json("ckpt/request") or 0
        pending = request > 0 and not store.has(f"ckpt/{request}/go")
        self.seen = request - 1 if pending else request
        self._next_look = 0.0

    def due(self) -> int | None:
        now = time.monotonic()
        if now < self._next_look:
            return None
        self._next_look = now + self.period
        request = self.store.try_get_json("ckpt/request") or 0
        return request if request > self.seen else None

    def pause(self, number: int, steps_done: int, before_wait: Callable[[], None] | None = None
              ) -> None:
        self.seen = number
        if before_wait is not None:
            before_wait()
        self.store.set_json(f"ckpt/{number}/paused/{self.member}", {"steps": steps_done})
        deadline = time.monotonic() + self.timeout
        while not self.store.has(f"ckpt/{number}/go"):
            if time.monotonic() > deadline or self.store.has("job/stop"):
                return  # the coordinator gave up on this checkpoint or the job ended
            time.sleep(0.005)


class CheckpointDriver:
    """The coordinator side: decides when a checkpoint is due and runs the pause protocol.

    `waiting(number)` must return the replica members that still have to pause for
    checkpoint `number` (neither paused, finished nor lost); `steps_of(number)` every
    member's step count for the manifest. `meta` goes into the manifest as is.
    Coordinator thread only; `maybe` blocks while a checkpoint is taken (bounded by
    `timeout`, after which the checkpoint is abandoned and training goes on).
    """

    def __init__(self, store, run_dir: Path, every: str | None, shards: int, timeout: float,
                 meta: dict, start: int = 0, message: Callable[[str], None] = print):
        self.store, self.run_dir, self.shards, self.timeout = store, Path(run_dir), shards, timeout
        self.steps_every, self.seconds_every = parse_every(every)
        self.meta, self.number, self.message = meta, start, message
        self.written: list[dict] = []
        self._last_time = time.monotonic()
        self._next_step = None if self.steps_every is None else self.steps_every

    def due(self, leading_step: int) -> bool:
        if self.steps_every is not None:
            if self._next_step is None or leading_step < self._next_step:
                return False
            while self._next_step <= leading_step:
                self._next_step += self.steps_every
            return True
        if self.seconds_every is not None:
            return time.monotonic() - self._last_time >= self.seconds_every
        return False

    def take(self, waiting: Callable[[int], list[str]],
             steps_of: Callable[[int], dict[str, int]],
             lost_shard: Callable[[], int | None] = lambda: None,
             algorithm_state: Callable[[], dict] = dict) -> dict | None:
        """Run the protocol once; the manifest written, or None when it was abandoned.

        `lost_shard()` names a shard that died, if any: the checkpoint is then abandoned
        at once (a replica waiting for that shard to come back cannot pause, and the
        shard is not restarted while the checkpoint waits). `algorithm_state()` goes into
        the manifest as "algorithm_state" (what the coordinator side of the algorithm
        must resume from)."""
        number = self.number + 1
        self.number = number
        self._last_time = time.monotonic()
        deadline = time.monotonic() + self.timeout
        store = self.store
        store.set_json("ckpt/request", number)

        def abandoned(what: str) -> bool:
            lost = lost_shard()
            if lost is not None:
                self.message(f"checkpoint {number} abandoned: shard {lost} was lost")
            elif time.monotonic() > deadline:
                self.message(f"checkpoint {number} abandoned: {what} within "
                             f"{self.timeout:.0f} s")
            else:
                return False
            return True

        try:
            while waiting(number):
                if abandoned(f"replicas {', '.join(waiting(number))} did not pause"):
                    return None
                time.sleep(0.01)
            set_dir(self.run_dir, number).mkdir(parents=True, exist_ok=True)
            store.set_json("ckpt/write", number)
            shards = []
            for s in range(self.shards):
                while not store.has(f"ckpt/{number}/shard{s}"):
                    if abandoned(f"shard {s} did not write"):
                        return None
                    time.sleep(0.01)
                shards.append(store.try_get_json(f"ckpt/{number}/shard{s}"))
            steps = steps_of(number)
            # every paused replica published its buffers (BatchNorm's statistics) first
            buffers = {m: value for m in steps
                       if (value := store.try_get_json(f"buffers/{m}")) is not None}
            manifest = {"checkpoint": number, "time": time.time(),
                        "replica_steps": steps, "shards": shards,
                        "algorithm_state": algorithm_state(), "buffers": buffers, **self.meta}
            write_manifest(self.run_dir, manifest)
            self.written.append({"checkpoint": number,
                                 "replica_steps": manifest["replica_steps"]})
            self._forget(number - 1, steps_of)
            return manifest
        finally:
            store.set_json(f"ckpt/{number}/go", True)

    def _forget(self, number: int, steps_of: Callable[[int], dict[str, int]]) -> None:
        """Delete checkpoint `number`'s keys once every replica paused for the next one
        (so all of them read this one's go; after an abandoned one they may not have)."""
        if number < 1:
            return
        self.store.delete(f"ckpt/{number}/go",
                          *(f"ckpt/{number}/shard{s}" for s in range(self.shards)),
                          *(f"ckpt/{number}/paused/{m}" for m in steps_of(number)))
