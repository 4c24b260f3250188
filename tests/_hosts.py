"""Separate "hosts" for multi-host tests: Linux namespaces joined by a virtual switch.

Each host is a network namespace (its own interfaces, loopback and address on
10.231.<net>.0/24, reached from the others through a veth pair and a bridge in
a switch namespace), with its own hostname (UTS namespace) and its own
`/dev/shm` and `/etc/hosts` (mount namespace). A holder process (`sleep`) keeps
a host's namespaces alive; commands run in them through `nsenter`. Needs root
and iproute2; `Hosts.unavailable()` says why not, for a skip.

Example::

    with Hosts(3) as hosts:
        proc = hosts[1].popen(["hostname"], stdout=subprocess.PIPE)

Everything is removed on exit, whatever happened: every process started on a
host is killed by PID, then the namespaces are deleted (which deletes their
interfaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

NET = 231  # 10.231.<net>.0/24: addresses exist only inside the namespaces made here


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


class Host:
    """One namespace host: `name` (its hostname), `address`, `popen` to run a command there."""

    def __init__(self, hosts: Hosts, index: int):
        self.index, self.name = index, f"host{index}"
        self.netns = f"{hosts.prefix}-h{index}"
        self.address = f"10.{NET}.{hosts.net}.{index + 1}"
        self.interface = "eth0"
        self._hosts = hosts
        self.holder: subprocess.Popen | None = None
        self.processes: list[subprocess.Popen] = []

    def start(self, etc_hosts: Path) -> None:
        h = self._hosts
        outside, inside = f"{h.prefix}h{self.index}", f"{h.prefix}s{self.index}"
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", outside, "netns", self.netns, "name", self.interface)
        _run("ip", "link", "set", inside, "netns", h.switch)
        _run("ip", "-n", h.switch, "link", "set", inside, "master", "br0", "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", self.interface)
        _run("ip", "-n", self.netns, "link", "set", self.interface, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        setup = (f"hostname {self.name} && mount -t tmpfs tmpfs /dev/shm && "
                 f"mount --bind {etc_hosts} /etc/hosts && exec sleep 100000")
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount",
             "--propagation", "private", "sh", "-c", setup], start_new_session=True)
        deadline = time.monotonic() + 10
        while self._hostname() != self.name:  # the holder is set up once it answers
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name} did not start (holder exit "
                                   f"{self.holder.poll()})")
            time.sleep(0.05)

    def _hostname(self) -> str:
        result = subprocess.run(self.enter(["hostname"]), capture_output=True, text=True,
                                timeout=10)
        return result.stdout.strip()

    def enter(self, command: list[str], cwd: str | os.PathLike = "/") -> list[str]:
        """`command` as run inside this host's namespaces, in directory `cwd` (entering a
        mount namespace would otherwise leave it in /)."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", f"--wd={cwd}", "--",
                *command]

    def popen(self, command: list[str], cwd: str | os.PathLike = "/",
              **kwargs) -> subprocess.Popen:
        """Start `command` on this host in `cwd` (killed with its session when the hosts go)."""
        process = subprocess.Popen(self.enter(command, cwd), start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in [*self.processes, self.holder]:
            if process is not None and process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # its session: nsenter's child too
                except ProcessLookupError:
                    pass
                process.wait(10)


class Hosts:
    """`count` namespace hosts on one switch; a context manager that always cleans up."""

    def __init__(self, count: int, *, resolvable: bool = True):
        self.resolvable = resolvable  # hostnames in every host's /etc/hosts, as DNS would
        self.net = os.getpid() % 250 + 1
        self.prefix = f"db{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [Host(self, i) for i in range(count)]
        self._made: list[str] = []
        self._tmp: str | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why namespace hosts cannot be made here (None: they can)."""
        if os.geteuid() != 0:
            return "multi-host namespace tests need root (to make network namespaces)"
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                return f"multi-host namespace tests need {tool} (iproute2/util-linux)"
        probe = f"dbprobe{os.getpid()}"
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if result.returncode != 0:
            return f"cannot make network namespaces here: {result.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __enter__(self) -> Hosts:
        try:
            self._tmp = tempfile.mkdtemp(prefix="distbelief-hosts-")
            etc_hosts = Path(self._tmp) / "hosts"
            etc_hosts.write_text("127.0.0.1 localhost\n" + "".join(
                f"{h.address} {h.name}\n" for h in self.hosts if self.resolvable))
            for netns in [self.switch, *(h.netns for h in self.hosts)]:
                _run("ip", "netns", "add", netns)
                self._made.append(netns)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                host.start(etc_hosts)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            host.stop()
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
