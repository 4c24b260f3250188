"""Tests for distbelief.rundir: the atomic write, run directory names, cluster.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from distbelief.errors import UserError
from distbelief.rundir import (choose_run_dir, create_run_dir, write_atomic, write_cluster,
                               write_text_atomic)


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "a.bin"
    assert write_atomic(path, lambda f: f.write(b"old")) == path
    write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_failed_rename_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_text_atomic(path, '{"checkpoint": 1}\n')
    renamed = []

    def broken_replace(src, dst):
        renamed.append((os.path.basename(src), os.path.basename(dst)))
        assert os.path.getsize(src) > 0  # the new data was complete when the rename failed
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(path, '{"checkpoint": 2}\n')
    monkeypatch.undo()
    [(tmp_name, target)] = renamed
    assert target == "manifest.json" and tmp_name.startswith(".manifest.json.")
    assert json.loads(path.read_text()) == {"checkpoint": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_an_exception_in_the_writer_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "data.npz"
    write_atomic(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"half of it")
        raise ValueError("the writer broke")

    with pytest.raises(ValueError, match="the writer broke"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.npz"]

    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not only Exception: an interrupt cleans up too
        write_atomic(tmp_path / "new.bin", interrupted)
    assert os.listdir(tmp_path) == ["data.npz"]


def test_write_atomic_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644


def test_write_cluster_format(tmp_path):
    roles = [{"kind": "coordinator", "id": 0, "pid": 12, "port": 2900},
             {"kind": "shard", "id": 0, "part": None, "pid": 13, "port": None}]
    write_cluster(tmp_path, roles, "0123abcd")
    text = (tmp_path / "cluster.json").read_text()
    assert text == json.dumps({"roles": roles, "job_id": "0123abcd"}, indent=2) + "\n"
    assert os.listdir(tmp_path) == ["cluster.json"]


def test_choose_run_dir_takes_the_given_one_and_creates_nothing(tmp_path):
    assert choose_run_dir(str(tmp_path / "a" / "b"), "downpour") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_choose_run_dir_refuses_a_directory_that_holds_a_run(tmp_path, name):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")  # a run directory being set up is fine
    assert choose_run_dir(str(tmp_path / "run"), "sync") == tmp_path / "run"
    (tmp_path / "run" / name).write_text("")
    with pytest.raises(UserError, match=r"run directory '.*run' already holds a run: "
                                        "choose another --run-dir or remove it"):
        choose_run_dir(str(tmp_path / "run"), "sync")


def test_default_names_are_numbered_while_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20240102-030405")
    first = choose_run_dir(None, "downpour")
    assert first == Path("runs/downpour-20240102-030405")
    create_run_dir(first)
    second = choose_run_dir("", "downpour")  # an empty --run-dir is no choice either
    assert second.name == "downpour-20240102-030405.2"
    create_run_dir(second)
    assert choose_run_dir(None, "downpour").name == "downpour-20240102-030405.3"
    assert choose_run_dir(None, "sync").name == "sync-20240102-030405"


def test_create_run_dir_makes_parents_and_reports_what_is_in_the_way(tmp_path):
    create_run_dir(tmp_path / "a" / "b")
    create_run_dir(tmp_path / "a" / "b")  # existing: fine
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"cannot create run directory '.*file/run' "
                                        r"\(Not a directory\): choose a writable --run-dir"):
        create_run_dir(tmp_path / "file" / "run")


def test_a_resumed_run_removes_the_files_its_killed_predecessor_left(tmp_path, monkeypatch):
    """The coordinator was SIGKILLed, and every role with it: no one removed the job's
    shared-memory files. Resuming the run removes them, and only them, once that
    coordinator's process is gone."""
    import subprocess
    import sys

    from distbelief import coordinator
    from distbelief.runtime import shm

    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    files = [tmp_path / "shm" / f"distbelief-{job}-{name}" for job in ("00aa11bb22cc33dd",
             "99ee88ff77aa66bb") for name in ("shard0-params", "shard0.sock")]
    for path in files:
        path.touch()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = tmp_path / "run"
    run.mkdir()
    write_cluster(run, [{"kind": "coordinator", "id": 0, "pid": os.getpid()}], "00aa11bb22cc33dd")
    coordinator._remove_leftovers(run)  # its coordinator (this process) still runs: kept
    assert all(path.exists() for path in files)
    write_cluster(run, [{"kind": "coordinator", "id": 0, "pid": int(dead.stdout)}],
                  "00aa11bb22cc33dd")
    coordinator._remove_leftovers(run)
    assert [path.exists() for path in files] == [False, False, True, True]
    write_cluster(run, [{"kind": "coordinator", "id": 0, "pid": int(dead.stdout)}], "*")
    coordinator._remove_leftovers(run)  # not an id: no glob of everyone's files
    assert files[2].exists() and files[3].exists()
