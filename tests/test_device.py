"""`--device` (`runtime.device`): parsing and refusing the option, where each replica
process computes, the host/device copier on the CPU, the push that waits for a copy, and
a whole job with the option given explicitly.

This machine may have no GPU: every path that branches on the device runs here with
the CPU device, and CUDA's presence is faked (monkeypatch) only where a test checks
the decision made from it, never to run a CUDA kernel.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import distbelief
from distbelief.config import parse_device
from distbelief.errors import UserError
from distbelief.job import JobConfig, apply_options
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.channel import Group
from distbelief.runtime.device import (DONE, Copy, DeviceMirror, collective_backend,
                                       device_summary, local_rank, replica_device, to_cpu)

from test_cli_errors import TRAIN, assert_user_error, run_main, workdir  # noqa: F401 (fixtures)
from test_transport_bytes import SIZES, TIMEOUT, two_shards

CPU = torch.device("cpu")


def fake_gpus(monkeypatch, count: int) -> None:
    """Make torch report `count` CUDA devices (0: none), for decisions only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---- the option -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, index", [("cpu", None), ("cuda", None), ("cuda:0", 0),
                                         ("cuda:12", 12)])
def test_parse_device_reads_the_three_forms(spec, index):
    assert parse_device(spec) == index


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:²", "cpu:0",
                                  ""])
def test_parse_device_refuses_anything_else_in_one_line(spec):
    with pytest.raises(UserError) as err:
        parse_device(spec)
    assert "\n" not in str(err.value) and "cpu, cuda or cuda:N" in str(err.value)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_no_cuda_is_refused_by_the_command_in_one_line(workdir, run_main, monkeypatch, spec):
    fake_gpus(monkeypatch, 0)
    line = assert_user_error(run_main(workdir, *TRAIN, "--device", spec),
                             f"--device {spec}", "no CUDA device",
                             "torch.cuda.is_available() is False", "leave --device out")
    assert "Traceback" not in line
    assert not (workdir / "runs").exists()  # refused before anything started


def test_a_gpu_this_machine_lacks_is_refused(workdir, run_main, monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert_user_error(run_main(workdir, *TRAIN, "--algorithm", "sync", "--device", "cuda:2"),
                      "--device cuda:2", "2 CUDA devices", "cuda:0..cuda:1")


@pytest.mark.parametrize("algorithm, reason", [
    ("hogwild", "shared memory"), ("sandblaster", "on the CPU"), ("admm", "on the CPU"),
    ("easgd", "on the CPU")])
def test_algorithms_without_a_gpu_path_refuse_it_and_say_why(workdir, run_main, monkeypatch,
                                                             algorithm, reason):
    fake_gpus(monkeypatch, 1)  # refused for the algorithm, not for want of a GPU
    assert_user_error(run_main(workdir, *TRAIN, "--algorithm", algorithm, "--device", "cuda"),
                      "--device 'cuda'", f"means nothing for --algorithm {algorithm}",
                      "downpour and sync", reason)


@pytest.mark.parametrize("options, mentions", [
    ({"replica_workers": 2}, ["--replica-workers 2", "host memory"]),
    ({"partitions": 2, "split": "units"}, ["--split units", "--split layers"]),
])
def test_downpour_refuses_what_cannot_run_on_a_gpu(monkeypatch, options, mentions):
    fake_gpus(monkeypatch, 1)
    cfg = apply_options(JobConfig(), {"dataset": "digits", "model": "mlp", "device": "cuda",
                                      **options})
    with pytest.raises(UserError) as err:
        cfg.validate()
    for mention in ["--device cuda", *mentions]:
        assert mention in str(err.value)
    apply_options(JobConfig(), {"device": "cuda", "partitions": 2}).validate()  # a pipeline


def test_cpu_is_accepted_everywhere_without_asking_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("asked for CUDA"))
    for algorithm in ("downpour", "sync", "sandblaster", "hogwild", "admm", "easgd"):
        apply_options(JobConfig(), {"algorithm": algorithm, "device": "cpu"}).validate()


# ---- where each replica process computes ---------------------------------------------------

