"""Project Adam's chunked shards (`--shard-layout chunks`): the layout, the data path, and
the oracle that training with chunks equals training with contiguous ranges.

Update rules are elementwise, so a shard applying its rule to a concatenation of
chunks does the same arithmetic on every element as one holding a range: with one
replica fetching and pushing every step the trained parameters must be bit for bit
those of the range layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import distbelief
from distbelief.config import OptimizerConfig
from distbelief.job import JobConfig, apply_options
from distbelief.errors import UserError
from distbelief.ps import chunks as C
from distbelief.ps import vectors as V
from distbelief.ps.layout import Layout
from test_vectors import TIMEOUT, cluster

MB = 1 << 20

# ---- the layout: pure ------------------------------------------------------------------------


def coverage(layout: Layout) -> torch.Tensor:
    """How many times each element of the flat vector is held by some shard."""
    hits = torch.zeros(layout.numel, dtype=torch.int64)
    for s in range(layout.shards):
        for a, b in layout.segments(s):
            hits[a:b] += 1
    return hits


@pytest.mark.parametrize("numel, shards, chunk", [
    (30_000_000, 4, MB // 4),    # a 120 MB model in Project Adam's 1 MB chunks: 115 chunks
    (26_122, 3, 256),            # the digits MLP in 1 KB chunks (the oracle's): 103 chunks
    (10_007, 4, 25),             # a short last chunk: 401 chunks
    (1_000, 7, 9),
])
def test_every_element_is_held_exactly_once_in_chunks_of_chunk_bytes(numel, shards, chunk):
    layout = Layout.chunked(numel, shards, chunk)
    assert layout.kind == "chunks" and layout.shards == shards and layout.ranges == ()
    assert torch.equal(coverage(layout), torch.ones(numel, dtype=torch.int64))
    assert sum(layout.size(s) for s in range(shards)) == numel
    n = C.count(numel, chunk)
    assert sum(layout.chunks.counts) == n
    for s in range(shards):
        held = 0
        for a, b in layout.segments(s):
            assert a % chunk == 0, "a segment starts at a chunk boundary"
            # whole chunks, except the vector's last chunk which may be shorter
            assert (b - a) % chunk == 0 or b == numel
            held += -(-(b - a) // chunk)
        assert held == layout.chunks.counts[s]
        assert layout.segments(s) == tuple(sorted(layout.segments(s))), "parameter order"


@pytest.mark.parametrize("numel, shards, chunk", [
    (30_000_000, 4, MB // 4), (25_600, 4, 256), (100_000, 4, 997), (50_000, 5, 64),
    (1_000_003, 8, 1_000),
])
def test_bytes_are_balanced_within_1_2(numel, shards, chunk):
    assert C.count(numel, chunk) >= 100
    layout = Layout.chunked(numel, shards, chunk)
    sizes = [layout.size(s) for s in range(shards)]
    assert max(sizes) / min(sizes) <= 1.2
    counts = layout.chunks.counts
    assert max(counts) - min(counts) <= 1, "bounded loads: chunk counts differ by at most one"
    assert layout.describe()["balance"] == pytest.approx(max(sizes) / min(sizes))


def test_plain_hashing_would_not_be_balanced_but_most_chunks_keep_their_first_choice():
    """The bounds matter (the test above is sharp), and the placement is still hashing."""
    n, shards = C.count(30_000_000, MB // 4), [0, 1, 2, 3]
    first = [C.preference(c, shards)[0] for c in range(n)]
    plain = [first.count(s) for s in shards]
    assert max(plain) / min(plain) > 1.2
    owners = C.assign(n, shards)
    assert sum(o == f for o, f in zip(owners, first)) / n > 0.9


def test_each_chunk_goes_to_its_most_preferred_shard_with_room():
    n, shards = 103, [0, 1, 2]
    owners, loads = C.assign(n, shards), [0, 0, 0]
    floor, extra = divmod(n, len(shards))
    for chunk, owner in enumerate(owners):
        order = C.preference(chunk, shards)
        for i in order[: order.index(owner)]:  # every shard it preferred was full
            assert loads[i] > floor or (loads[i] == floor
                                        and sum(x > floor for x in loads) >= extra)
        loads[owner] += 1


def test_assignment_is_the_same_in_another_process():
    """blake2b, not Python's per-process salted hash(): another interpreter with another
    PYTHONHASHSEED lays the chunks out identically."""
    code = ("import json; from distbelief.ps.layout import Layout; "
            "print(json.dumps(Layout.chunked(100_000, 4, 997).to_json()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    here = Layout.chunked(100_000, 4, 997)
    assert Layout.from_json(json.loads(out)) == here
    assert Layout.chunked(100_000, 4, 997) == here


def test_json_round_trip_and_the_range_layout_is_unchanged():
    chunked = Layout.chunked(10_007, 4, 25)
    assert Layout.from_json(json.loads(json.dumps(chunked.to_json()))) == chunked
    ranges = Layout.balanced(10, 3)
    assert ranges.to_json() == {"numel": 10, "ranges": [[0, 4], [4, 7], [7, 10]]}
    assert Layout.from_json(ranges.to_json()) == ranges
    assert ranges.segments(1) == ((4, 7),) and ranges.describe()["kind"] == "ranges"


def test_partitions_chunk_their_own_range_over_their_own_shards():
    layout, groups = Layout.by_partition([6_000, 2_000], shards=5, chunk_numel=50)
    assert groups == [[0, 1, 2], [3, 4]]
    assert torch.equal(coverage(layout), torch.ones(8_000, dtype=torch.int64))
    for (lo, hi), group in zip([(0, 6_000), (6_000, 8_000)], groups):
        for s in group:  # a partition's shards hold only that partition's parameters
            assert all(lo <= a < b <= hi for a, b in layout.segments(s))
    assert sum(len(layout.segments(s)) for s in groups[1]) > 2, "chunks, not two ranges"
    for (lo, hi), group in zip([(0, 6_000), (6_000, 8_000)], groups):
        part = layout.subset(group)  # what partition k's PSClient gets
        assert part.numel == hi - lo and part.ids == tuple(group)
        assert torch.equal(coverage(part), torch.ones(hi - lo, dtype=torch.int64))
        assert [part.segments(i) for i in range(len(group))] == [
            tuple((a - lo, b - lo) for a, b in layout.segments(s)) for s in group]
        assert Layout.from_json(part.to_json()) == part
    with pytest.raises(ValueError, match="contiguous range"):
        Layout.chunked(8_000, 4, 50).subset([1, 2])


# ---- the data path: PSClient and shards in this process -------------------------------------


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_client_scatters_and_gathers_every_segment(transport, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    layout = Layout.chunked(1_000, 3, 16)
    assert max(len(layout.segments(s)) for s in range(3)) > 1
    x, g = torch.randn(1_000), torch.randn(1_000)
    with cluster(transport, layout=layout) as (ps, servers):
        ps.set(x).wait(TIMEOUT)
        out = torch.full((1_000,), float("nan"))
        ps.pull(out).wait(TIMEOUT)  # served after the set: the slices are in place
        assert torch.equal(out, x)
        for s, server in enumerate(servers):  # a shard's slice: its segments, concatenated
            assert torch.equal(server.params, torch.cat([x[a:b] for a, b in layout.segments(s)]))
        assert ps.vector(V.NORM_1, V.PARAMS).wait(TIMEOUT) == [
            float(server.params.abs().sum()) for server in servers]
        # a gradient read from the client's buffer (gathered on shm, sent on gloo)
        space = V.RemoteVectors(ps)
        v = space.new()
        ps.grad_buffers[0].copy_(g)
        ps.accumulate(0, v).wait(TIMEOUT)
        space.copy(V.PARAMS, v)
        ps.pull(out).wait(TIMEOUT)
        assert torch.equal(out, g)


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adagrad", "adam"])
def test_shards_of_chunks_apply_pushes_exactly_as_shards_of_ranges(rule, monkeypatch):
    """The same pushes through a range and a chunk layout (both transports, every rule)
    leave the same parameters, bit for bit."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    n, generator = 1_000, torch.Generator().manual_seed(7)
    x0 = torch.randn(n, generator=generator)
    grads = [torch.randn(n, generator=generator) for _ in range(4)]
    results = {}
    for transport in ("shm", "gloo"):
        for kind, layout in (("ranges", Layout.balanced(n, 3)),
                             ("chunks", Layout.chunked(n, 3, 16))):
            with cluster(transport, layout=layout,
                         rule=OptimizerConfig(rule=rule, lr=0.01)) as (ps, _):
                ps.set(x0).wait(TIMEOUT)
                for step, g in enumerate(grads, 1):
                    ps.grad_buffers[0].copy_(g)
                    assert [v for v, _ in ps.push(0).wait(TIMEOUT)] == [step] * 3
                out = torch.empty(n)
                ps.pull(out).wait(TIMEOUT)
                results[transport, kind] = out
    assert not torch.equal(results["shm", "ranges"], x0)
    for key, got in results.items():
        assert torch.equal(got, results["shm", "ranges"]), key


