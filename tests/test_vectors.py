"""Shard-side vector operations (ps/vectors.py): `ShardVectors` against plain torch, the
float <-> header bit patterns, and `RemoteVectors` over three real shards (served in
threads of this process) against a `TensorSpace` mirror, over shm and over gloo.
"""

from __future__ import annotations

import math
import random
import socket
import threading
from contextlib import contextmanager

import pytest
import torch

from distbelief.algorithms.sandblaster.vector_space import TensorSpace
from distbelief.config import OptimizerConfig
from distbelief.ps import vectors as V
from distbelief.ps.client import PSClient, resolve_transport
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.ps.vectors import (MAX_VECTORS, PARAMS, RemoteVectors, ShardVectors,
                                   VectorError, bits_float, float_bits)
from distbelief.runtime.channel import ChannelClosed
from distbelief.runtime.shm import remove_job_files
from distbelief.runtime.store import JobStore, new_token

N = 1001      # not divisible by the shard count: slices of 334, 334, 333
SHARDS = 3
TIMEOUT = 30

# ---- ShardVectors -------------------------------------------------------------------------


def shard_vectors(n: int = 17) -> tuple[ShardVectors, torch.Tensor]:
    params = torch.randn(n)
    return ShardVectors(params), params


def test_vector_zero_is_the_parameters_in_place():
    sv, params = shard_vectors()
    assert sv.get(PARAMS) is params
    sv.run(V.SCALE, PARAMS, 0, 0.0)
    assert torch.equal(params, torch.zeros_like(params))


def test_zero_creates():
    sv, params = shard_vectors()
    assert sv.run(V.ZERO, 3, 0, 0.0) == 0.0
    assert torch.equal(sv.get(3), torch.zeros_like(params))
    sv.get(3).fill_(7.0)
    sv.run(V.ZERO, 3, 0, 0.0)  # an existing vector is zeroed again
    assert torch.equal(sv.get(3), torch.zeros_like(params))


def test_copy_creates_an_independent_copy():
    sv, params = shard_vectors()
    expected = params.clone()
    assert sv.run(V.COPY, 5, PARAMS, 0.0) == 0.0
    assert torch.equal(sv.get(5), expected)
    params.add_(1.0)
    assert torch.equal(sv.get(5), expected)
    sv.run(V.COPY, PARAMS, 5, 0.0)  # and back into the parameters, in place
    assert torch.equal(params, expected)


def test_scale_axpy_against_torch():
    sv, params = shard_vectors()
    x, y = torch.randn_like(params), torch.randn_like(params)
    sv.run(V.ZERO, 1, 0, 0.0)
    sv.run(V.ZERO, 2, 0, 0.0)
    sv.get(1).copy_(x)
    sv.get(2).copy_(y)
    assert sv.run(V.SCALE, 1, 0, -0.375) == 0.0
    x.mul_(-0.375)
    assert torch.equal(sv.get(1), x)
    assert sv.run(V.AXPY, 2, 1, 2.5) == 0.0  # v=2 += 2.5 * src=1
    y.add_(x, alpha=2.5)
    assert torch.equal(sv.get(2), y)
    assert torch.equal(sv.get(1), x)


def test_reductions_against_torch():
    sv, params = shard_vectors(257)
    other = torch.randn_like(params)
    sv.run(V.ZERO, 4, 0, 0.0)
    sv.get(4).copy_(other)
    assert sv.run(V.DOT, PARAMS, 4, 0.0) == float(torch.dot(params, other))
    assert sv.run(V.DOT, 4, 4, 0.0) == float(torch.dot(other, other))
    assert sv.run(V.NORM_INF, 4, 0, 0.0) == float(other.abs().max())
    assert sv.run(V.NORM_1, 4, 0, 0.0) == float(other.abs().sum())
    # a negative entry largest in magnitude: the norm is of |v|
    sv.get(4)[100] = -50.0
    assert sv.run(V.NORM_INF, 4, 0, 0.0) == 50.0


def test_free():
    sv, params = shard_vectors()
    sv.run(V.COPY, 6, PARAMS, 0.0)
    assert sv.run(V.FREE, 6, 0, 0.0) == 0.0
    assert 6 not in sv.vectors
    with pytest.raises(VectorError):
        sv.get(6)
    with pytest.raises(VectorError, match="cannot be freed"):
        sv.run(V.FREE, PARAMS, 0, 0.0)
    assert sv.get(PARAMS) is params


