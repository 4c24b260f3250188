"""The zygote forks role processes that behave like fresh interpreters started by Popen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from _cluster import alive, wait_until
from distbelief.errors import JobFailed
from distbelief.runtime.zygote import Zygote, zygote

CHILD = "_zygote_child:main"


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def fresh():
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


def test_child_gets_env_path_cwd_and_log_and_its_exit_code(fresh, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "child.log"
    child = fresh.spawn({"ZYGOTE_MARK": "hello", "ZYGOTE_EXIT": "3"}, log, entry=CHILD)
    assert child.wait(30) == 3 and child.returncode == 3 and child.poll() == 3
    text = log.read_text()
    assert f"env=hello path_has_tests=True cwd={tmp_path}" in text
    assert "to stderr" in text


def test_exception_is_logged_with_traceback_and_exit_code_1(fresh, tmp_path):
    log = tmp_path / "child.log"
    child = fresh.spawn({}, log, entry="_zygote_child:fail")
    assert child.wait(30) == 1
    assert "ValueError: a bug in the role" in log.read_text()


def test_wait_times_out_and_a_killed_child_reports_the_signal(fresh, tmp_path):
    child = fresh.spawn({"ZYGOTE_SLEEP": "60"}, tmp_path / "child.log", entry=CHILD)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    assert child.poll() is None and alive(child.pid)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    child.send_signal(signal.SIGKILL)  # an ended child is not signalled again (as Popen)


def test_children_die_with_the_zygote(tmp_path):
    z = Zygote()
    child = z.spawn({"ZYGOTE_SLEEP": "60"}, tmp_path / "child.log", entry=CHILD)
    os.kill(z._process.pid, signal.SIGKILL)
    z._process.wait(10)
    assert child.wait(10) == -signal.SIGKILL  # told so once the zygote is gone
    wait_until(lambda: not running(child.pid), 10, "the orphaned child to die (PDEATHSIG)")


def test_shared_zygote_is_started_again_when_it_died(tmp_path):
    first = zygote()
    assert zygote() is first
    os.kill(first._process.pid, signal.SIGKILL)
    first._process.wait(10)
    second = zygote()
    assert second is not first and second.alive
    assert second.spawn({}, tmp_path / "c.log", entry=CHILD).wait(30) == 0


def test_role_process_is_named_after_its_role(fresh, tmp_path):
    child = fresh.spawn({"ZYGOTE_SLEEP": "60", "DISTBELIEF_ROLE": "replica", "DISTBELIEF_ID": "3",
                         "DISTBELIEF_PART": "1"}, tmp_path / "child.log", entry=CHILD)
    try:
        wait_until(lambda: open(f"/proc/{child.pid}/comm").read().strip() == "db-replica3.1",
                   10, "the child to name itself")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)


def test_a_dead_launcher_fails_the_spawn_with_one_line(tmp_path):
    z = Zygote()
    os.kill(z._process.pid, signal.SIGKILL)
    z._process.wait(10)
    with pytest.raises(JobFailed, match="role launcher .* exited before starting a role"):
        z.spawn({}, tmp_path / "c.log", entry=CHILD)


FORK_PROBE = r"""
import json, os, sys, threading, time
from pathlib import Path
if sys.argv[1] == "thread":  # a second thread, as a notebook or a test runner has
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
from distbelief.runtime.zygote import Zygote
z = Zygote(fork=True)
child = z.spawn({"ZYGOTE_MARK": "forked?"}, Path(sys.argv[2]), entry="_zygote_child:main")
code = child.wait(30)
cmdline = open(f"/proc/{z._process.pid}/cmdline", "rb").read().split(b"\0")
z.close()
print(json.dumps({"forked": z.forked, "code": code, "zygote_argv": [a.decode() for a in cmdline],
                  "torch_here": "torch" in sys.modules, "gone": z._process.poll() is not None}))
"""


@pytest.mark.parametrize("threads", ["one", "thread"])
def test_a_single_threaded_coordinator_forks_its_zygote_after_importing_torch(tmp_path, threads):
    """The command line's case: one thread, torch not imported. The zygote is this process
    forked (the same argv, torch imported once, here); with a second thread it must not
    fork and is a fresh `python -m distbelief.runtime.zygote`."""
    log = tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FORK_PROBE, threads, str(log)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and "env=forked? path_has_tests=True" in log.read_text()
    assert report["gone"]  # closed: the zygote ended with its stdin
    if threads == "one":
        assert report["forked"] and report["torch_here"]
        assert report["zygote_argv"][1] == "-c"  # this interpreter, forked
    else:
        assert not report["forked"] and not report["torch_here"]
        assert report["zygote_argv"][1:3] == ["-m", "distbelief.runtime.zygote"]
