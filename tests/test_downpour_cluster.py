"""Multi-process Downpour runs: accuracy, run directory, warm start, a killed replica."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import distbelief
from distbelief.metrics.log import read_metrics

from _cluster import CLI, alive, wait_until


def test_downpour_on_digits_reaches_95_percent(tmp_path, curves):
    summary = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=2, steps=300,
                               rule="adagrad", lr=0.05, eval_every=100,
                               run_dir=str(tmp_path / "run"))
    assert summary["test_accuracy"] >= 0.95
    assert summary["replicas_lost"] == 0
    assert summary["total_steps"] == 600
    # every push of every replica was applied by every shard, and counted
    assert summary["shard_pushes"] == [600, 600]
    assert summary["shard_versions"] == [600, 600]
    # every role process ended cleanly (no abort while tearing down its channels)
    assert summary["exit_codes"] == {"shard0": 0, "shard1": 0, "replica0": 0, "replica1": 0}
    run = Path(summary["run_dir"])
    for name in ("config.toml", "cluster.json", "metrics.jsonl", "summary.json", "curves.png",
                 "model.pt"):
        assert (run / name).is_file(), name
    roles = json.loads((run / "cluster.json").read_text())["roles"]
    assert sorted((r["kind"], r["id"]) for r in roles) == [
        ("coordinator", 0), ("replica", 0), ("replica", 1), ("shard", 0), ("shard", 1)]
    assert all(isinstance(r["pid"], int) for r in roles)
    events = read_metrics(run / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert {e["replica"] for e in train} == {0, 1}
    assert all(np.isfinite(e["loss"]) and e["staleness"] is not None for e in train)
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) >= 3 and evals[-1]["test_accuracy"] == summary["test_accuracy"]
    # the checkpoint loads into the user's module and gives the reported accuracy
    model = distbelief.load_model(run)
    data = distbelief.data.datasets.load_dataset("digits", seed=0)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(summary["test_accuracy"])
    # the resolved config reloads as the same job
    cfg = distbelief.job.load_config(run / "config.toml")
    assert (cfg.cluster.replicas, cfg.train.steps, cfg.data.dataset) == (2, 300, "digits")


def test_warm_start_lets_replica0_train_alone_first(tmp_path):
    summary = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=1, steps=80,
                               warm_start_steps=40, log_every=10, run_dir=str(tmp_path / "run"))
    events = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    joined = next(i for i, e in enumerate(events)
                  if e["event"] == "replica_joined" and e["replica"] == 1)
    before = [e for e in events[:joined] if e["event"] == "train"]
    assert before and all(e["replica"] == 0 for e in before)
    assert max(e["step"] for e in before) >= 40
    assert summary["total_steps"] == 160  # the late replica still takes all its steps
    assert not (Path(summary["run_dir"]) / "curves.png").exists()  # DISTBELIEF_CURVES=0


def test_user_model_factory_and_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(input_shape[0], num_classes))\n")
    summary = distbelief.train(dataset=str(tmp_path / "data.npz"),
                               model=f"{tmp_path / 'mymodel.py'}:make", replicas=2, shards=2,
                               steps=150, rule="adam", lr=0.05, run_dir=str(tmp_path / "run"))
    assert summary["model"]["parameters"] == 12 * 2 + 2
    assert summary["test_accuracy"] >= 0.9


def test_killed_replica_job_completes_and_says_so(tmp_path, cli_job):
    run_dir = tmp_path / "run"
    proc = cli_job("--dataset", "digits", "--model", "mlp", "--replicas", "3", "--shards", "2",
                   "--steps", "1500", "--log-every", "5", "--run-dir", str(run_dir), "--quiet")

    def victim_pid():
        if not (run_dir / "cluster.json").exists() or not (run_dir / "metrics.jsonl").exists():
            return None
        steps = [e for e in read_metrics(run_dir / "metrics.jsonl")
                 if e["event"] == "train" and e["replica"] == 1]
        if not steps:
            return None
        roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
        return next(r["pid"] for r in roles if r["kind"] == "replica" and r["id"] == 1)

    pid = wait_until(victim_pid, 90, "replica 1 to train")
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "1 replica(s) lost" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas_lost"] == 1 and summary["lost_replicas"] == [1]
    assert summary["test_accuracy"] >= 0.9
    events = read_metrics(run_dir / "metrics.jsonl")
    assert any(e["event"] == "replica_lost" and e["replica"] == 1 for e in events)
    # the survivors finished all their steps
    done = {e["replica"]: e["step"] for e in events if e["event"] == "train"}
    assert done[0] == done[2] == 1500 and done[1] < 1500
    # no role process is left behind
    roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
    assert not [r for r in roles if r["kind"] != "coordinator" and alive(r["pid"])]


def test_plot_compares_runs(tmp_path):
    runs = []
    for n_push in (1, 4):
        summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=1, steps=40,
                                   n_push=n_push, run_dir=str(tmp_path / f"push{n_push}"))
        runs.append(summary["run_dir"])
    out = tmp_path / "compare.png"
    result = subprocess.run([*CLI, "plot", *runs, "-o", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000


def test_local_job_listens_on_loopback_only(tmp_path):
    """Local mode binds the store (and gloo's channels) to 127.0.0.1, not every interface."""
    import psutil

    run_dir = tmp_path / "run"
    files_before = set(Path("/dev/shm").glob("distbelief-*"))
    proc = subprocess.Popen([*CLI, "train", "--dataset", "digits", "--model", "mlp",
                             "--replicas", "1", "--shards", "1", "--steps", "3000",
                             "--run-dir", str(run_dir), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (run_dir / "cluster.json").exists(), 90, "the job to start")
        roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
        listening = []
        for pid in {r["pid"] for r in roles}:
            listening += [c.laddr for c in psutil.Process(pid).net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        assert listening, "the coordinator listens for the store"
        assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
        # this job's files only (other tests' jobs come and go beside it): named by its token,
        # which the shard's mapped parameters show
        shard = next(r["pid"] for r in roles if r["kind"] == "shard")
        mapped = {Path(m.path).name for m in psutil.Process(shard).memory_maps()
                  if m.path.startswith("/dev/shm/distbelief-")}
        assert mapped, "the job's tensors live in /dev/shm"
        token = next(iter(mapped)).split("-")[1]
        job_files = {f for f in set(Path("/dev/shm").glob(f"distbelief-{token}-*")) - files_before}
        assert job_files
        proc.terminate()  # SIGTERM: the command reaps its roles and removes its files
        assert proc.wait(30) == 143
        assert not [r for r in roles if r["kind"] != "coordinator" and alive(r["pid"])]
        assert not job_files & set(Path("/dev/shm").glob("distbelief-*"))
    finally:
        proc.kill()
        proc.wait(10)
        pids = []
        if (run_dir / "cluster.json").exists():
            pids = [r["pid"] for r in json.loads((run_dir / "cluster.json").read_text())["roles"]]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
