"""A peer on another host that dies is noticed through its heartbeat within 10 s.

The "hosts" are processes started from rank variables (as torchrun or SLURM
would), so the coordinator has no process handle on them and only the store's
heartbeats tell it they are gone: rank 0 is the coordinator, rank 1 the shard,
ranks 2 and 3 the replicas. Replica 1 is killed first (the job goes on without
it, and a `replica_lost` event names it), then the shard (the job ends with one
line naming the shard).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from _cluster import rank_processes, wait_until

DETECT_WITHIN = 10.0  # seconds: the bound the failure model promises


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(150)
def test_dead_replica_and_shard_on_other_hosts_are_reported_within_10_s(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--replicas", "2",
            "--shards", "1", "--steps", "100000", "--quiet", "--run-dir", str(run_dir)]
    with rank_processes(args, 4, tmp_path, token="dead-peer-test") as procs:
        coordinator, shard, replica1 = procs[0], procs[1], procs[3]
        wait_until(lambda: any(e["event"] == "train" and e["replica"] == 1
                               for e in _events(run_dir)), 90, "replica 1 to train")

        replica1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: any(e["event"] == "replica_lost" and e["replica"] == 1
                               for e in _events(run_dir)),
                   DETECT_WITHIN + 5, "the coordinator to report replica 1 lost", poll=0.05)
        assert time.monotonic() - killed <= DETECT_WITHIN
        assert coordinator.poll() is None  # the others go on
        steps = max(e["step"] for e in _events(run_dir) if e["event"] == "train"
                    and e["replica"] == 0)
        wait_until(lambda: max(e["step"] for e in _events(run_dir) if e["event"] == "train"
                               and e["replica"] == 0) > steps, 30, "replica 0 to go on")

        shard.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = coordinator.communicate(timeout=DETECT_WITHIN + 20)
        ended = time.monotonic()
        assert coordinator.returncode not in (0, None)
        lines = [line for line in err.splitlines() if "parameter shard 0 died" in line]
        assert lines, err[-2000:]
        assert "no heartbeat for 6 s" in lines[0]
        assert ended - killed <= DETECT_WITHIN, f"the shard's loss took {ended - killed:.1f} s"
