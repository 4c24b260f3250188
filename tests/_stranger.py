"""A stranger on the job's network: a process with the store's address but not the job's
token, attacking the store until stopped (tests/test_stranger.py).

In a thread (`Stranger(host, port, attack)` as a context manager), or as a process on
another namespace host: ``python tests/_stranger.py HOST PORT ATTACK STOP OUT.json``
attacks until the file STOP exists (at most 300 s), then writes what it saw (`seen`)
to OUT.json. It also lists the job files in /dev/shm that it can see.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path(os.environ.get("DISTBELIEF_SHM_DIR", "/dev/shm"))


# (key, value) the job's own names, as a stranger would guess them: each one, read by the
# job, would stop it, fail it or end it early (a stop signal, a NaN flag, events that are
# not JSON where the coordinator reads next, fake members, heartbeats and reports); None:
# add 1000 to a counter. Written bare and under the namespaces of guessable tokens.
GUESSED = [
    ("job/stop", b"true"), ("job/nonfinite", b'{"shard": 0, "client": "stranger"}'),
    ("job/tampered", b'{"role": "stranger", "what": "nothing"}'),
    ("events/count", None), *((f"events/{i}", b"not json") for i in range(16)),
    ("members/replica/0", b'{"id": 0, "pid": 1, "host": "stranger"}'),
    ("members/shard/0", b"not json"), ("shard0/up", b"not json"),
    ("beat/replica/0", None), ("beat/shard/0", None),
    ("done/replica0", b'{"steps": 1}'), ("done/replica1", b'{"steps": 1}'),
]


class Stranger:
    """A thread that, without the token, attacks the store at host:port until stopped.

    `attack`: "read" (list and read every key, write forged values under names of its
    own and under the job's names as it would guess them, race compare_set with values it
    guesses), "forge" (also overwrite every name
    it saw, with junk and with another key's value), "delete" (also delete them).
    Records every key name and value it saw."""

    def __init__(self, host: str, port: int, attack: str):
        if attack not in ("read", "forge", "delete"):
            raise ValueError(f"unknown attack {attack!r}")
        self.host, self.port, self.attack = host, port, attack
        self.names: set[str] = set()
        self.values: list[bytes] = []
        self.files: dict[str, int] = {}  # /dev/shm name -> permission bits
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stranger:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def seen(self) -> dict:
        return {"names": sorted(self.names), "passes": self.passes, "files": self.files,
                "values": [v.decode("latin-1") for v in self.values]}

    def _run(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                if store is None:  # connect only once something listens: no c10d retries
                    socket.create_connection((self.host, self.port), timeout=1).close()
                    store = dist.TCPStore(self.host, self.port, None, False,
                                          timeout=datetime.timedelta(seconds=2))
                self._pass(store)
                self.passes += 1
            except (OSError, RuntimeError, dist.DistStoreError):
                store = None  # not up yet, or the job ended and its store with it
            self._stop.wait(0.05)

    def _guess(self, store: dist.Store) -> None:
        """Write the job's names as guessed: bare, and under the namespaces that guessable
        tokens (torchrun's env-none-<port>, an empty one) would give."""
        for prefix in ("", f"distbelief/env-none-{self.port}/", "distbelief//"):
            for key, value in GUESSED:
                if value is None:
                    store.add(prefix + key, 1000)
                else:
                    store.set(prefix + key, value)

    def _pass(self, store: dist.Store) -> None:
        self._guess(store)
        for path in SHM_DIR.glob("distbelief-*"):
            with contextlib.suppress(OSError):  # gone meanwhile
                self.files[path.name] = stat.S_IMODE(path.stat().st_mode)
        names = store.list_keys()
        self.names.update(names)
        seen = {}
        for name in names:
            if store.check([name]):
                seen[name] = store.get(name)
                self.values.append(seen[name])
        for i, (name, value) in enumerate(seen.items()):
            store.set(f"{name}-x{i}", value)              # a name of its own
            store.compare_set(name, b"guessed", b"forged")  # a wrong guess changes nothing
            store.add(f"{name}/count", 1)
            if self.attack in ("forge", "delete"):
                other = list(seen.values())[(i + 1) % len(seen)]
                store.set(name, other if i % 2 else b"true")  # another key's value, or junk
                store.compare_set(name, value, b"\x00forged")
            if self.attack == "delete":
                store.delete_key(name)


if __name__ == "__main__":
    host, port, attack, stop, out = sys.argv[1:6]
    with Stranger(host, int(port), attack) as stranger:
        deadline = time.monotonic() + 300
        while not Path(stop).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    Path(out).write_text(json.dumps(stranger.seen()))
