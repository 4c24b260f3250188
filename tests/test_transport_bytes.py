"""Bytes per transport: a PSClient counts the tensor bytes it exchanges with the shards
by the transport that carried them, and a job's summary.json adds up its replicas'.

Multi-host tests read these counts to show that tensors between hosts went over the
network (gloo) and within a host over shared memory; here every count is checked
against what the requests must move (float32: 4 bytes a value), not just its sign.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import torch

import distbelief
from distbelief.algorithms.schedule import downpour_schedule
from distbelief.config import OptimizerConfig
from distbelief.ps import vectors as V
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.runtime.shm import remove_job_files
from distbelief.runtime.store import JobStore, new_token

TIMEOUT = 30.0
SIZES = (30, 70)  # two shards' slices, unequal


@contextlib.contextmanager
def two_shards():
    """Two SGD shards (lr 1) serving in threads; yields the store."""
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=TIMEOUT)
    stop = threading.Event()
    threads = []
    for s, numel in enumerate(SIZES):
        store.set_json(f"members/shard/{s}", {"host": socket.gethostname(), "pid": 0})
        server = ShardServer(store.clone(), shard=s, numel=numel,
                             rule_cfg=OptimizerConfig(rule="sgd", lr=1.0), timeout=TIMEOUT)
        threads.append(threading.Thread(target=server.serve, kwargs={"stop": stop.is_set},
                                        daemon=True))
        threads[-1].start()
    try:
        yield store
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
        remove_job_files(store.token)
        store.close()
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_client_counts_every_request_by_its_transport(transport, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    numel = sum(SIZES)
    with two_shards() as store:
        layout = Layout(numel, ((0, SIZES[0]), (SIZES[0], numel)))
        with PSClient(store.clone(), layout, "replica0",
                      transport=transport, timeout=TIMEOUT) as ps:
            assert ps.transport_bytes() == {"shm": 0, "gloo": 0}
            flat = torch.zeros(numel)
            ps.set(torch.ones(numel)).wait(TIMEOUT)        # 1 x numel
            for _ in range(3):
                ps.pull(flat).wait(TIMEOUT)                 # 3 x numel
            ps.grad_buffers[1].fill_(0.25)
            ps.push(1).wait(TIMEOUT)                        # 1 x numel
            ps.accumulate(1, 2).wait(TIMEOUT)               # 1 x numel (Sandblaster's path)
            ps.vector(V.DOT, 2, 2).wait(TIMEOUT)            # a scalar: no tensor moves
        torch.testing.assert_close(flat, torch.ones(numel))
        other = "gloo" if transport == "shm" else "shm"
        assert ps.transport_bytes() == {transport: 6 * numel * 4, other: 0}


def _expected_bytes(summary: dict, steps: int, n_fetch: int, n_push: int) -> int:
    """Every replica pulls the whole vector before each fetching step and pushes it after
    each pushing step (Downpour's schedule), 4 bytes a parameter."""
    table = downpour_schedule(steps, n_fetch, n_push)
    moves = sum(("fetch" in actions) + ("push" in actions) for _, actions in table)
    return summary["replicas"] * moves * summary["model"]["parameters"] * 4


@pytest.mark.parametrize("transport, n_fetch, n_push", [("auto", 1, 1), ("gloo", 2, 3)])
def test_summary_adds_up_the_replicas_bytes_per_transport(tmp_path, transport, n_fetch, n_push):
    steps = 10
    summary = distbelief.train(dataset="digits", model="mlp", replicas=2, shards=2,
                               steps=steps, n_fetch=n_fetch, n_push=n_push, transport=transport,
                               run_dir=str(tmp_path / "run"))
    expected = _expected_bytes(summary, steps, n_fetch, n_push)
    assert summary["replicas_lost"] == 0
    if transport == "auto":  # one host: every tensor through /dev/shm
        assert summary["transport_bytes"] == {"shm": expected, "gloo": 0}
    else:
        assert summary["transport_bytes"] == {"shm": 0, "gloo": expected}
