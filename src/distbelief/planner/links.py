"""The hardware a plan is for: cores, memory and links, measured here or given.

`Hardware.measure()` reads this host's cores and memory and times its two
links: a copy into shared memory (how tensors move between processes on one
host) and a TCP stream over loopback (gloo's path). Every figure can be given
instead, to plan for a cluster you do not have yet::

    hw = Hardware.measure(hosts=8, cores_per_host=32, link_bandwidth=parse_bandwidth("10Gbit"))

Each measurement is bounded: at most about a second, whatever the host.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass

from distbelief.errors import UserError

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str) -> float:
    """Bytes per second from "10Gbit", "10Gbit/s", "1.5GB/s", "800MB" (k/M/G/T, decimal).

    >>> parse_bandwidth("10Gbit")
    1250000000.0
    >>> parse_bandwidth("2GB/s")
    2000000000.0
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(bit|b|byte)?(?:/s|ps)?\s*",
                         text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--link-bandwidth {text!r} is not a bandwidth: give a number and a "
                        "unit, e.g. 10Gbit or 1.2GB/s")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    unit = match.group(3) or "B"
    return value / 8 if unit.lower() == "bit" else value


def parse_memory(text: str) -> int:
    """Bytes from "64GB", "512MB", "1.5TiB"-style sizes (k/M/G/T, decimal; Ki/Mi/Gi/Ti binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--memory-per-host {text!r} is not a size: give e.g. 64GB or 512MiB")
    base = 1024 if match.group(3) else 1000
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * base ** power)


@dataclass
class Hardware:
    """What a plan is for. Bandwidths in bytes per second."""

    hosts: int
    cores_per_host: int
    memory_per_host: int
    """Bytes a job may use on one host (this host: its available memory)."""
    shm_bandwidth: float
    """One copy into shared memory (a transfer between processes on one host makes two)."""
    link_bandwidth: float
    """Between processes over TCP: loopback on one host, the network between hosts."""
    latency: float
    """Seconds of one round trip of a small message (a command header) over TCP."""
    measured: tuple[str, ...] = ()
    """Which of the figures were measured here (the rest were given)."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["measured"] = list(self.measured)
        return data

    @classmethod
    def measure(cls, *, hosts: int | None = None, cores_per_host: int | None = None,
                memory_per_host: int | None = None, link_bandwidth: float | None = None,
                shm_bandwidth: float | None = None, latency: float | None = None) -> Hardware:
        """This host's figures, except those given."""
        measured = []
        if hosts is not None and hosts < 1:
            raise UserError(f"--hosts {hosts}: give at least 1")
        if cores_per_host is not None and cores_per_host < 1:
            raise UserError(f"--cores-per-host {cores_per_host}: give at least 1")
        if cores_per_host is None:
            cores_per_host = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
            measured.append("cores_per_host")
        if memory_per_host is None:
            memory_per_host = available_memory()
            measured.append("memory_per_host")
        if shm_bandwidth is None:
            shm_bandwidth = measure_copy_bandwidth()
            measured.append("shm_bandwidth")
        if link_bandwidth is None:
            link_bandwidth = measure_tcp_bandwidth()
            measured.append("link_bandwidth")
        if latency is None:
            latency = measure_tcp_latency()
            measured.append("latency")
        return cls(hosts=hosts or 1, latency=latency, cores_per_host=cores_per_host,
                   memory_per_host=memory_per_host, shm_bandwidth=shm_bandwidth,
                   link_bandwidth=link_bandwidth, measured=tuple(measured))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, else physical memory (bytes)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_copy_bandwidth(nbytes: int = 32 << 20, repeats: int = 3) -> float:
    """Bytes per second of one copy into a shared-memory tensor (the fastest of `repeats`)."""
    import torch

    dst = torch.empty(nbytes // 4).share_memory_()
    src = torch.ones(nbytes // 4)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_tcp_bandwidth(nbytes: int = 32 << 20, timeout: float = 2.0) -> float:
    """Bytes per second of one TCP stream over loopback (gloo's path between two processes
    of one host); gives up after `timeout` seconds and reports what had arrived by then."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)
    received = [0]

    def sink() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            while received[0] < nbytes:
                try:
                    chunk = conn.recv(1 << 20)
                except OSError:
                    return
                if not chunk:
                    return
                received[0] += len(chunk)

    thread = threading.Thread(target=sink, daemon=True, name="tcp-sink")
    thread.start()
    payload = memoryview(bytearray(1 << 20))
    start = time.perf_counter()
    try:
        with socket.create_connection(listener.getsockname(), timeout=timeout) as conn:
            sent = 0
            while sent < nbytes and time.perf_counter() - start < timeout:
                conn.sendall(payload)
                sent += len(payload)
            thread.join(max(0.0, timeout - (time.perf_counter() - start)))
    finally:
        listener.close()
    elapsed = time.perf_counter() - start
    if received[0] == 0:
        raise UserError("could not measure the loopback link (no byte arrived in "
                        f"{timeout:g} s): give --link-bandwidth instead")
    return received[0] / elapsed


def measure_tcp_latency(rounds: int = 200, timeout: float = 2.0) -> float:
    """Seconds of one round trip of a 48-byte message over loopback (the median)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)

    def echo() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while data := conn.recv(48):
                    conn.sendall(data)
            except OSError:
                return

    thread = threading.Thread(target=echo, daemon=True, name="tcp-echo")
    thread.start()
    times = []
    try:
        with socket.create_connection(listener.getsockname(), timeout=timeout) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = bytes(48)
            deadline = time.perf_counter() + timeout
            for _ in range(rounds):
                start = time.perf_counter()
                conn.sendall(message)
                got = 0
                while got < len(message):
                    chunk = conn.recv(48 - got)
                    if not chunk:
                        break
                    got += len(chunk)
                times.append(time.perf_counter() - start)
                if start > deadline:
                    break
    finally:
        listener.close()
    thread.join(timeout)
    times.sort()
    return times[len(times) // 2]
