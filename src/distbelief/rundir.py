"""Run directories and the package's one atomic file write.

A run directory holds what one ``distbelief train`` job leaves behind
(``config.toml``, ``metrics.jsonl``, ``cluster.json``, ``summary.json``,
``checkpoints/``, ``logs/``). This module names it, refuses one that already
holds a run, creates it, and writes its ``cluster.json``.

`write_atomic` is how every file that a reader must never see half-written is
written (checkpoints, the checkpoint manifest, cluster.json, the dataset cache,
prediction outputs): the bytes go to a temporary file in the same directory,
are flushed and fsynced, and the temporary file is renamed over the target with
``os.replace``. A process killed at any moment, or a writer that raises, leaves
the previous file whole and no temporary file behind (a kill -9 between the
open and the rename may leave one ``.<name>.<random>.tmp``, never the target
half-written).

Bottom layer: imports nothing from distbelief but `distbelief.errors`.
Every function is thread-safe (concurrent writers of one path: the last
complete write wins). Example::

    write_atomic(path, lambda f: torch.save(obj, f))
    write_atomic(path, lambda f: np.savez(f, x=x, y=y))
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\\n")

    run_dir = choose_run_dir(None, "downpour")      # runs/downpour-20240101-120000
    create_run_dir(run_dir)
    write_cluster(run_dir, [{"kind": "coordinator", "id": 0, "pid": os.getpid()}])
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from distbelief.errors import UserError

CLUSTER = "cluster.json"


CHECKPOINT = "model.pt"
"""The trained model's state_dict in a finished run directory."""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace `path` by what `write(f)` writes to a binary file `f`; returns `path`.

    Blocks until the data and the rename are on disk (fsync of the file, then of
    its directory). A reader sees the old file or the whole new one. If `write`
    or any step after it raises, the exception propagates, the previous file is
    untouched and the temporary file is removed. The directory must exist; the
    new file's mode follows the umask, as a plain ``open(path, "wb")`` would.
    """
    path = Path(path)
    # a name of its own per write: processes racing to write one path never share it
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` of `text` encoded as UTF-8; returns `path`."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry, not only the file's data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def choose_run_dir(run_dir: str | None, algorithm: str) -> Path:
    """The run directory to use: `run_dir`, or ``runs/<algorithm>-<YYYYmmdd-HHMMSS>`` (then
    ``.2``, ``.3``, ... while that exists). Creates nothing.

    Raises:
        UserError: the directory already holds a run (metrics.jsonl or summary.json).
    """
    if run_dir:
        path = Path(run_dir)
    else:
        path = Path("runs") / f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = path.with_name(f"{path.name.split('.')[0]}.{suffix}")
    if (path / "metrics.jsonl").exists() or (path / "summary.json").exists():
        raise UserError(f"run directory {str(path)!r} already holds a run: "
                        "choose another --run-dir or remove it")
    return path


def create_run_dir(path: Path) -> None:
    """Create `path` and its parents (an existing directory is fine).

    Raises:
        UserError: it cannot be created (read-only place, a file in the way, ...).
    """
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run directory {str(path)!r} ({exc.strerror}): "
                        "choose a writable --run-dir") from None


def write_cluster(run_dir: Path, roles: list[dict], job_id: str | None = None) -> None:
    """Write ``run_dir/cluster.json`` as ``{"roles": roles, "job_id": job_id}`` (indent 2, a
    final newline), atomically: tools that kill roles by PID read it while the job runs,
    and a resumed run removes the shared-memory files its killed predecessor (`job_id`)
    left behind."""
    write_text_atomic(Path(run_dir) / CLUSTER,
                      json.dumps({"roles": roles, "job_id": job_id}, indent=2) + "\n")