@pytest.mark.parametrize("op, v, src", [
    (V.SCALE, 9, 0), (V.AXPY, 9, 0), (V.AXPY, 0, 9), (V.DOT, 9, 0), (V.DOT, 0, 9),
    (V.NORM_INF, 9, 0), (V.NORM_1, 9, 0), (V.COPY, 1, 9),
])
def test_unknown_vector_refused(op, v, src):
    sv, params = shard_vectors()
    before = params.clone()
    with pytest.raises(VectorError, match="vector 9 does not exist"):
        sv.run(op, v, src, 1.0)
    assert set(sv.vectors) == {PARAMS}  # nothing made by a refused command
    assert torch.equal(params, before)


@pytest.mark.parametrize("op", [0, max(V.NAMES) + 1, 99, -1])
def test_unknown_operation_refused(op):
    sv, _ = shard_vectors()
    with pytest.raises(VectorError, match="unknown vector operation"):
        sv.run(op, PARAMS, PARAMS, 1.0)


@pytest.mark.parametrize("op", [V.ZERO, V.COPY])
@pytest.mark.parametrize("v", [-1, MAX_VECTORS, MAX_VECTORS + 10])
def test_vector_number_out_of_range(op, v):
    sv, _ = shard_vectors()
    with pytest.raises(VectorError, match="outside"):
        sv.run(op, v, PARAMS, 0.0)
    assert set(sv.vectors) == {PARAMS}
    sv.run(op, MAX_VECTORS - 1, PARAMS, 0.0)  # the last number is fine
    assert MAX_VECTORS - 1 in sv.vectors


def test_mean_of_members():
    """MEAN: the target becomes the mean of the members named by the mask (vectors
    base + i), which are left as they were; the squared change comes back."""
    sv, params = shard_vectors()
    old = params.clone()
    members = {i: torch.randn(17) for i in (0, 2, 5)}
    for i, t in members.items():
        sv.accumulate(20 + i, t, replace=True)
    sv.accumulate(21, torch.full((17,), 1e6), replace=True)  # not a member: left out
    change = sv.run(V.MEAN, PARAMS, V.member_mask([0, 2, 5]), 20.0)
    want = torch.stack(list(members.values())).mean(0)
    torch.testing.assert_close(params, want)
    assert change == pytest.approx(float((want - old).pow(2).sum()), rel=1e-5)
    for i, t in members.items():
        assert torch.equal(sv.get(20 + i), t)
    assert sv.run(V.MEAN, PARAMS, V.member_mask([2]), 20.0) > 0  # one member: a copy
    assert torch.equal(params, members[2])


@pytest.mark.parametrize("mask, base", [(0, 20.0), (1, 20.5), (1 << 3, 20.0)])
def test_mean_refuses_no_members_a_fractional_base_and_missing_vectors(mask, base):
    sv, _ = shard_vectors()
    sv.accumulate(20, torch.ones(17), replace=True)
    with pytest.raises(VectorError):
        sv.run(V.MEAN, PARAMS, mask, base)


def test_member_mask():
    assert V.member_mask([]) == 0 and V.member_mask([0, 62]) == 1 | 1 << 62
    with pytest.raises(ValueError, match="0..62"):
        V.member_mask([63])


def test_accumulate_replace():
    sv, _ = shard_vectors()
    sv.accumulate(6, torch.ones(17))
    sv.accumulate(6, torch.full((17,), 3.0), replace=True)
    assert torch.equal(sv.get(6), torch.full((17,), 3.0))


def test_accumulate():
    sv, params = shard_vectors()
    g = torch.randn_like(params)
    sv.accumulate(7, g)  # a new vector starts at zero
    assert torch.equal(sv.get(7), g)
    sv.accumulate(7, g)
    assert torch.equal(sv.get(7), g + g)
    before = params.clone()
    sv.accumulate(PARAMS, g)  # an existing vector is added to, in place
    assert torch.equal(params, before + g)
    with pytest.raises(VectorError):
        sv.accumulate(MAX_VECTORS, g)