@pytest.mark.parametrize("env, ident, part, partitions, rank", [
    ({"DISTBELIEF_ROLE": "replica"}, 3, None, 1, 3),        # local cluster: the replica
    ({"DISTBELIEF_ROLE": "replica"}, 1, 1, 2, 3),           # replica * K + partition
    ({"DISTBELIEF_ROLE": "replica", "LOCAL_RANK": "7"}, 1, None, 1, 1),  # not torchrun's
    ({"LOCAL_RANK": "5", "RANK": "9"}, 2, None, 1, 5),      # torchrun
    ({"SLURM_LOCALID": "2"}, 0, None, 1, 2),                # SLURM
    ({}, 4, None, 1, 0),                                    # one process per host, by hand
])
def test_local_rank(env, ident, part, partitions, rank):
    assert local_rank(ident, part, partitions, env=env) == rank


@pytest.mark.parametrize("spec, rank, gpus, device", [
    ("cpu", 5, 0, "cpu"), ("cuda", 0, 2, "cuda:0"), ("cuda", 3, 2, "cuda:1"),
    ("cuda", 4, 3, "cuda:1"), ("cuda:1", 0, 2, "cuda:1"), ("cuda:0", 7, 1, "cuda:0")])
def test_replica_device_spreads_the_local_ranks_over_the_gpus(monkeypatch, spec, rank, gpus,
                                                              device):
    fake_gpus(monkeypatch, gpus)
    assert replica_device(spec, rank) == torch.device(device)


def test_replica_device_on_a_host_without_the_gpu_fails_naming_the_host(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="--device cuda: the host .* has 0 CUDA devices"):
        replica_device("cuda", 0)
    fake_gpus(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="has 1 CUDA devices"):
        replica_device("cuda:1", 0)


@pytest.mark.parametrize("members, backend", [
    ([("a", "cuda:0"), ("a", "cuda:1")], "nccl"),
    ([("a", "cuda:0"), ("b", "cuda:0")], "nccl"),            # one GPU each, two hosts
    ([("a", "cuda:0"), ("a", "cuda:0")], "gloo"),            # NCCL refuses a shared GPU
    ([("a", "cpu"), ("a", "cpu")], "gloo"),
    ([("a", "cuda:0"), ("a", "cpu")], "gloo"),
    ([("a", "cuda:0")], "nccl"),
    ([], "gloo"),
])
def test_collective_backend(members, backend):
    assert collective_backend([{"host": h, "device": d} for h, d in members]) == backend


def test_device_summary_adds_up_the_replicas():
    done = [{"device": {"device": "cuda:0", "copies": 3, "copy_bytes": 12, "copy_seconds": 0.5},
             "collective": "nccl"},
            {},  # a lost replica wrote no record
            {"device": {"device": "cuda:1", "copies": 1, "copy_bytes": 4, "copy_seconds": 0.25},
             "collective": "nccl"}]
    assert device_summary("cuda", done) == {
        "option": "cuda", "replicas": ["cuda:0", "cuda:1"], "copies": 4, "copy_bytes": 16,
        "copy_seconds": 0.75, "collective": "nccl"}


def test_to_cpu_keeps_the_structure_and_the_values():
    state = {"state": {0: {"sum": torch.ones(3), "step": torch.tensor(2.0)}},
             "param_groups": [{"lr": 0.1, "params": [0]}], "pair": (torch.zeros(1), 4)}
    moved = to_cpu(state)
    assert moved["param_groups"] == state["param_groups"]
    assert torch.equal(moved["state"][0]["sum"], torch.ones(3))
    assert isinstance(moved["pair"], tuple) and moved["pair"][1] == 4


def test_a_group_of_cpu_members_is_gloo():
    import torch.distributed as dist

    group = Group(dist.HashStore(), "pg/cpu", 0, 1, timeout=10, device=CPU)
    try:
        assert group.backend == "gloo"
        buf = torch.arange(4.0)
        group.all_reduce_sum(buf)
        assert torch.equal(buf, torch.arange(4.0))
    finally:
        group.close()


# ---- the copier on the CPU, and its handles -----------------------------------------------

def test_on_the_cpu_every_tensor_is_its_own_twin_and_no_copy_is_made():
    grads = [torch.zeros(5), torch.zeros(5)]
    with DeviceMirror("cpu") as mirror:
        twins = [mirror.device_twin(g) for g in grads]
        assert all(t is g for t, g in zip(twins, grads))  # backward() writes where shards read
        params = torch.arange(5.0)
        host = mirror.host_twin(params)
        assert host is params and mirror.host_twin(params) is host
        host.fill_(7.0)  # a pull lands in the parameters themselves
        for handle in (mirror.from_host_async(params), mirror.to_host_async(twins[1])):
            assert handle is DONE and handle.done()
            handle.wait(0.0)
        assert torch.equal(params, torch.full((5,), 7.0))
        xb, yb = torch.ones(2, 3), torch.tensor([0, 1])
        moved = mirror.to_device(xb, yb)
        assert moved[0] is xb and moved[1] is yb
        with pytest.raises(ValueError, match="no host twin"):
            mirror.to_host_async(torch.zeros(5))
        assert mirror.stats() == {"device": "cpu", "copies": 0, "copy_bytes": 0,
                                  "copy_seconds": 0.0}
    mirror.close()  # idempotent


