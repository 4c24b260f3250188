"""The hardware a plan is for: cores, memory and links, measured here or given.

`Hardware.measure()` reads this host's cores and memory and times its links: a
copy into shared memory (how tensors move between processes on one host), gloo
(two process groups of this process, over loopback: the round trip of a command
header, the bandwidth of a large tensor, the fixed cost of an all-reduce), and a
round trip to a c10d store (the job store's). Every figure can be given instead,
to plan for a cluster you do not have yet::

    hw = Hardware.measure(hosts=8, cores_per_host=32, link_bandwidth=parse_bandwidth("10Gbit"))

Each measurement is bounded: at most about a second, whatever the host.
"""

from __future__ import annotations

import os
import re
import sys
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
    """gloo between processes: over loopback on one host, the network between hosts."""
    latency: float
    """Seconds of one gloo round trip of a small message (a command header)."""
    allreduce_latency: float = 0.0
    """Seconds of an all-reduce of a few numbers between two members (its fixed cost)."""
    allreduce_bandwidth: float = 0.0
    """B of an all-reduce's 2(n-1)/n * P / B, from one of a large tensor between two members
    (gloo on one host: the reduction's arithmetic and copies included; 0: link_bandwidth)."""
    store_latency: float = 0.0
    """Seconds of one round trip to the job store (a c10d TCPStore)."""
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
            cores_per_host = available_cores()
            measured.append("cores_per_host")
        if memory_per_host is None:
            memory_per_host = available_memory()
            measured.append("memory_per_host")
        if shm_bandwidth is None:
            shm_bandwidth = measure_copy_bandwidth()
            measured.append("shm_bandwidth")
        gloo = measure_gloo()
        if link_bandwidth is None:
            link_bandwidth = gloo["bandwidth"]
            measured.append("link_bandwidth")
        if latency is None:
            latency = gloo["latency"]
            measured.append("latency")
        measured += ["allreduce_latency", "store_latency"]
        return cls(hosts=hosts or 1, latency=latency, allreduce_latency=gloo["allreduce"],
                   allreduce_bandwidth=(gloo["allreduce_bandwidth"] if "link_bandwidth" in measured
                                        else 0.0),
                   store_latency=measure_store_latency(), cores_per_host=cores_per_host,
                   memory_per_host=memory_per_host, shm_bandwidth=shm_bandwidth,
                   link_bandwidth=link_bandwidth, measured=tuple(measured))


def available_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def measure_gloo(nbytes: int = 8 << 20, timeout: float = 5.0) -> dict[str, float]:
    """gloo between two process groups of this process (each in its own thread, over
    loopback): the bandwidth of an `nbytes` tensor each way, an all-reduce of 2 numbers
    (the lower quartile of many), which is also a small message's round trip, and the
    bandwidth of an all-reduce of `nbytes`.
    Every wait is bounded by `timeout` (gloo raises past it)."""
    import datetime

    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    errors: list[BaseException] = []
    result: dict[str, float] = {}

    def member(rank: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=timeout))
            peer = 1 - rank
            small, big = torch.zeros(2), torch.zeros(nbytes // 4)

            def ping(buf: torch.Tensor) -> None:
                if rank == 0:
                    pg.send([buf], peer, 0).wait()
                    pg.recv([buf], peer, 0).wait()
                else:
                    pg.recv([buf], peer, 0).wait()
                    pg.send([buf], peer, 0).wait()

            ping(big)  # warm: the first large transfer allocates
            start = time.perf_counter()
            ping(big)
            big_seconds = time.perf_counter() - start
            reduces = []
            for _ in range(30):
                start = time.perf_counter()
                pg.allreduce([small]).wait()
                reduces.append(time.perf_counter() - start)
            pg.allreduce([big]).wait()  # warm
            start = time.perf_counter()
            pg.allreduce([big]).wait()
            reduce_seconds = time.perf_counter() - start
            if rank == 0:
                # a two-member all-reduce is one exchange each way: a header's round
                # trip (a send/recv ping-pong between two threads of one process
                # sometimes waits ~4 ms for the other's wake-up, two processes do not)
                quick = sorted(reduces)[len(reduces) // 4]  # lower quartile
                # 2(n-1)/n * P / B with n = 2: the bandwidth B the formula needs
                result.update(latency=quick, bandwidth=2 * nbytes / big_seconds,
                              allreduce=quick, allreduce_bandwidth=nbytes / reduce_seconds)
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(r,), daemon=True, name=f"gloo-{r}")
               for r in range(2)]
    # two processes would not share a GIL: hand it over at once, not every 5 ms
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * timeout)
    finally:
        sys.setswitchinterval(interval)
    if errors or not result:
        why = errors[0] if errors else "timeout"
        raise UserError(f"could not measure gloo on this host ({why}): give --link-bandwidth "
                        "instead")
    return result


def measure_store_latency(rounds: int = 200, timeout: float = 5.0) -> float:
    """The median round trip of a get to a c10d TCPStore over loopback (the job store)."""
    import datetime

    import torch.distributed as dist

    wait = datetime.timedelta(seconds=timeout)
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=wait, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=wait)
    client.set("planner/probe", "1")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.get("planner/probe")
        times.append(time.perf_counter() - start)
    del client, server
    return sorted(times)[rounds // 2]
