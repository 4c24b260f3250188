"""benchmarks/suite_repeat.py: pytest's output is read right (a table of outputs), and
the script runs end to end on a clone of this repository with stand-in commands that
print what pytest would (a few seconds; the real suite is never run here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "suite_repeat.py"

_spec = importlib.util.spec_from_file_location("suite_repeat", SCRIPT)
suite_repeat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite_repeat)
parse = suite_repeat.parse_pytest_output


def counts(**named: int) -> dict:
    return {**dict.fromkeys(suite_repeat.COUNT_KEYS, 0), **named}


GREEN = """\
........................................................................ [ 50%]
........................................................................ [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/test_gpu.py:12: no CUDA device
480 passed, 1 skipped in 412.31s (0:06:52)
"""

RED = """\
.....F....E.....
=================================== FAILURES ===================================
___________________________________ test_bad ___________________________________
E   assert 1 == 2
=========================== short test summary info ============================
SKIPPED [1] tests/test_gpu.py:12: no CUDA device
XFAIL tests/test_x.py::test_known
ERROR tests/test_liveness.py::test_err - RuntimeError: boom
FAILED tests/test_sync.py::test_bad - assert 1 == 2
FAILED tests/test_sync.py::test_p[c - d] - AssertionError: assert 'c - d' == 'a b'
FAILED tests/test_sync.py::test_q[x] - assert [1] == [2]
FAILED tests/test_sync.py::test_bad - the same id again (a rerun)
2 failed, 2 passed, 1 skipped, 1 xfailed, 1 error in 0.50s
"""

KILLED = """\
........................................................................ [ 40%]
.......................
"""


@pytest.mark.parametrize("text, expected", [
    (GREEN, {"summary_found": True, "counts": counts(passed=480, skipped=1),
             "pytest_s": 412.31, "failed_ids": [], "error_ids": []}),
    (RED, {"summary_found": True,
           "counts": counts(failed=2, passed=2, skipped=1, xfailed=1, errors=1),
           "pytest_s": 0.5,
           "failed_ids": ["tests/test_sync.py::test_bad", "tests/test_sync.py::test_p[c - d]",
                          "tests/test_sync.py::test_q[x]"],
           "error_ids": ["tests/test_liveness.py::test_err"]}),
    (KILLED, {"summary_found": False, "counts": None, "pytest_s": None,
              "failed_ids": [], "error_ids": []}),
    ("", {"summary_found": False, "counts": None, "pytest_s": None,
          "failed_ids": [], "error_ids": []}),
    # a collection error: the id is the file; "errors" plural; the closing line in
    # "=" (without -q) and in colour
    ("ERROR tests/test_zoo.py - ImportError: no module\n"
     "Interrupted: 1 error during collection\n"
     "\x1b[31m=========== \x1b[1m3 errors\x1b[0m, 1 warning in 2.05s ===========\x1b[0m\n",
     {"summary_found": True, "counts": {**counts(errors=3), "warnings": 1}, "pytest_s": 2.05,
      "failed_ids": [], "error_ids": ["tests/test_zoo.py"]}),
    ("1 xpassed, 4 deselected, 3 xfailed, 7 passed in 9.00s\n",
     {"summary_found": True,
      "counts": {**counts(xpassed=1, xfailed=3, passed=7), "deselected": 4},
      "pytest_s": 9.0, "failed_ids": [], "error_ids": []}),
    ("no tests ran in 0.01s\n", {"summary_found": True, "counts": counts(), "pytest_s": 0.01,
                                 "failed_ids": [], "error_ids": []}),
    # a test's own output may hold a summary line: the last one counts
    ("1 passed in 0.10s\nFAILED tests/test_a.py::test_b\n1 failed, 9 passed in 30.00s\n",
     {"summary_found": True, "counts": counts(failed=1, passed=9), "pytest_s": 30.0,
      "failed_ids": ["tests/test_a.py::test_b"], "error_ids": []}),
    # a timeout after the failures were printed by another tool: ids, no summary
    ("FAILED tests/test_a.py::test_b - Failed: Timeout >300.0s\nmake: *** [test] Killed\n",
     {"summary_found": False, "counts": None, "pytest_s": None,
      "failed_ids": ["tests/test_a.py::test_b"], "error_ids": []}),
    # look-alikes that are not pytest's
    ("the run passed in 3.2s\nFAILED to connect\n12 passed in 1.5s, retrying\n",
     {"summary_found": False, "counts": None, "pytest_s": None,
      "failed_ids": [], "error_ids": []}),
])
def test_parse_pytest_output(text, expected) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("exit_code, timed_out, parsed, ok", [
    (0, False, counts(passed=3), True),
    (0, False, None, True),  # not pytest: the exit code decides
    (1, False, counts(passed=3, failed=1), False),
    (0, False, counts(passed=3, errors=1), False),  # pytest's word over the exit code
    (None, True, None, False),
    (0, True, counts(passed=3), False),
    (None, False, None, False),  # never started (the clone failed)
])
def test_run_ok(exit_code, timed_out, parsed, ok) -> None:
    assert suite_repeat.run_ok(exit_code, timed_out, parsed) is ok


def test_summarise() -> None:
    records = [{"ok": True, "wall_s": 100.0, "pytest_s": 90.0},
               {"ok": False, "wall_s": 700.0, "pytest_s": 650.0}]
    assert suite_repeat.summarise(records) == {
        "runs": 2, "runs_passed": 1, "all_green": False, "max_wall_s": 700.0,
        "mean_wall_s": 400.0, "max_pytest_s": 650.0, "suite_under_10_min": False}
    assert suite_repeat.summarise(records[:1])["all_green"] is True
    assert suite_repeat.summarise(records[:1])["suite_under_10_min"] is True
    killed = [{"ok": False, "wall_s": 5.0, "pytest_s": None}]  # no summary: not "under"
    assert suite_repeat.summarise(killed)["suite_under_10_min"] is False


# ---- end to end, with stand-in commands -----------------------------------------------------


def run_script(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(proc.stdout)


def test_one_green_run_end_to_end(tmp_path) -> None:
    out = tmp_path / "report.json"
    # the clone is a real one: the command sees the repository's files, and CI=true
    command = ("test -f .ci/run && test \"$CI\" = true && ! read -r line"
               " && printf '=== 3 passed, 1 skipped in 0.42s ===\\n'")
    _, report = run_script("--runs", "1", "--command", command, "--out", str(out))

    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "suite_repeat" and report["command"] == command
    assert report["repo"] == str(ROOT) and len(report["commit"]) == 40
    assert report["fresh_venv"] is True and report["reused_venv"] is None
    assert report["runs"] == report["runs_passed"] == report["runs_requested"] == 1
    assert report["all_green"] is True and report["suite_under_10_min"] is True
    assert report["max_wall_s"] == report["mean_wall_s"] > 0
    [run] = report["per_run"]
    assert run["ok"] and run["exit_code"] == 0 and not run["timed_out"]
    assert (run["passed"], run["failed"], run["skipped"], run["pytest_s"]) == (3, 0, 1, 0.42)
    assert run["failed_ids"] == [] and run["log"] is None
    # the temporary work directory, clones and logs are gone
    assert report["logs_kept_in"] is None and not Path(report["workdir"]).exists()


def test_a_failed_run_stops_and_keeps_its_log(tmp_path) -> None:
    command = ("printf 'FAILED tests/test_sync.py::test_bad - assert 1 == 2\\n"
               "1 failed, 5 passed in 1.25s\\n'; exit 1")
    proc, report = run_script("--runs", "3", "--stop-on-fail", "--command", command,
                              "--workdir", str(tmp_path / "work"))

    assert report["runs"] == 1 and report["runs_requested"] == 3 and report["stopped_early"]
    assert report["all_green"] is False and report["runs_passed"] == 0
    [run] = report["per_run"]
    assert not run["ok"] and run["exit_code"] == 1
    assert run["failed_ids"] == ["tests/test_sync.py::test_bad"]
    assert (run["failed"], run["passed"]) == (1, 5)
    log = Path(run["log"])
    assert log.parent == tmp_path / "work" and "1 failed, 5 passed" in log.read_text()
    assert report["logs_kept_in"] == str(tmp_path / "work")
    assert not (tmp_path / "work" / "run-01").exists()  # the clone is removed
    assert "tests/test_sync.py::test_bad" in proc.stderr


def test_a_run_past_its_timeout_is_killed(tmp_path) -> None:
    pidfile = tmp_path / "pid"
    # a process in a session of its own (out of the command's group): found as a descendant
    command = (f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & echo started; sleep 60")
    _, report = run_script("--runs", "1", "--timeout-s", "1", "--command", command,
                           "--workdir", str(tmp_path / "work"))

    [run] = report["per_run"]
    assert run["timed_out"] and not run["ok"] and run["exit_code"] is None
    assert run["summary_found"] is False and run["pytest_s"] is None and run["passed"] is None
    assert 1 <= run["wall_s"] < 30
    assert report["suite_under_10_min"] is False
    assert "started" in Path(run["log"]).read_text()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break  # killed, not yet reaped by whoever adopted it
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        assert not psutil.pid_exists(pid), "the setsid process outlived the run"


def test_reuse_venv_copies_it_and_says_not_fresh(tmp_path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "marker").write_text("mine")
    command = ("test ! -L .venv && test \"$(cat .venv/marker)\" = mine && rm .venv/marker"
               " && printf '1 passed in 0.01s\\n'")
    _, report = run_script("--runs", "2", "--reuse-venv", str(venv), "--command", command)

    assert report["fresh_venv"] is False and report["reused_venv"] == str(venv)
    assert report["all_green"] and all(r["fresh_venv"] is False for r in report["per_run"])
    assert (venv / "marker").exists()  # each run had its own copy


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs 0"),
    (["--ref", "no-such-branch"], "not a commit"),
    (["--reuse-venv", "/nonexistent"], "no bin/python"),
])
def test_bad_options_say_why_and_exit_2(args, message) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
