"""Role processes forked from a warm interpreter (the zygote).

A role started as a fresh interpreter first spends a second or more of CPU on
``import torch``, and a local job starts S + R·K + D of them at once, often on
a machine with two cores: most of a job's start-up went there. The zygote is
one interpreter, started by the coordinator's process as early as it can
(`prestart`), that imports torch and every role's modules once and then forks
one role process per request; a fork takes milliseconds and the children share
the zygote's pages. It imports no data and starts no thread of its own, so
forking it is safe.

Where the coordinator's process has one thread and has not imported torch
when it starts the zygote (the command line's), it imports torch and forks the
zygote from itself, which then has torch without importing it again: a second
of CPU less per job. A process with other threads (a notebook, a test runner
calling `distbelief.train`) must not fork; its zygote is a fresh interpreter,
``python -m distbelief.runtime.zygote``, whose imports overlap with the
coordinator's own.

Protocol, one JSON line each way over the zygote's stdin and stdout::

    -> {"env": {...}, "path": [...], "cwd": "...", "log": "...", "entry": "mod:fn"}
    <- {"pid": N}                                                 its process id
    <- {"exit": N, "code": C}                                     a child ended

``C`` is what `subprocess.Popen.returncode` would say (-9 when SIGKILLed).
The zygote ends when its stdin closes, and dies with the process that started
it (``PR_SET_PDEATHSIG``); its children die with it the same way.

`Zygote.spawn` returns a `ForkedProcess`, which answers like a `Popen`
(`pid`, `poll`, `wait`, `send_signal`, `returncode`), so the launcher treats
both alike. Example::

    child = zygote().spawn(env, log_path=Path("run/logs/shard0.log"))
    child.wait(30)
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from distbelief.errors import JobFailed

PRELOAD = ("torch", "torch.distributed", "numpy")
"""Imported once in the zygote: what every role would otherwise import on its own."""
PRELOAD_HOOK = "distbelief.roles:preload"
"""Called once in the zygote after PRELOAD: imports the roles' own modules."""
POLL_SECONDS = 0.02
ROLE_MAIN = "distbelief.roles:main"


class ForkedProcess:
    """A role process forked by the zygote, with the part of `Popen`'s interface the
    launcher uses. Thread-safe."""

    def __init__(self, zygote: Zygote, pid: int):
        self._zygote, self.pid = zygote, pid
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        if self._code is None:  # kept once known, as Popen does: the pid may be reused
            self._code = self._zygote.exit_code(self.pid)
        return self._code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ended; raises subprocess.TimeoutExpired after `timeout`."""
        if self._code is None:
            self._code = self._zygote.wait_exit(self.pid, timeout)
        code = self._code
        if code is None:
            raise subprocess.TimeoutExpired(f"role process {self.pid}", timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # like Popen: an ended process is not signalled
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _single_threaded() -> bool:
    """Whether this process has one thread (the kernel's count, native threads included)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _ForkedZygote:
    """A zygote forked from this process (after its imports), with the part of `Popen`'s
    interface that `Zygote` uses."""

    def __init__(self):
        requests, self_requests = os.pipe()  # the zygote reads requests from its stdin
        self_answers, answers = os.pipe()  # and answers on its stdout
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # else both processes would write what is buffered
        pid = os.fork()
        if pid == 0:  # the zygote: never returns into the coordinator's code
            code = 1
            try:
                os.dup2(requests, 0)
                os.dup2(answers, 1)
                for fd in (requests, self_requests, self_answers, answers):
                    os.close(fd)  # its own write end of stdin kept would hide the EOF
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler
                if os.getppid() == parent:  # else the coordinator died before that took effect
                    main()
                    code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(requests)
        os.close(answers)
        self.pid = pid
        self.stdin = os.fdopen(self_requests, "wb")
        self.stdout = os.fdopen(self_answers, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it has ended
                self.returncode = -signal.SIGKILL
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("the role launcher (forked zygote)", timeout)
            time.sleep(POLL_SECONDS)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """The coordinator's handle on its zygote process. Thread-safe.

    With `fork` (and this process single-threaded) the zygote is forked from this process
    once torch is imported here; otherwise it is a fresh interpreter."""

    def __init__(self, fork: bool = False):
        # one thread, and torch not yet imported: the threads torch's import starts are
        # then the zygote's own (it forks every role with them; a fresh one has them too)
        if fork and "torch" not in sys.modules and _single_threaded():
            for name in PRELOAD:
                importlib.import_module(name)
            self._process = _ForkedZygote()
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                   "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
            self._process = subprocess.Popen([sys.executable, "-m", "distbelief.runtime.zygote"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             env=env)
        self.forked = isinstance(self._process, _ForkedZygote)
        self._lock = threading.Lock()  # one spawn request at a time
        self._pids: queue.Queue = queue.Queue()
        self._exits: dict[int, int] = {}
        self._gone = False  # the zygote ended: every child it had died with it
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def spawn(self, env: dict[str, str], log_path: Path, timeout: float = 60.0,
              entry: str = ROLE_MAIN) -> ForkedProcess:
        """Fork a process that runs `entry` ("module:function", returning its exit code)
        with environment `env` and this process's import path and working directory,
        its output appended to `log_path`."""
        request = {"env": env, "path": [p for p in sys.path if p], "cwd": os.getcwd(),
                   "log": str(log_path), "entry": entry}
        with self._lock:
            try:
                self._process.stdin.write(json.dumps(request).encode() + b"\n")
                self._process.stdin.flush()
                pid = self._pids.get(timeout=timeout)
            except (OSError, queue.Empty):
                pid = None
        if pid is None:
            raise JobFailed(f"the role launcher (python -m distbelief.runtime.zygote) "
                            f"{'exited' if not self.alive else 'did not answer'} before starting "
                            "a role process; its error, if any, is printed above: run that "
                            "command to see it again")
        return ForkedProcess(self, pid)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid, -signal.SIGKILL if self._gone else None)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._gone, timeout)
            return self._exits.get(pid, -signal.SIGKILL if self._gone else None)

    def close(self) -> None:
        """End the zygote (its children, if any are left, die with it)."""
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)

    def _read(self) -> None:
        for line in self._process.stdout:
            message = json.loads(line)
            if "pid" in message:
                with self._changed:  # a reused pid: the exit on record was its predecessor's
                    self._exits.pop(message["pid"], None)
                self._pids.put(message["pid"])
            else:
                with self._changed:
                    self._exits[message["exit"]] = message["code"]
                    self._changed.notify_all()
        # the zygote is gone, and with it (PDEATHSIG) every child it still had
        self._pids.put(None)
        with self._changed:
            self._gone = True
            self._changed.notify_all()