# ---- the oracle: training with chunks is training with ranges ------------------------------

STEPS, SEED, RULE, LR = 25, 3, "adagrad", 0.05
CHUNK_BYTES = 1024  # the digits MLP's 26,122 parameters make 103 chunks


def train(tmp_path, name: str, **options) -> tuple[dict, dict]:
    # one thread in every process: a whole replica would otherwise get the cores its two
    # partitions share, and a matrix product split over threads sums in another order
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, n_fetch=1, n_push=1,
                               rule=RULE, lr=LR, batch_size=32, steps=STEPS, seed=SEED,
                               threads=1, run_dir=str(tmp_path / name), **options)
    return summary, torch.load(tmp_path / name / "model.pt")


@pytest.fixture(scope="module")
def range_run(tmp_path_factory) -> dict:
    """The range layout's trained parameters."""
    return train(tmp_path_factory.mktemp("ranges"), "run", shards=3, transport="shm")[1]


def assert_same(trained: dict, expected: dict) -> None:
    assert trained.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.equal(trained[name], want), name


def test_chunks_train_exactly_as_ranges(tmp_path, range_run):
    summary, trained = train(tmp_path, "chunks", shards=3, transport="shm",
                             shard_layout="chunks", chunk_bytes=CHUNK_BYTES)
    layout = summary["layout"]
    assert layout["kind"] == "chunks" and layout["chunks"] == 103
    assert layout["chunk_bytes"] == CHUNK_BYTES
    assert sum(layout["shard_bytes"]) == 4 * 26_122 and layout["balance"] <= 1.2
    assert summary["shard_pushes"] == [STEPS] * 3
    assert_same(trained, range_run)


