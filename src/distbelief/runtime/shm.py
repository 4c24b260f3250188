"""Shared-memory tensors and the job's files in /dev/shm.

`SharedTensor` maps a file under /dev/shm into every process that opens it, so
peers on one host exchange parameters and gradients with one memory copy while
only small headers travel over a channel (`runtime.channel`, `runtime.local`).
The job's files are named by its id, a one-way function of its token
(`JobSecret.job_id`), never by the token, and are private to their owner.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distbelief.runtime.secret import JobSecret

SHM_DIR = Path(os.environ.get("DISTBELIEF_SHM_DIR", "/dev/shm"))


class SharedTensor:
    """A 1-D tensor backed by a file in /dev/shm, visible to every process that maps it.

    The creator makes the file, readable and writable by its owner only (0600);
    peers `attach` by path. The mapping outlives the file name, so a creator may
    `unlink` once every peer has attached; the launcher also removes a job's
    leftovers (see `remove_job_files`).
    """

    def __init__(self, path: Path, numel: int, dtype: torch.dtype, *, create: bool):
        self.path = Path(path)
        if create:
            self.path.unlink(missing_ok=True)
            # made private before torch maps it: from_file would create it world-readable
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        elif not self.path.exists():
            raise FileNotFoundError(f"shared tensor {self.path} does not exist")
        self.tensor = torch.from_file(str(self.path), shared=True, size=max(numel, 1),
                                      dtype=dtype)[:numel]

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def job_file(token: str, name: str) -> Path:
    """Path of a shared-memory file belonging to the job with this token: named by the
    job's id, a one-way function of the token (`JobSecret.job_id`), never the token."""
    return SHM_DIR / f"distbelief-{JobSecret(token).job_id}-{name}"


def remove_job_files(token: str) -> int:
    """Remove every shared-memory file of a job (after it ended); returns how many."""
    return remove_files_of(JobSecret(token).job_id)


def remove_files_of(job_id: str) -> int:
    """Remove every shared-memory file of the job whose id (`JobSecret.job_id`, as
    cluster.json records it) is `job_id`; returns how many."""
    if not job_id or not all(c in "0123456789abcdef" for c in job_id):
        return 0  # not an id: nothing of ours to match
    removed = 0
    for path in SHM_DIR.glob(f"distbelief-{job_id}-*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
