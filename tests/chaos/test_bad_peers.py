"""Bad peers and bad data: a shard refuses what it must not apply, and goes on.

- a push of the wrong size or dtype is refused with an error naming the sender
  (before its payload moves: over TCP a gradient waits for the shard's GO, so
  the connection stays in step), and the shard keeps serving everyone else;
- a gradient holding NaN or inf is refused and counted; `--on-nonfinite stop`
  makes the shard flag the job instead;
- a process without the job's token reaches none of the job's keys: its
  connection request is never seen by the shard, nothing it sends is applied;
- end to end, NaN-laced training data is skipped (and counted) or stops the job
  with one clear line.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading

import pytest
import torch
from _cluster import wait_until

import distbelief
from distbelief.config import OptimizerConfig
from distbelief.errors import JobFailed
from distbelief.ps.client import PSClient, ShardConnection
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.ps import protocol as P
from distbelief.runtime.channel import ChannelClosed
from distbelief.runtime.shm import job_file, remove_job_files
from distbelief.runtime.local import LocalChannel
from distbelief.runtime.store import JobStore, new_token

TIMEOUT = 30.0
NUMEL = 100


@contextlib.contextmanager
def one_shard(on_nonfinite: str = "skip"):
    """One SGD shard (lr 1) serving in a thread; yields (store, server)."""
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=TIMEOUT)
    stop = threading.Event()
    store.set_json("members/shard/0", {"host": socket.gethostname()})
    server = ShardServer(store.clone(), shard=0, numel=NUMEL,
                         rule_cfg=OptimizerConfig(rule="sgd", lr=1.0), timeout=TIMEOUT,
                         on_nonfinite=on_nonfinite)
    thread = threading.Thread(target=server.serve, kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        yield store, server
    finally:
        stop.set()
        thread.join(TIMEOUT)
        remove_job_files(store.token)
        store.close()
    assert not thread.is_alive()


def client(store: JobStore, name: str, transport: str) -> PSClient:
    return PSClient(store.clone(), Layout.balanced(NUMEL, 1), name, transport=transport,
                    timeout=TIMEOUT, grad_buffers=1)


def params(ps: PSClient) -> torch.Tensor:
    out = torch.empty(NUMEL)
    ps.pull(out).wait(TIMEOUT)
    return out


@pytest.fixture(params=["shm", "gloo"])
def transport(request, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    return request.param


@pytest.mark.parametrize("bad", [torch.zeros(NUMEL + 3), torch.zeros(NUMEL, dtype=torch.float64),
                                 torch.zeros(NUMEL, dtype=torch.int64)],
                         ids=["size", "float64", "int64"])
def test_wrong_size_or_dtype_push_is_refused_naming_the_sender(transport, bad):
    with one_shard() as (store, server):
        good = client(store, "replica0", transport)
        before = params(good)
        intruder = client(store, "replica7", transport)
        conn: ShardConnection = intruder._conns[0]
        with pytest.raises(RuntimeError, match="refused the push: it takes 100 float32"):
            conn.push_from(bad, 0, 0)
        # the shard names the sender and what was wrong; nothing was applied
        errors = server.stats()["errors"]
        assert len(errors) == 1 and "replica7" in errors[0] and str(bad.numel()) in errors[0]
        assert str(bad.dtype).replace("torch.", "") in errors[0]
        assert server.stats()["pushes"] == 0
        # everyone else is still served
        good.grad_buffers[0].fill_(1.0)
        acks = good.push(0).wait(TIMEOUT)
        assert acks == [(1, 0)]
        torch.testing.assert_close(params(good), before - 1.0)
        good.close()
        intruder.close()  # the refusal left its connection in step: it says goodbye


def test_non_finite_gradient_is_refused_and_counted(transport):
    with one_shard() as (store, server):
        ps = client(store, "replica0", transport)
        before = params(ps)
        ps.grad_buffers[0].fill_(0.5)
        ps.grad_buffers[0][17] = math.nan
        assert ps.push(0).wait(TIMEOUT) == [(0, None)]  # refused: version unchanged
        ps.grad_buffers[0][17] = math.inf
        assert ps.push(0).wait(TIMEOUT) == [(0, None)]
        torch.testing.assert_close(params(ps), before)
        ps.grad_buffers[0][17] = 0.5
        assert ps.push(0).wait(TIMEOUT) == [(1, 0)]  # the connection goes on
        torch.testing.assert_close(params(ps), before - 0.5)
        stats = server.stats()
        assert (stats["nonfinite"], stats["pushes"], stats["version"]) == (2, 1, 1)
        assert not store.has("job/nonfinite")
        ps.close()


def test_on_nonfinite_stop_flags_the_job():
    with one_shard(on_nonfinite="stop") as (store, server):
        ps = client(store, "replica3", "shm")
        ps.grad_buffers[0].fill_(math.nan)
        assert ps.push(0).wait(TIMEOUT) == [(0, None)]
        assert store.get_json("job/nonfinite", timeout=5) == {"shard": 0, "client": "replica3"}
        ps.close()


def test_a_process_without_the_token_reaches_nothing():
    with one_shard() as (store, server):
        stranger = JobStore.connect("127.0.0.1", store.port, "not-the-token", timeout=TIMEOUT)
        try:
            assert stranger.try_get_json("job") is None
            stranger.register("replica", 0, {"kind": "replica"})
            assert not store.has("members/replica/0")
            # its connection request lands outside the job's namespace: no shard answers
            with pytest.raises(ChannelClosed):
                ShardConnection(stranger, 0, NUMEL, "stranger", "gloo", 2.0, {})
        finally:
            stranger.close()
        assert server.stats()["clients"] == [] and server.stats()["pushes"] == 0


def test_a_local_client_without_the_token_is_refused_by_the_shard():
    with one_shard() as (store, server):
        good = client(store, "replica0", "shm")
        before = params(good)
        path = job_file(store.token, P.socket_file(0))  # the shard's socket, found on disk
        stranger = LocalChannel.connect(path, "not-the-token", {"client": "stranger",
                                                                "transport": "shm"}, TIMEOUT)
        with pytest.raises(ChannelClosed):  # the shard ends the connection unanswered
            stranger.send_header(P.HELLO, P.TRANSPORT_SHM, NUMEL)
            stranger.recv_header()
        wait_until(lambda: server.stats()["errors"], 10, "the shard to log the refusal")
        assert "without the job's token" in server.stats()["errors"][0]
        assert server.stats()["clients"] == ["replica0"] and server.stats()["pushes"] == 0
        torch.testing.assert_close(params(good), before)
        good.close()


NAN_MODEL = """
import torch


