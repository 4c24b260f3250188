"""Suite repeat: the whole test suite N times back to back, each run from a fresh clone.

A flaky test shows only now and then; CI runs the suite once. This script does what
CI does (`bash .ci/run`: `make test` creates .venv, installs, runs pytest) `--runs`
times in a row, each time in a fresh `git clone --no-local` of one commit (this
checkout's HEAD, or `--ref`), with stdin closed and CI=true, and reports for every
run the exit code, the wall seconds, pytest's counts and its own time, and the id of
every failing test.

What pytest prints is read from the run's log (stdout and stderr together): its
closing line ("2 failed, 480 passed, 3 skipped in 412.31s (0:06:52)") and the short
summary's "FAILED <id> - <message>" and "ERROR <id> - <message>" lines. pytest prints
those for failures and errors by default (`-r fE` since pytest 6; the project's
`addopts = "-ra"` adds the rest), `-q` included, so no PYTEST_ADDOPTS is needed.

Fresh by default: each clone's `make test` creates its own .venv and installs into
it, as CI does. `--reuse-venv PATH` copies an existing venv into each clone instead
(make then only reinstalls the package itself, since the clone's pyproject.toml is
newer than the copy's stamp, so the clone's own src is what is imported). The report
then says `"fresh_venv": false`. The venv is copied, not linked: make's reinstall
would otherwise point PATH's own editable install at a clone that is removed after.

Each clone is removed after its run. The logs go to the work directory; a temporary
one (the default) is removed at the end unless a run failed, and then only the
failed runs' logs stay there (the report's `logs_kept_in` and each run's `log`).

Prints ONE JSON document on stdout (and to `--out` when given); progress goes to
stderr. A timed-out run's processes are killed by PID (its process group and every
descendant found), and so is a running one when this script is interrupted.

Example::

    python benchmarks/suite_repeat.py                     # 10 runs of `bash .ci/run`
    python benchmarks/suite_repeat.py --runs 3 --stop-on-fail --out repeat.json
    python benchmarks/suite_repeat.py --runs 20 --reuse-venv .venv   # skip the installs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_LIMIT_S = 5400.0
"""CI's time limit for one run of the suite."""
SUITE_TARGET_S = 600.0
"""The suite should finish (pytest's own time) within 10 minutes."""

COUNT_KEYS = ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")
"""Always present in a parsed summary (0 when pytest did not name them)."""
_PLURAL = {"error": "errors", "warning": "warnings"}
"""pytest writes "1 error", "2 errors": the report uses one key for both."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_COUNT = r"\d+ [a-z]+"
_SUMMARY = re.compile(
    rf"^=*\s*(?P<counts>{_COUNT}(?:, {_COUNT})*|no tests ran)"
    r" in (?P<seconds>\d+(?:\.\d+)?)s(?: \(\d+:\d\d:\d\d\))?\s*=*$")
# a node id: a .py path, "::" names without spaces, then parameters that may hold
# anything (" - " too); a collection error's id is the file alone
_OUTCOME = re.compile(r"^(?P<what>FAILED|ERROR) "
                      r"(?P<id>[^\s\[]*\.py(?:::[^\s\[]+)?(?:\[.*?\])?)(?: - |$)")


def parse_pytest_output(text: str) -> dict:
    """What pytest's output says: its closing summary and the failing tests' ids.

    Returns ``{"summary_found", "counts", "pytest_s", "failed_ids", "error_ids"}``.
    ``counts`` holds every count the closing line names (``COUNT_KEYS`` always, 0 when
    not named; "error"/"errors" both count as ``errors``); it and ``pytest_s`` are None
    when there is no closing line (a run killed by a timeout). The last closing line
    counts: a test's own output may hold earlier ones. Ids keep their first order, each
    once. Pure: no I/O.
    """
    counts = None
    seconds = None
    failed: dict[str, None] = {}
    errors: dict[str, None] = {}
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        summary = _SUMMARY.match(line)
        if summary:
            counts = dict.fromkeys(COUNT_KEYS, 0)
            if summary["counts"] != "no tests ran":
                for part in summary["counts"].split(", "):
                    n, word = part.split(" ")
                    counts[_PLURAL.get(word, word)] = int(n)
            seconds = float(summary["seconds"])
            continue
        outcome = _OUTCOME.match(line)
        if outcome:
            (failed if outcome["what"] == "FAILED" else errors)[outcome["id"]] = None
    return {"summary_found": counts is not None, "counts": counts, "pytest_s": seconds,
            "failed_ids": list(failed), "error_ids": list(errors)}


def run_ok(exit_code: int | None, timed_out: bool, counts: dict | None) -> bool:
    """A run passed: the command exited 0 in time, and pytest (if it said) saw no
    failure and no error."""
    if timed_out or exit_code != 0:
        return False
    return counts is None or (counts["failed"] == 0 and counts["errors"] == 0)


def summarise(records: list[dict]) -> dict:
    """The report's summary fields over the per-run records."""
    walls = [r["wall_s"] for r in records]
    pytest_times = [r["pytest_s"] for r in records]
    return {
        "runs": len(records),
        "runs_passed": sum(r["ok"] for r in records),
        "all_green": bool(records) and all(r["ok"] for r in records),
        "max_wall_s": max(walls, default=None),
        "mean_wall_s": statistics.fmean(walls) if walls else None,
        "max_pytest_s": max((t for t in pytest_times if t is not None), default=None),
        "suite_under_10_min": bool(records) and all(
            t is not None and t < SUITE_TARGET_S for t in pytest_times),
    }