@pytest.mark.parametrize("value", [
    0.0, 1.0, -1.0, 1.5, -2.75, math.pi, -1e-300, 1e-300, 5e-324, -5e-324, 1e308,
    -1.7976931348623157e308, math.inf, -math.inf, 3.4028234663852886e38, 1.1754943508222875e-38,
])
def test_float_bits_round_trip(value):
    bits = float_bits(value)
    assert -2 ** 63 <= bits < 2 ** 63
    # as the shard sends it: through an int64 header tensor
    back = torch.tensor([bits], dtype=torch.int64).tolist()[0]
    assert bits_float(back) == value
    assert math.copysign(1.0, bits_float(back)) == math.copysign(1.0, value)


def test_float_bits_patterns():
    assert float_bits(1.0) == 0x3FF0000000000000
    assert float_bits(-0.0) == -2 ** 63
    assert math.copysign(1.0, bits_float(float_bits(-0.0))) == -1.0
    assert float_bits(-2.0) == 0xC000000000000000 - 2 ** 64
    assert math.isnan(bits_float(float_bits(math.nan)))


# ---- RemoteVectors over real shards ----------------------------------------------------------


@contextmanager
def cluster(transport: str, n: int = N, timeout: float = TIMEOUT, layout: Layout | None = None,
            rule: OptimizerConfig | None = None):
    """S shards serving in threads of this process, and a PSClient ("driver") to them
    (`layout`: the shards of that layout instead, e.g. a chunk layout; `rule`: the
    shards' update rule, default none)."""
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=timeout)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []
    servers: list[ShardServer] = []
    ps = None
    layout = layout or Layout.balanced(n, SHARDS)

    def serve(server: ShardServer) -> None:
        try:
            server.serve(stop=stop.is_set)
        except BaseException as exc:  # surfaced by the test, not swallowed
            errors.append(exc)

    try:
        for s in range(layout.shards):
            # registered as a shard process would be (transport "auto" reads it)
            store.set_json(f"members/shard/{s}", {"host": socket.gethostname()})
            # a store client per shard: a channel's rendezvous blocks the client it uses
            server = ShardServer(store.clone(), shard=s, numel=layout.size(s),
                                 rule_cfg=rule or OptimizerConfig(), timeout=timeout)
            servers.append(server)
            threads.append(threading.Thread(target=serve, args=(server,), daemon=True,
                                            name=f"test-shard{s}"))
            threads[-1].start()
        ps = PSClient(store.clone(), layout, "driver", transport=transport, timeout=timeout,
                      grad_buffers=1)
        yield ps, servers
    finally:
        try:
            if ps is not None:
                ps.close()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout)
            remove_job_files(store.token)
            store.close()
    assert not any(t.is_alive() for t in threads), "a shard did not stop"
    assert not errors, errors


