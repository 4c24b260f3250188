"""Multi-host jobs on separate "hosts": network, UTS and mount namespaces (tests/_hosts.py).

Each host has its own address, hostname and /dev/shm, so tensors between hosts
must cross the (virtual) network and only those within a host can use shared
memory. The roles are started from the rank variables exactly as the README
tells a user. Skipped, with the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _hosts import Hosts
from distbelief.metrics.log import read_metrics

pytestmark = pytest.mark.skipif(Hosts.unavailable() is not None,
                                reason=str(Hosts.unavailable()))

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 29555


def role_env(token: str, master: str, rank: int, world: int) -> dict[str, str]:
    """What the README tells a user to set on each host, plus this interpreter's PATH."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": "/tmp", "RANK": str(rank),
            "WORLD_SIZE": str(world), "MASTER_ADDR": master, "MASTER_PORT": str(PORT),
            "DISTBELIEF_TOKEN": token, "PYTHONPATH": str(ROOT / "src")}


def start(hosts: Hosts, placement: list[int], args: list[str], tmp_path: Path
          ) -> list[subprocess.Popen]:
    """Rank r runs `distbelief train ARGS` on host placement[r]; logs in tmp_path."""
    token = secrets.token_hex(16)
    procs = []
    for rank, host in enumerate(placement):
        env = role_env(token, hosts[0].address, rank, len(placement))
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(hosts[host].popen(
            ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "distbelief", "train", *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    return procs


def wait_all(procs: list[subprocess.Popen], tmp_path: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(procs):
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {rank} did not finish: {log(tmp_path, rank)[-2000:]}")


def log(tmp_path: Path, rank: int) -> str:
    return (tmp_path / f"rank{rank}.log").read_text()


@pytest.fixture
def hosts():
    with Hosts(3) as made:
        yield made


def test_three_hosts_partitions_across_them_and_a_lost_replica_host(hosts, tmp_path):
    # host0: coordinator, shards 0 and 1, and replica 0 (both partitions: beside its shards);
    # replicas 1 and 2: partition 0 on host1, partition 1 on host2 (activations cross hosts)
    placement = [0, 0, 0, 0, 0, 1, 2, 1, 2]
    run = tmp_path / "run"
    procs = start(hosts, placement, ["--dataset", "digits", "--model", "mlp", "--replicas", "3",
                                     "--shards", "2", "--partitions", "2", "--steps", "400",
                                     "--log-every", "20", "--quiet", "--run-dir", str(run)],
                  tmp_path)
    # (whatever happens, the hosts fixture kills every process started on a host)
    # once replica 2 trains, its partition on host2 dies: the others go on
    deadline = time.monotonic() + 90
    while not any(e.get("replica") == 2 and e["event"] == "train" for e in _events(run)):
        assert time.monotonic() < deadline, log(tmp_path, 0)[-2000:]
        assert procs[0].poll() is None, log(tmp_path, 0)[-2000:]
        time.sleep(0.1)
    os.killpg(procs[8].pid, signal.SIGKILL)
    wait_all(procs[:7], tmp_path)
    assert [p.returncode for p in procs[:7]] == [0] * 7, log(tmp_path, 0)[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8
    assert summary["replicas_lost"] == 1 and summary["lost_replicas"] == [2]
    cluster = json.loads((run / "cluster.json").read_text())["roles"]
    assert {(r["kind"], r["id"], r.get("part")): r["host"] for r in cluster} == {
        ("coordinator", 0, None): "host0", ("shard", 0, None): "host0",
        ("shard", 1, None): "host0", ("replica", 0, 0): "host0", ("replica", 0, 1): "host0",
        ("replica", 1, 0): "host1", ("replica", 1, 1): "host2",
        ("replica", 2, 0): "host1", ("replica", 2, 1): "host2"}
    # replica 0 reached its shards through shared memory, replicas 1 and 2 over the network
    moved = summary["transport_bytes"]
    assert moved["shm"] > 0 and moved["gloo"] > 0
    assert summary["partition"]["boundary_bytes"] > 0


def _events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return read_metrics(path)
    except (ValueError, json.JSONDecodeError):  # a line being written
        return []


def readme_torchrun() -> list[str]:
    """The README's torchrun command (section "Many machines"), as argv."""
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Many machines"):]
    blocks = [b[:b.index("```")] for b in section.split("```bash")[1:]]
    block = next(b for b in blocks if "torchrun" in b)
    command = block.replace("\\\n", " ")
    lines = [line for line in command.splitlines() if line.strip().startswith("torchrun")]
    assert len(lines) == 1, block
    return shlex.split(lines[0])


def test_the_readme_torchrun_example_trains_across_hosts(hosts, tmp_path):
    argv = readme_torchrun()
    nodes = int(argv[argv.index("--nnodes") + 1])
    assert nodes == len(hosts.hosts)
    argv = [a.replace("HOST0", hosts[0].name) for a in argv]
    # the README's token file, made as it says, in the HOME every host shares here
    (tmp_path / ".distbelief-token").write_text(secrets.token_hex(16) + "\n")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT / "src")}
    procs = [host.popen(["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv],
                        stdout=open(tmp_path / f"rank{host.index}.log", "w"),
                        stderr=subprocess.STDOUT, cwd=tmp_path) for host in hosts.hosts]
    wait_all(procs, tmp_path, timeout=240)
    assert [p.returncode for p in procs] == [0] * nodes, [log(tmp_path, i)[-1500:]
                                                          for i in range(nodes)]
    summaries = list(tmp_path.glob("runs/*/summary.json"))
    assert len(summaries) == 1, [log(tmp_path, i)[-1500:] for i in range(nodes)]
    summary = json.loads(summaries[0].read_text())
    assert summary["test_accuracy"] > 0.8  # chance is 0.1
    roles = json.loads((summaries[0].parent / "cluster.json").read_text())["roles"]
    assert {r["host"] for r in roles} == {h.name for h in hosts.hosts}


def test_plan_on_every_host_measures_the_links_between_them(hosts, tmp_path):
    """`distbelief plan` started as a job is, one rank per host: rank 0 plans for 3 hosts with
    the links it measured to the others over gloo; the other ranks answer and exit."""
    token = secrets.token_hex(16)
    procs = []
    for rank, host in enumerate(hosts.hosts):
        env = role_env(token, hosts[0].address, rank, 3)
        procs.append(host.popen(
            ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "distbelief", "plan",
             "--dataset", "digits", "--model", "mlp", "--trials", "0", "--quiet",
             "-o", str(tmp_path / "plan")],
            stdout=open(tmp_path / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT,
            cwd=tmp_path))
    wait_all(procs, tmp_path, timeout=120)
    assert [p.returncode for p in procs] == [0] * 3, [log(tmp_path, i)[-1500:] for i in range(3)]
    assert "measured the links for rank 0's plan" in log(tmp_path, 1)
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    hardware = plan["hardware"]
    assert hardware["hosts"] == 3 and "link_bandwidth between hosts" in hardware["measured"]
    assert hardware["link_bandwidth"] > 1e6 and 0 < hardware["latency"] < 1.0
    assert len(plan["commands"]) == 3 and plan["choice"]["algorithm"] != "hogwild"


def test_hosts_whose_names_resolve_to_nothing_still_reach_each_other(tmp_path):
    # gloo binds what the hostname resolves to, else loopback: each rank picks the interface
    # that reaches MASTER_ADDR instead (without it this job times out: no pair connects)
    with Hosts(2, resolvable=False) as hosts:
        placement = [0, 0, 1]  # coordinator and shard on host0, the replica on host1
        run = tmp_path / "run"
        procs = start(hosts, placement, ["--dataset", "digits", "--model", "mlp",
                                         "--replicas", "1", "--shards", "1", "--steps", "100",
                                         "--timeout", "30", "--quiet", "--run-dir", str(run)],
                      tmp_path)
        wait_all(procs, tmp_path, timeout=90)
    assert [p.returncode for p in procs] == [0] * 3, log(tmp_path, 2)[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["transport_bytes"]["gloo"] > 0 and summary["test_accuracy"] > 0.5