def test_partitions_with_chunks_over_gloo_train_exactly_as_the_whole_model(tmp_path, range_run):
    """Each partition's chunks hashed over its own shards, reached over gloo: a partition
    talks to its own shards only, and (one micro-batch: the same arithmetic) the result
    is the unpartitioned range layout's, bit for bit."""
    summary, trained = train(tmp_path, "parts", shards=4, partitions=2, micro_batches=1,
                             transport="gloo", shard_layout="chunks", chunk_bytes=CHUNK_BYTES)
    assert summary["layout"]["kind"] == "chunks"
    assert summary["layout"]["chunks"] >= 103  # each partition's last chunk may be short
    for k, group in enumerate(summary["partition"]["shards"]):
        for s in group:
            assert summary["partition"]["shard_clients"][s] == ["coordinator",
                                                                f"replica0.part{k}"]
    assert_same(trained, range_run)


# ---- bad input ------------------------------------------------------------------------------


def options(**given) -> JobConfig:
    return apply_options(JobConfig(), given).validate()


@pytest.mark.parametrize("given, mentions", [
    ({"shard_layout": "chunks", "chunk_bytes": 0}, ["--chunk-bytes", "multiple of 4", "got 0"]),
    ({"shard_layout": "chunks", "chunk_bytes": -8}, ["--chunk-bytes", "got -8"]),
    ({"shard_layout": "chunks", "chunk_bytes": 1022}, ["--chunk-bytes", "got 1022", "1048576"]),
    ({"chunk_bytes": 4096}, ["--chunk-bytes 4096", "--shard-layout chunks"]),
    ({"shard_layout": "hashed"}, ["--shard-layout", "'hashed'", "ranges, chunks"]),
])
def test_bad_options_are_one_line_with_the_fix(given, mentions):
    with pytest.raises(UserError) as caught:
        options(**given)
    for mention in mentions:
        assert mention in str(caught.value)
    assert "\n" not in str(caught.value)


def test_chunks_that_cannot_fill_the_shards_are_refused_with_a_size_that_fits():
    with pytest.raises(UserError, match=r"into 1 chunks, fewer than its 3 shards: use "
                                        r"--chunk-bytes 34828 or less"):
        Layout.chunked(26_122, 3, MB // 4)
    assert Layout.chunked(26_122, 3, 34_828 // 4).shards == 3  # the size it proposed works
    with pytest.raises(UserError, match="more than 65536: use --chunk-bytes 8 or more"):
        Layout.chunked(100_000, 2, 1)
    with pytest.raises(UserError, match="cuts partition 0's 100 parameters into 1 chunks"):
        Layout.by_partition([100, 100], shards=4, chunk_numel=128)


def test_train_refuses_chunks_too_big_for_the_model_before_starting(tmp_path):
    with pytest.raises(UserError, match="--chunk-bytes 1048576 cuts the model's 26122"):
        distbelief.train(dataset="digits", model="mlp", shards=2, steps=1,
                         shard_layout="chunks", run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
