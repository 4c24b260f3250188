"""The same roles started one per process from the standard environment.

On many machines every host runs the same `distbelief train` command with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (by torchrun, SLURM, or by hand).
Here the "hosts" are processes on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _cluster import free_port, rank_processes

ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--replicas", "2", "--shards", "1",
        "--steps", "150", "--quiet"]


def _check_run(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == 300 and summary["replicas_lost"] == 0
    assert summary["test_accuracy"] >= 0.9
    roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
    assert len({r["pid"] for r in roles}) == 4


def test_torchrun_starts_one_role_per_rank(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", "--no-python",
         str(Path(sys.executable).with_name("distbelief")), *ARGS, "--run-dir", str(run_dir)],
        cwd=tmp_path, env={**os.environ, "DISTBELIEF_TOKEN": "torchrun-test-secret-0123"},
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout
    _check_run(run_dir)


def test_partitioned_replicas_from_rank_variables(tmp_path):
    """Rank variables set by hand, without torchrun (as tests/test_namespaces.py does across
    hosts); --partitions 2: ranks 1..S are shards, then each replica's two partitions."""
    run_dir = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--replicas", "1", "--shards", "2",
            "--partitions", "2", "--steps", "60", "--quiet", "--run-dir", str(run_dir)]
    with rank_processes(args, 5, tmp_path) as procs:
        outputs = [p.communicate(timeout=240) for p in procs]
        assert [p.returncode for p in procs] == [0] * 5, [o[1][-500:] for o in outputs]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["partition"]["shard_clients"] == [
            ["coordinator", "replica0.part0"], ["coordinator", "replica0.part1"]]
        roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
        assert sorted((r["kind"], r["id"], r["part"]) for r in roles if r["kind"] == "replica") \
            == [("replica", 0, 0), ("replica", 0, 1)]


def test_wrong_world_size_is_a_user_error(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "distbelief.cli", *ARGS], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "WORLD_SIZE=3" in result.stderr