_shared: Zygote | None = None
_shared_lock = threading.Lock()


def zygote(fork: bool = False) -> Zygote:
    """This process's zygote, started on first use (and again if it died); `fork` as in
    `Zygote`."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            _shared = Zygote(fork)
        return _shared


def prestart() -> None:
    """Start the zygote now: forked from this process where it has one thread (after
    importing torch here), else a fresh interpreter whose imports overlap with this
    process's own."""
    zygote(fork=True)


# ---- the zygote process -------------------------------------------------------


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _serve() -> None:
    """Read spawn requests until stdin closes; report children's pids and exits."""
    children: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], POLL_SECONDS)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = _fork(json.loads(line))
                children.add(pid)
                _tell({"pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            _tell({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(request: dict) -> int:
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent()  # cleared by fork: set again, for the child
        if os.getppid() != zygote_pid:  # the zygote died before that took effect
            os._exit(1)
        code = _child(request)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _child(request: dict) -> int:
    """In the forked child: become the role process a fresh interpreter would have been."""
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    # what `ps -o comm` and `top` show, instead of the zygote's name: e.g. "db-replica0.1"
    name = f"db-{os.environ.get('DISTBELIEF_ROLE', 'role')}{os.environ.get('DISTBELIEF_ID', '')}"
    part = os.environ.get("DISTBELIEF_PART")
    name += f".{part}" if part else ""
    ctypes.CDLL("libc.so.6").prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    sys.path[:] = request["path"]
    os.chdir(request["cwd"])
    module, function = request["entry"].split(":")
    return getattr(importlib.import_module(module), function)()


def _warm_optimizers() -> None:
    """Build one throwaway optimizer of each kind the roles use: the first construction
    imports about 800 modules (torch._dynamo, sympy; a second or more), which every shard
    and synchronous replica would otherwise import again. Starts no thread."""
    import torch

    for optimizer in (torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adam):
        optimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def _tell(message: dict) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")  # one write: lines never interleave


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    for name in PRELOAD:
        importlib.import_module(name)
    module, _, function = PRELOAD_HOOK.partition(":")
    getattr(importlib.import_module(module), function)()
    _warm_optimizers()
    _serve()


if __name__ == "__main__":
    main()
