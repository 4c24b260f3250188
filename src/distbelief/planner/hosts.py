"""The hosts of a multi-host plan, measured: ``distbelief plan`` on every rank.

Started as a multi-host job is (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the
job's secret token on every host), every rank joins rank 0's job store and says
which host it is on, how many cores and how much memory it has. Rank 0 then
exchanges one large tensor and a few small messages over gloo with one rank of
every other host, one host after another (the links between hosts), while the
other ranks answer; each rank then returns, and rank 0 plans for those hosts.
Every wait is bounded by `timeout`; the whole exchange takes about a second.
"""

from __future__ import annotations

import datetime
import socket
import time

from distbelief.planner.links import Hardware, available_cores, available_memory

PROBE_BYTES = 16 << 20
SMALL_ROUNDS = 20


def measure_between_hosts(env, timeout: float = 60.0) -> Hardware | None:
    """Rank 0: the hosts' Hardware (cores and memory: the smallest host's; links: the
    slowest measured between hosts); every other rank: None, once it has answered."""
    import torch
    import torch.distributed as dist

    from distbelief.runtime.store import JobStore

    if env.rank == 0:
        store = JobStore.host("0.0.0.0", env.master_port, env.token, timeout=timeout)
    else:
        store = JobStore.connect(env.master_addr, env.master_port, env.token, timeout=timeout)
    try:
        store.set_json(f"plan/host/{env.rank}", {"host": socket.gethostname(),
                                                  "cores": available_cores(),
                                                  "memory": available_memory()})
        hosts = [store.get_json(f"plan/host/{r}", what=f"rank {r} to start 'distbelief plan'")
                 for r in range(env.world_size)]
        # one rank per other host measures with rank 0: the first rank seen on each host
        first: dict[str, int] = {}
        for r, info in enumerate(hosts):
            first.setdefault(info["host"], r)
        peers = [r for name, r in first.items() if name != hosts[0]["host"]]
        group = dist.ProcessGroupGloo(dist.PrefixStore("plan/pg", store.raw), env.rank,
                                      env.world_size, datetime.timedelta(seconds=timeout))
        big, small = torch.zeros(PROBE_BYTES // 4), torch.zeros(2)
        bandwidths, latencies = [], []
        for peer in peers:
            if env.rank == 0:
                group.send([big], peer, 0).wait()
                group.recv([big], peer, 0).wait()  # warm: connections and buffers
                start = time.perf_counter()
                group.send([big], peer, 0).wait()
                group.recv([big], peer, 0).wait()
                bandwidths.append(2 * PROBE_BYTES / (time.perf_counter() - start))
                rounds = []
                for _ in range(SMALL_ROUNDS):
                    start = time.perf_counter()
                    group.send([small], peer, 1).wait()
                    group.recv([small], peer, 1).wait()
                    rounds.append(time.perf_counter() - start)
                latencies.append(sorted(rounds)[len(rounds) // 2])
            elif env.rank == peer:
                for _ in range(2):
                    group.recv([big], 0, 0).wait()
                    group.send([big], 0, 0).wait()
                for _ in range(SMALL_ROUNDS):
                    group.recv([small], 0, 1).wait()
                    group.send([small], 0, 1).wait()
        if env.rank != 0:
            store.set_json(f"plan/done/{env.rank}", True)
            return None
        for r in range(1, env.world_size):  # everyone answered before rank 0's store goes
            store.get_json(f"plan/done/{r}", what=f"rank {r} to finish measuring")
        here = Hardware.measure(cores_per_host=min(h["cores"] for h in hosts),
                                memory_per_host=min(h["memory"] for h in hosts))
        if not peers:  # every rank on one host: this host's links
            return here
        here.hosts = len(first)
        here.link_bandwidth = min(bandwidths)
        here.latency = max(latencies)
        here.measured = tuple(m for m in here.measured if m not in ("link_bandwidth", "latency")
                              ) + ("link_bandwidth between hosts", "latency between hosts")
        return here
    finally:
        store.close()