@pytest.fixture(params=["shm", "gloo"])
def remote(request, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
    with cluster(request.param) as (ps, servers):
        assert all(c.shm == (request.param == "shm") for c in ps._conns)
        yield ps, servers


def pull(ps: PSClient) -> torch.Tensor:
    out = torch.full((ps.layout.numel,), math.nan)
    ps.pull(out).wait(TIMEOUT)
    return out


def dot_tolerance(a: torch.Tensor, b: torch.Tensor) -> float:
    """1e-5 of the sum of |a_i b_i|: shards sum their slices in another order."""
    return 1e-5 * float((a * b).abs().sum()) + 1e-30


def test_random_operations_match_tensor_space(remote):
    ps, _ = remote
    rng = random.Random(1)
    x0 = torch.randn(N)
    ps.set(x0).wait(TIMEOUT)
    assert torch.equal(pull(ps), x0)

    space = RemoteVectors(ps)
    mirror = TensorSpace(N)
    handles = {PARAMS: mirror.new()}  # remote handle -> mirror handle
    mirror.tensor(handles[PARAMS]).copy_(x0)

    def m(v: int) -> torch.Tensor:
        return mirror.tensor(handles[v])

    checked = 0
    for _ in range(80):
        live = sorted(handles)
        made = [v for v in live if v != PARAMS]
        op = rng.choice(["new", "new", "free", "copy", "zero", "scale", "axpy", "axpy",
                         "dot", "norm_inf", "norm_1"])
        if op == "new" or (op == "free" and not made):
            if len(made) >= 6:
                continue
            v = space.new()
            assert v not in handles
            handles[v] = mirror.new()
            m(v).zero_()  # RemoteVectors.new zeroes on every shard
        elif op == "free":
            v = rng.choice(made)
            space.free(v)
            mirror.free(handles.pop(v))
        elif op == "copy":
            dst, src = rng.choice(live), rng.choice(live)
            space.copy(dst, src)
            mirror.copy(handles[dst], handles[src])
        elif op == "zero":
            v = rng.choice(live)
            space.zero(v)
            m(v).zero_()
        elif op == "scale":
            v, alpha = rng.choice(live), rng.uniform(-1.5, 1.5)
            space.scale(v, alpha)
            mirror.scale(handles[v], alpha)
        elif op == "axpy":
            x, y, alpha = rng.choice(live), rng.choice(live), rng.uniform(-1.0, 1.0)
            space.axpy(alpha, x, y)
            mirror.axpy(alpha, handles[x], handles[y])
        elif op == "dot":
            a, b = rng.choice(live), rng.choice(live)
            got = space.dot(a, b)
            assert got == pytest.approx(mirror.dot(handles[a], handles[b]), rel=1e-5,
                                        abs=dot_tolerance(m(a), m(b)))
            checked += 1
        elif op == "norm_inf":
            v = rng.choice(live)
            assert space.norm_inf(v) == mirror.norm_inf(handles[v])  # a max: exact
            checked += 1
        elif op == "norm_1":
            v = rng.choice(live)
            assert space.norm_1(v) == pytest.approx(mirror.norm_1(handles[v]), rel=1e-5)
            checked += 1
    assert checked >= 10

    # the final vectors: the parameters directly, the others through vector 0
    torch.testing.assert_close(pull(ps), m(PARAMS))
    made = [v for v in sorted(handles) if v != PARAMS]
    assert made, "the sequence left no vector to compare"
    for v in made:
        space.copy(PARAMS, v)
        torch.testing.assert_close(pull(ps), m(v), msg=f"vector {v}")


def test_handles_from_one_up_and_reused(remote):
    ps, _ = remote
    space = RemoteVectors(ps)
    a, b = space.new(), space.new()
    assert (a, b) == (1, 2)
    space.free(a)
    assert space.new() == a
    assert space.new() == 3
    assert space.ops == 5


def test_scalars_of_known_vectors(remote):
    ps, _ = remote
    x = torch.arange(N, dtype=torch.float32) - 500.0  # |x| peaks at the first shard's start
    ps.set(x).wait(TIMEOUT)
    space = RemoteVectors(ps)
    assert space.norm_inf(PARAMS) == 500.0
    assert space.norm_1(PARAMS) == float(x.abs().sum())
    assert space.dot(PARAMS, PARAMS) == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6)
    # every shard answers its own part
    assert ps.vector(V.NORM_1, PARAMS).wait(TIMEOUT) == [
        float(x[a:b].abs().sum()) for a, b in ps.layout.ranges]


def test_accumulate_adds_the_gradient_buffer(remote):
    ps, servers = remote
    x0 = torch.randn(N)
    g = torch.randn(N)
    ps.set(x0).wait(TIMEOUT)
    space = RemoteVectors(ps)
    ps.grad_buffers[0].copy_(g)

    fresh = 9  # never made: the shards start it at zero
    ps.accumulate(0, fresh).wait(TIMEOUT)
    space.copy(PARAMS, fresh)
    torch.testing.assert_close(pull(ps), g, rtol=0, atol=0)
    ps.accumulate(0, fresh).wait(TIMEOUT)
    space.copy(PARAMS, fresh)
    torch.testing.assert_close(pull(ps), 2 * g, rtol=0, atol=0)

    made = space.new()
    space.axpy(1.0, fresh, made)   # made = 2g
    ps.accumulate(0, made).wait(TIMEOUT)
    space.copy(PARAMS, made)
    torch.testing.assert_close(pull(ps), 3 * g)
    ps.accumulate(0, made, replace=True).wait(TIMEOUT)  # ADMM's contributions
    space.copy(PARAMS, made)
    torch.testing.assert_close(pull(ps), g, rtol=0, atol=0)
    for server in servers:
        assert server.stats()["errors"] == [] and server.stats()["clients_lost"] == []


