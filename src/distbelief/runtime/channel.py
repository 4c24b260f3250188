"""Tensor channels between two processes, and shared-memory tensors.

`Channel` is one gloo process group of size two, made on demand over the job's
store with a `PrefixStore`; no global collective is needed, so peers may join
late and a dead peer breaks only its own channels (its pending `recv` raises
`ChannelClosed`). Small fixed-size int64 *headers* carry commands and version
numbers; tensors follow when the transport is TCP.

`SharedTensor` maps a file under /dev/shm into both processes, so peers on one
host exchange parameters and gradients with one memory copy while only the
headers travel over the channel.

Blocking: `send`/`recv` block until the peer matches them or the channel's
timeout passes. One channel must be used by one thread at a time.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

HEADER_LEN = 6
SHM_DIR = Path(os.environ.get("DISTBELIEF_SHM_DIR", "/dev/shm"))


class ChannelClosed(ConnectionError):
    """The peer went away (crashed, was killed, or closed the channel)."""


class Channel:
    """A two-party tensor channel over its own gloo process group.

    Both sides call ``Channel(store, name, rank, timeout)`` with the same name and
    ranks 0 and 1; the constructor blocks until both have joined (or timeout).

    Example::

        ch = Channel(store.raw, "pg/shard0/3", rank=0, timeout=30)
        op, a, b = ch.recv_header()[:3]
        ch.send_header(1, 42)
    """

    def __init__(self, store: dist.Store, name: str, rank: int, timeout: float):
        if rank not in (0, 1):
            raise ValueError(f"a channel has ranks 0 and 1, got {rank}")
        self.name = name
        self.rank = rank
        self.peer = 1 - rank
        try:
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2,
                                             datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            raise ChannelClosed(f"channel {name}: peer did not connect ({_short(exc)})") from None
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int64)

    def send(self, tensor: torch.Tensor) -> None:
        self._wait(self._pg.send([tensor], self.peer, 0))

    def recv(self, tensor: torch.Tensor) -> None:
        self._wait(self._pg.recv([tensor], self.peer, 0))

    def send_header(self, *values: int) -> None:
        if len(values) > HEADER_LEN:
            raise ValueError(f"a header holds {HEADER_LEN} integers, got {len(values)}")
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        self.send(header)

    def recv_header(self) -> list[int]:
        self.recv(self._header)
        return self._header.tolist()

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise ChannelClosed(f"channel {self.name}: {_short(exc)}") from None


class SharedTensor:
    """A 1-D tensor backed by a file in /dev/shm, visible to every process that maps it.

    The creator makes the file; peers `attach` by path. The mapping outlives the
    file name, so a creator may `unlink` once every peer has attached; the
    launcher also removes a job's leftovers (see `remove_job_files`).
    """

    def __init__(self, path: Path, numel: int, dtype: torch.dtype, *, create: bool):
        self.path = Path(path)
        if create:
            self.path.unlink(missing_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"shared tensor {self.path} does not exist")
        self.tensor = torch.from_file(str(self.path), shared=True, size=max(numel, 1),
                                      dtype=dtype)[:numel]

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def job_file(token: str, name: str) -> Path:
    """Path of a shared-memory file belonging to the job with this token."""
    return SHM_DIR / f"distbelief-{token[:16]}-{name}"


def remove_job_files(token: str) -> int:
    """Remove every shared-memory file of a job (after it ended); returns how many."""
    removed = 0
    for path in SHM_DIR.glob(f"distbelief-{token[:16]}-*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # gloo prefixes its messages with the source location in brackets
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:200]