class NanEvery(torch.nn.Module):
    \"\"\"Identity, except that every 10th training forward pass returns NaN (a bad batch).\"\"\"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls % 10 == 5:
                return x * float("nan")
        return x


def make(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), NanEvery(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, num_classes))
"""


@pytest.fixture
def nan_model(tmp_path):
    """A model factory whose forward pass gives NaN on every 10th training batch."""
    path = tmp_path / "nan_model.py"
    path.write_text(NAN_MODEL)
    return f"{path}:make"


def test_nan_batches_are_skipped_and_counted(nan_model, tmp_path):
    summary = distbelief.train(dataset="digits", model=nan_model, replicas=2, shards=2,
                               steps=100, lr=0.05, run_dir=str(tmp_path / "run"),
                               show_progress=False)
    # each replica's batches 5, 15, ..., 95 were non-finite: the replicas left each one out
    # of its push (so no shard had one to refuse); the shards' own refusal of a non-finite
    # push is test_non_finite_gradient_is_refused_and_counted above
    assert summary["nonfinite_skipped"] == 20
    assert summary["nonfinite_refused"] == [0, 0]
    assert summary["shard_pushes"] == [180, 180]
    # no lost update: the shards applied exactly the pushes the replicas saw acknowledged
    assert summary["pushes_acked"] == 360
    assert summary["test_accuracy"] > 0.85


def test_nan_batches_with_on_nonfinite_stop_end_the_job(nan_model, tmp_path):
    with pytest.raises(JobFailed, match="non-finite.*--on-nonfinite stop.*lower --lr"):
        distbelief.train(dataset="digits", model=nan_model, replicas=2, shards=2, steps=100,
                         on_nonfinite="stop", run_dir=str(tmp_path / "run"),
                         show_progress=False)


def test_the_finite_check_tells_overflow_from_nan_and_inf():
    """One reduction decides, and a sum that overflowed from finite values is checked
    element by element, so large finite gradients are not refused."""
    from distbelief.ps.rules import all_finite

    grad = torch.full((1000,), 3e38)  # finite, but the sum overflows to inf
    assert not math.isfinite(float(grad.sum())) and all_finite(grad)
    for bad in (math.nan, math.inf, -math.inf):
        grad[17] = bad
        assert not all_finite(grad)
    grad = torch.ones(1000)
    grad[3], grad[4] = math.inf, -math.inf  # a sum of NaN
    assert not all_finite(grad)
    assert all_finite(torch.ones(1000))
