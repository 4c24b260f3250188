"""Arrays, a torch Dataset and a directory of .npy files end to end (`distbelief.train`,
real processes): the same data trains the same parameters from every source, each
replica reads only its own samples, and a directory larger than the role processes'
memory limit trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import distbelief
from distbelief.data.sampling import holdout_split, replica_indices

import _sources

SOURCES = str(Path(_sources.__file__).resolve())
SEED, STEPS, BATCH = 3, 12, 16


def run(tmp_path: Path, name: str, dataset: str, **options) -> list[torch.Tensor]:
    settings = dict(dataset=dataset, model="mlp", replicas=1, shards=1, n_fetch=1, n_push=1,
                    rule="sgd", lr=0.1, batch_size=BATCH, steps=STEPS, seed=SEED, timeout=60,
                    run_dir=str(tmp_path / name))
    summary = distbelief.train(**{**settings, **options})
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    return [p.detach() for p in distbelief.load_model(summary["run_dir"]).parameters()]


def test_arrays_a_dataset_and_a_npy_directory_train_exactly_the_same_parameters(
        tmp_path, monkeypatch):
    """One Downpour replica fetching and pushing every step: its parameters are a function
    of its batches alone, so equal parameters mean the same batches (indices, seeded
    shuffles, float32 values) from every source, inline or from a data server."""
    monkeypatch.setenv("DISTBELIEF_TEST_READLOG", str(tmp_path / "reads.txt"))
    npy = _sources.write_npy_dir(tmp_path / "npy")
    arrays = run(tmp_path, "arrays", f"{SOURCES}:arrays")
    others = {"dataset": run(tmp_path, "dataset", f"{SOURCES}:dataset"),
              "npy": run(tmp_path, "npy", str(npy)),
              "served": run(tmp_path, "served", f"{SOURCES}:logged", data_servers=1)}
    for name, params in others.items():
        assert all(torch.equal(a, b) for a, b in zip(arrays, params)), name
    readers = {line.split()[0] for line in (tmp_path / "reads.txt").read_text().splitlines()}
    assert "dataserver0" in readers and "replica0" not in readers  # the server read for it


def test_sandblaster_reads_its_portions_from_a_npy_directory(tmp_path):
    """Sandblaster's workers gather each portion's rows (memory-mapped from a directory)
    rather than holding the split: one worker's L-BFGS iterations match the arrays'."""
    npy = _sources.write_npy_dir(tmp_path / "npy")
    options = dict(algorithm="sandblaster", steps=3, portions=4, n_fetch=None, n_push=None,
                   rule=None, batch_size=None, lr=None)
    arrays = run(tmp_path, "arrays", f"{SOURCES}:arrays", **options)
    mapped = run(tmp_path, "npy", str(npy), **options)
    assert all(torch.equal(a, b) for a, b in zip(arrays, mapped))


def test_each_replica_reads_only_its_own_samples(tmp_path, monkeypatch):
    """Two replicas on a Dataset that logs every read (through a DataLoader reader process):
    each read only the samples of its own part; the coordinator only the first sample (the
    input shape), the first batch of the train split (a sample batch for the partition
    planner) and the test split (the evaluation)."""
    log = tmp_path / "reads.txt"
    monkeypatch.setenv("DISTBELIEF_TEST_READLOG", str(log))
    run(tmp_path, "two", f"{SOURCES}:logged", replicas=2, n_fetch=2, n_push=2)
    reads = defaultdict(set)
    for line in log.read_text().splitlines():
        who, index = line.split()
        reads[who].add(int(index))
    train, test = holdout_split(_sources.SAMPLES, SEED)
    for r in range(2):
        own = set(train[replica_indices(len(train), r, 2, SEED).numpy()].tolist())
        assert reads[f"replica{r}"] and reads[f"replica{r}"] <= own, r
    assert reads["coordinator"] <= {0} | set(train[:BATCH].tolist()) | set(test.tolist())
    assert set(reads) == {"coordinator", "replica0", "replica1"}


LIMIT = 1 << 30  # RLIMIT_DATA of every process of the job: 1 GiB
ROWS, FEATURES = 65_536, 16_384  # x.npy: 65,536 rows of 64 KiB = 4 GiB, four times the limit


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA counts mmap only on Linux")
def test_a_npy_directory_four_times_the_memory_limit_trains(tmp_path):
    """A job whose every process may hold at most 1 GiB trains on a 4 GiB x.npy.

    Why RLIMIT_DATA: it caps a process's private writable memory (heap, anonymous
    maps: every tensor and numpy array it makes, Linux >= 4.7) and is inherited by
    every process the job starts (coordinator, zygote, shard, replica), without
    privileges. A read-only memory map of a file is not counted: its pages are page
    cache, which the kernel drops when memory runs short. So the limit tells apart
    exactly what this test is about: reading the rows a batch needs from the map
    passes, while holding the data (``np.load`` without ``mmap_mode``, a tensor of
    the whole array) fails. RLIMIT_AS cannot work: mapping the file takes address
    space of its full size, and torch reserves much more. A cgroup memory limit needs
    a writable cgroup v2 hierarchy, which test machines rarely give (the one this was
    written on has cgroup v1, owned by its sandbox). The test checks first that the
    limit is real: loading x.npy whole fails under it.

    x.npy is sparse (created by truncation, ~0 bytes on disk, written in
    milliseconds): its rows read as zeros, which trains a linear model's bias; the
    labels and a small test set are real. The directory goes with tmp_path.
    """
    data = tmp_path / "big"
    data.mkdir()
    x = np.lib.format.open_memmap(data / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(ROWS, FEATURES))
    del x  # the header is written, the rest is a hole
    if os.stat(data / "x.npy").st_blocks * 512 > 64 << 20:
        pytest.skip("this filesystem does not keep sparse files")
    rng = np.random.default_rng(0)
    np.save(data / "y.npy", rng.integers(0, 4, ROWS))
    np.save(data / "x_test.npy", rng.standard_normal((64, FEATURES), dtype=np.float32))
    np.save(data / "y_test.npy", rng.integers(0, 4, 64))
    assert os.path.getsize(data / "x.npy") >= 4 * LIMIT

    whole = limited([sys.executable, "-c", "import numpy; numpy.load('big/x.npy')"], tmp_path)
    assert whole.returncode != 0 and "MemoryError" in whole.stderr  # the limit bites

    job = limited([sys.executable, "-m", "distbelief.cli", "train", "--dataset", "big",
                   "--model", "linear", "--replicas", "1", "--shards", "1", "--steps", "4",
                   "--batch-size", "16", "--seed", "1", "--timeout", "60",
                   "--run-dir", str(tmp_path / "run")], tmp_path)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "test accuracy" in job.stdout


def limited(command: list[str], cwd: Path, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    """Run `command` (and everything it starts) under RLIMIT_DATA = LIMIT, in its own
    process group, which is killed if it outlives `timeout`."""
    capped = [sys.executable, "-c", "import os, resource, sys; "
              f"resource.setrlimit(resource.RLIMIT_DATA, ({LIMIT}, {LIMIT})); "
              "os.execv(sys.argv[1], sys.argv[1:])", *command]  # inherited by all it starts
    proc = subprocess.Popen(capped, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