def test_refused_operation_names_it_and_the_connection_survives(remote):
    ps, servers = remote
    x0 = torch.randn(N)
    ps.set(x0).wait(TIMEOUT)
    space = RemoteVectors(ps)
    with pytest.raises(RuntimeError, match="refused vector operation dot on vector 77"):
        space.dot(77, PARAMS)
    with pytest.raises(RuntimeError, match="refused vector operation free on vector 0"):
        ps.vector(V.FREE, PARAMS).wait(TIMEOUT)
    with pytest.raises(ValueError, match="vector 0 was not made by new"):
        space.free(PARAMS)  # refused before it reaches the shards
    with pytest.raises(RuntimeError, match="refused vector operation 42"):
        ps.vector(42, PARAMS).wait(TIMEOUT)
    with pytest.raises(RuntimeError, match="refused vector operation zero"):
        space.zero(MAX_VECTORS)
    # the connections go on working
    assert space.norm_1(PARAMS) == pytest.approx(float(x0.abs().sum()), rel=1e-5)
    assert space.new() == 1
    space.copy(1, PARAMS)
    space.scale(1, 2.0)
    space.copy(PARAMS, 1)
    torch.testing.assert_close(pull(ps), 2 * x0)
    space.free(1)
    with pytest.raises(ValueError, match="already freed"):
        space.free(1)  # a double free would hand number 1 to two vectors later
    for server in servers:
        assert server.stats()["errors"] == [] and server.stats()["clients_lost"] == []


def test_norm_inf_propagates_nan(monkeypatch):
    """A NaN on any shard makes the norm NaN, as torch's max does (so L-BFGS's stop test
    cannot mistake a NaN gradient for a converged one)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with cluster("shm") as (ps, _):
        x = torch.ones(N)
        x[N - 1] = math.nan  # on the last shard
        ps.set(x).wait(TIMEOUT)
        mirror = TensorSpace(N)
        h = mirror.new()
        mirror.tensor(h).copy_(x)
        assert math.isnan(mirror.norm_inf(h))
        assert math.isnan(RemoteVectors(ps).norm_inf(PARAMS))


def test_refused_accumulate_answers_and_the_connection_survives(monkeypatch):
    """ACCUM into an impossible vector gets an error reply; the connection goes on."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with cluster("shm", timeout=2) as (ps, servers):
        x0 = torch.randn(N)
        ps.set(x0).wait(TIMEOUT)
        with pytest.raises(RuntimeError, match="accumulate"):
            ps.accumulate(0, MAX_VECTORS).wait(TIMEOUT)
        assert RemoteVectors(ps).norm_1(PARAMS) == pytest.approx(float(x0.abs().sum()),
                                                                 rel=1e-5)


def test_a_shard_that_hung_up(monkeypatch):
    """A shard that ends a connection gives the client ChannelClosed, and close() still says
    goodbye to the other shards without raising."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # (the same on gloo.) A short timeout: the shards whose goodbye close() drops wait it out
    with cluster("shm", timeout=2) as (ps, servers):
        ps._conns[0].channel.send_header(999)  # not an op: shard 0 ends this connection
        with pytest.raises((RuntimeError, ConnectionError)):
            ps.vector(V.NORM_1, PARAMS).wait(TIMEOUT)  # sent before or after it hung up
        assert servers[0].stats()["errors"] == ["driver: unknown op 999 from driver"]
        # the pair is closed now: the next request and the goodbye meet a closed pair
        with pytest.raises(ChannelClosed):
            ps.vector(V.NORM_1, PARAMS).wait(TIMEOUT)
    # (leaving the cluster closes the client: close() must say goodbye to shards 1 and 2
    # and pass over shard 0, which is gone, without raising)


def test_auto_transport_picks_shm_on_this_host():
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=TIMEOUT)
    try:
        store.set_json("members/shard/0", {"host": socket.gethostname()})
        store.set_json("members/shard/1", {"host": socket.gethostname() + "-elsewhere"})
        assert resolve_transport("auto", store, 0) == "shm"
        assert resolve_transport("auto", store, 1) == "gloo"
        assert resolve_transport("gloo", store, 0) == "gloo"
    finally:
        store.close()