class FakeEvent:
    """Stands for a CUDA event: done after `after` questions (never with None)."""

    def __init__(self, after: int | None):
        self.after, self.asked = after, 0

    def query(self) -> bool:
        self.asked += 1
        return self.after is not None and self.asked > self.after


def test_copy_handle_waits_until_its_event_says_done():
    event = FakeEvent(after=3)
    copy = Copy(event)
    assert not copy.done()
    copy.wait(timeout=5)
    assert copy.done() and event.asked >= 4


def test_copy_handle_wait_is_bounded():
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 0.05 s"):
        Copy(FakeEvent(after=None)).wait(timeout=0.05)
    assert time.monotonic() - began < 2


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_push_after_a_copy_sends_the_buffer_only_once_the_copy_is_done(transport, monkeypatch):
    """The shard threads wait for `after` (a gradient still on its way from the GPU), the
    caller does not: what the shards apply is what the buffer holds once it is done."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    numel = sum(SIZES)
    release, waited = threading.Event(), []

    class Landing:  # the copy: done when the test says so
        def wait(self, timeout=None):
            waited.append(timeout)
            assert release.wait(timeout)

    with two_shards() as store:  # SGD, lr 1
        layout = Layout(numel, ((0, SIZES[0]), (SIZES[0], numel)))
        with PSClient(store.clone(), layout, "replica0", transport=transport,
                      timeout=TIMEOUT) as ps:
            ps.set(torch.ones(numel)).wait(TIMEOUT)
            ps.grad_buffers[0].fill_(100.0)  # what the buffer holds before the copy landed
            handle = ps.push(0, after=Landing())
            assert not handle.done()  # returned at once; both shards are waiting
            ps.grad_buffers[0].fill_(0.25)  # the copy lands
            release.set()
            assert all(version >= 1 for version, _ in handle.wait(TIMEOUT))
            params = torch.zeros(numel)
            ps.pull(params).wait(TIMEOUT)
    torch.testing.assert_close(params, torch.full((numel,), 0.75))
    assert waited == [TIMEOUT, TIMEOUT]  # each shard's thread, bounded by the client's timeout


# ---- whole jobs with the option given explicitly ------------------------------------------

def test_downpour_with_device_cpu_trains_exactly_as_without_it(tmp_path):
    """The oracle: one replica, fetch = push = 1; `--device cpu` changes nothing at all."""
    common = dict(dataset="digits", model="mlp", replicas=1, shards=1, n_fetch=1, n_push=1,
                  rule="adagrad", lr=0.05, batch_size=32, steps=12, seed=3)
    given = distbelief.train(device="cpu", run_dir=str(tmp_path / "given"), **common)
    default = distbelief.train(run_dir=str(tmp_path / "default"), **common)
    a = distbelief.load_model(given["run_dir"]).parameters()
    b = distbelief.load_model(default["run_dir"]).parameters()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert given["device"] == default["device"] == {
        "option": "cpu", "replicas": ["cpu"], "copies": 0, "copy_bytes": 0, "copy_seconds": 0.0}


def test_sync_with_device_cpu_all_reduces_over_gloo(tmp_path):
    """Both replicas say where they compute and agree on gloo; the quorum's gradient thread
    (``--sync-fraction`` < 1) is started on the replica's device."""
    summary = distbelief.train(algorithm="sync", dataset="digits", model="mlp", replicas=2,
                               shards=1, sync_fraction=0.5, batch_size=16, steps=40, seed=1,
                               device="cpu", run_dir=str(tmp_path / "run"))
    assert summary["device"] == {"option": "cpu", "replicas": ["cpu", "cpu"], "copies": 0,
                                 "copy_bytes": 0, "copy_seconds": 0.0, "collective": "gloo"}
    # it trained: 40 steps reach 0.88-0.91 (8 steps gave 0.18-0.38, which quorum steps of
    # the fastest half made a coin toss against this bound)
    assert summary["test_accuracy"] > 0.5