# ---- one run -----------------------------------------------------------------------------


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group and every descendant found, each by PID."""
    try:
        import psutil
    except ImportError:  # the group alone, then (psutil comes with the test extra)
        psutil = None
    tree = []
    if psutil is not None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:  # the command itself is gone already
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group id is its pid
    except ProcessLookupError:
        pass
    for child in tree:  # those that left the group (a test's own session)
        try:
            child.kill()
        except psutil.Error:  # gone already
            pass
    proc.wait()


def _child_env() -> dict[str, str]:
    """This environment with CI=true, less what a pytest around this script set."""
    env = {k: v for k, v in os.environ.items()
           if not (k == "PYTEST_CURRENT_TEST" or k.startswith("PYTEST_XDIST"))}
    env["CI"] = "true"
    return env


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL).stdout.strip()


def prepare_clone(repo: Path, commit: str, clone: Path, reuse_venv: Path | None) -> None:
    """A fresh clone of `repo` at `commit` in `clone`, with a copy of `reuse_venv` as its
    .venv when given. Raises CalledProcessError/OSError."""
    _git("clone", "--quiet", "--no-local", "--no-checkout", str(repo), str(clone))
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit,
         cwd=clone)
    if reuse_venv is not None:
        shutil.copytree(reuse_venv, clone / ".venv", symlinks=True)


def run_once(number: int, repo: Path, commit: str, workdir: Path, command: str,
             timeout_s: float, reuse_venv: Path | None) -> dict:
    """Clone, run `command` in the clone, parse its log; the run's record. Blocks for
    the run; the command and its processes are gone when this returns (or raises)."""
    clone = workdir / f"run-{number:02d}"
    log = workdir / f"run-{number:02d}.log"
    record = {"run": number, "exit_code": None, "timed_out": False, "wall_s": 0.0,
              "setup_s": None, "fresh_venv": reuse_venv is None}
    began = time.monotonic()
    try:
        try:
            prepare_clone(repo, commit, clone, reuse_venv)
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.write_text(f"suite_repeat: preparing the clone failed: {detail}\n")
            record.update(setup_s=time.monotonic() - began, error="clone failed",
                          **parse_pytest_output(""))
            return _finish(record, log)
        record["setup_s"] = time.monotonic() - began
        with open(log, "wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=_child_env(),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                record["exit_code"] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                record["timed_out"] = True
                _kill_tree(proc)
            finally:
                if proc.returncode is None:  # interrupted: nothing may outlive this call
                    _kill_tree(proc)
            record["wall_s"] = time.monotonic() - started
        record.update(parse_pytest_output(log.read_text(errors="replace")))
        return _finish(record, log)
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def _finish(record: dict, log: Path) -> dict:
    """The record in the report's order: outcome, times, counts, failing ids, log."""
    counts = record["counts"] or {}
    out = {"run": record["run"],
           "ok": run_ok(record["exit_code"], record["timed_out"], record["counts"]),
           "exit_code": record["exit_code"], "timed_out": record["timed_out"],
           "wall_s": record["wall_s"], "pytest_s": record["pytest_s"],
           "setup_s": record["setup_s"], "summary_found": record["summary_found"],
           **{k: counts.get(k) for k in COUNT_KEYS},
           "other_counts": {k: v for k, v in counts.items() if k not in COUNT_KEYS},
           "failed_ids": record["failed_ids"], "error_ids": record["error_ids"],
           "fresh_venv": record["fresh_venv"], "log": str(log)}
    if "error" in record:
        out["error"] = record["error"]
    return out


# ---- the report ---------------------------------------------------------------------------


def _progress(record: dict, total: int) -> str:
    if record.get("error"):
        said = record["error"]
    elif record["summary_found"]:
        said = ", ".join(f"{record[k]} {k}" for k in COUNT_KEYS if record[k]) or "no tests"
        said += f" in {record['pytest_s']:.1f} s"
    else:
        said = "no pytest summary"
    if record["timed_out"]:
        said += " (timed out)"
    failing = record["failed_ids"] + record["error_ids"]
    tail = "".join(f"\n    {i}" for i in failing)
    return (f"run {record['run']}/{total}: {'ok' if record['ok'] else 'FAILED'}, {said}, "
            f"exit {record['exit_code']}, wall {record['wall_s']:.1f} s{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10,
                        help="runs of the suite, one after another (default: %(default)s)")
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="the git repository to clone (default: this checkout)")
    parser.add_argument("--ref", default="HEAD",
                        help="the commit (or branch, tag) of --repo each run clones "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the clones and logs go (default: a temporary directory, "
                             "removed after unless a run failed)")
    parser.add_argument("--command", default="bash .ci/run",
                        help="what each run runs in its clone, through bash -c "
                             "(default: %(default)s)")
    parser.add_argument("--keep-going", dest="keep_going", action="store_true", default=True,
                        help="do every run whatever the earlier ones did (the default)")
    parser.add_argument("--stop-on-fail", dest="keep_going", action="store_false",
                        help="stop after the first run that did not pass")
    parser.add_argument("--timeout-s", type=float, default=CI_LIMIT_S,
                        help="seconds one run may take before it is killed "
                             "(default: %(default)s, CI's limit)")
    parser.add_argument("--reuse-venv", type=Path, default=None, metavar="PATH",
                        help="copy this venv into each clone instead of a fresh install "
                             "(reported as fresh_venv: false)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    if args.runs < 1:
        parser.error(f"--runs {args.runs}: give 1 or more")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s {args.timeout_s}: give a positive number of seconds")
    repo = args.repo.resolve()
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{args.ref}^{{commit}}", cwd=repo)
    except (subprocess.CalledProcessError, OSError):
        parser.error(f"--repo {args.repo} --ref {args.ref}: not a commit of a git repository "
                     "(give a repository's path and one of its branches, tags or commits)")
    reuse = None
    if args.reuse_venv is not None:
        reuse = args.reuse_venv.resolve()
        if not (reuse / "bin" / "python").exists():
            parser.error(f"--reuse-venv {args.reuse_venv}: no bin/python there (give a venv "
                         "made by `make test`, e.g. .venv)")

    temporary = args.workdir is None
    if temporary:
        workdir = Path(tempfile.mkdtemp(prefix="suite-repeat-"))
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    records: list[dict] = []
    began = time.monotonic()
    try:
        for number in range(1, args.runs + 1):
            record = run_once(number, repo, commit, workdir, args.command, args.timeout_s,
                              reuse)
            records.append(record)
            print(_progress(record, args.runs), file=sys.stderr, flush=True)
            if not record["ok"] and not args.keep_going:
                break
    finally:
        if temporary:  # keep what explains a failure, nothing else
            for record in records:
                if record["ok"]:
                    Path(record["log"]).unlink(missing_ok=True)
            if all(r["ok"] for r in records):
                shutil.rmtree(workdir, ignore_errors=True)
    for record in records:
        if not Path(record["log"]).exists():
            record["log"] = None
    kept = workdir if any(r["log"] for r in records) else None

    report = {
        "benchmark": "suite_repeat",
        "command": args.command, "repo": str(repo), "ref": args.ref, "commit": commit,
        "runs_requested": args.runs, "keep_going": args.keep_going,
        "stopped_early": len(records) < args.runs,
        "timeout_s": args.timeout_s,
        "fresh_venv": reuse is None,
        "reused_venv": None if reuse is None else str(reuse),
        "workdir": str(workdir), "workdir_temporary": temporary,
        "logs_kept_in": None if kept is None else str(kept),
        "wall_seconds": time.monotonic() - began,
        "machine": {"cpus": os.cpu_count(), "load_before": list(load_before),
                    "load_after": list(os.getloadavg())},
        **summarise(records),
        "target": {"suite_under_s": SUITE_TARGET_S, "all_green": True},
        "per_run": records,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
