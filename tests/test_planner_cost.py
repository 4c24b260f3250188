"""The planner's cost model: each pure function against a table, then `predict` on made-up
profiles where the answer follows from the formulas by hand."""

from __future__ import annotations

import dataclasses

import pytest

from distbelief.algorithms.base import Exchange
from distbelief.errors import UserError
from distbelief.planner import cost
from distbelief.planner.cost import Layout, predict
from distbelief.planner.links import Hardware, parse_bandwidth, parse_memory
from distbelief.planner.profile import Profile
from distbelief.planner.trials import loss_slope, window_stats


@pytest.mark.parametrize("replicas, nbytes, bandwidth, seconds", [
    (1, 1e9, 1e9, 0.0),          # nothing to reduce
    (2, 1e9, 1e9, 1.0),          # 2 * 1/2 * P / B
    (4, 1e9, 1e9, 1.5),          # 2 * 3/4
    (8, 4e8, 1e9, 0.7),          # 2 * 7/8 * 0.4
])
def test_allreduce_seconds(replicas, nbytes, bandwidth, seconds):
    assert cost.allreduce_seconds(replicas, nbytes, bandwidth) == pytest.approx(seconds)


@pytest.mark.parametrize("pull, push, nbytes, bandwidth, shards, latency, seconds", [
    (1.0, 1.0, 1e6, 1e9, 1, 0.0, 2e-3),             # P fetched + P pushed
    (0.25, 0.25, 1e6, 1e9, 1, 0.0, 5e-4),           # n_fetch = n_push = 4
    (1.0, 0.5, 1e6, 1e9, 2, 1e-4, 1.5e-3 + 1.5 * 2e-4),  # a header round trip per shard
    (0.0, 0.0, 1e6, 1e9, 4, 1e-4, 0.0),             # hogwild/sync: no server traffic
])
def test_ps_transfer_seconds(pull, push, nbytes, bandwidth, shards, latency, seconds):
    assert cost.ps_transfer_seconds(pull, push, nbytes, bandwidth, shards,
                                    latency) == pytest.approx(seconds)


@pytest.mark.parametrize("pull, push, elements, shards, rule, copy, seconds", [
    (1.0, 1.0, 1e6, 1, 1e-9, 4e9, 1e-3 + 2e-3),    # rule on every element + two copies
    (1.0, 1.0, 1e6, 4, 1e-9, 4e9, (1e-3 + 2e-3) / 4),
    (0.25, 0.25, 1e6, 1, 0.0, 4e9, 0.5e-3),       # no rule in the shards
])
def test_shard_seconds_per_step(pull, push, elements, shards, rule, copy, seconds):
    assert cost.shard_seconds_per_step(pull, push, elements, shards, rule,
                                       copy) == pytest.approx(seconds)


@pytest.mark.parametrize("stages, micro, boundary, seconds", [
    ([1.0], 4, 0.5, 1.0),                  # one stage: no pipeline
    ([1.0, 1.0], 1, 0.0, 2.0),             # no micro-batching: stages run in turn
    ([1.0, 1.0], 4, 0.0, 1.25),            # (M + K - 1) / M of a stage
    ([1.0, 3.0], 2, 0.0, 4.5),             # bound by the slowest stage: 3 ticks of 1.5
    ([1.0, 1.0], 2, 0.2, 3 * (0.5 + 0.1)),  # each tick carries a micro-batch's transfer
])
def test_pipeline_step_seconds(stages, micro, boundary, seconds):
    assert cost.pipeline_step_seconds(stages, micro, boundary) == pytest.approx(seconds)


@pytest.mark.parametrize("compute, parts, gathered, bandwidth, linears, latency, seconds", [
    (1.0, 1, 1e9, 1e9, 3, 1e-3, 1.0),
    (1.0, 2, 1e9, 1e9, 3, 0.0, 0.5 + 2 * 0.5),
    (1.0, 4, 0.0, 1e9, 3, 1e-3, 0.25 + 6e-3),
])
def test_units_step_seconds(compute, parts, gathered, bandwidth, linears, latency, seconds):
    assert cost.units_step_seconds(compute, parts, gathered, bandwidth, linears,
                                   latency) == pytest.approx(seconds)


@pytest.mark.parametrize("busy, cores, share", [(1, 2, 1.0), (2, 2, 1.0), (4, 2, 0.5),
                                               (3, 2, 2 / 3)])
def test_cpu_share(busy, cores, share):
    assert cost.cpu_share(busy, cores) == pytest.approx(share)


@pytest.mark.parametrize("busy, cores, threads, share", [
    (2, 2, 1, 1.0), (3, 2, 1, 2 / 3), (3, 2, 2, 4 / 9),  # two threads both wait
    (2.5, 2, 2, 0.64)])
def test_oversubscribed_share(busy, cores, threads, share):
    assert cost.oversubscribed_share(busy, cores, threads) == pytest.approx(share)


def test_shards_take_cores_from_the_replicas():
    # a shard whose rule costs a lot per element: its core is taken from the replicas'
    profile = _profile(rule_seconds={"adagrad": 1e-8})
    idle = predict(Layout(replicas=2, shards=1, exchange=Exchange(pull=1.0, push=1.0)), profile,
                   _hardware(cores_per_host=2))
    busy = predict(Layout(replicas=2, shards=1, rule="adagrad",
                          exchange=Exchange(pull=1.0, push=1.0, shard_rule=True)),
                   profile, _hardware(cores_per_host=2))
    assert busy.parts["compute"] > idle.parts["compute"] * 1.2


@pytest.mark.parametrize("steps, quorum, rate", [
    ([0.1, 0.1], None, 20.0),          # independent replicas add up
    ([0.1, 0.4], None, 12.5),          # a slow one adds less
    ([0.1, 0.4], 2, 5.0),              # all must report: the slow one sets the pace
    ([0.1, 0.4], 1, 10.0),             # the fastest half: the slow one is not waited for
    ([0.3, 0.1, 0.2], 2, 10.0),        # the 2nd fastest (0.2 s), 2 steps each time
])
def test_job_steps_per_second(steps, quorum, rate):
    assert cost.job_steps_per_second(steps, quorum) == pytest.approx(rate)


@pytest.mark.parametrize("fraction, replicas, size", [(1.0, 4, 4), (0.5, 4, 2), (0.5, 3, 2),
                                                      (0.1, 4, 1), (0.75, 4, 3)])
def test_quorum_size(fraction, replicas, size):
    from distbelief.algorithms.schedule import quorum_size

    assert quorum_size(fraction, replicas) == size


@pytest.mark.parametrize("params, state, local, buffers, acts, data, base, total", [
    (100, 1, False, 2, 10, 0, 5, 4 * 100 + 20 + 5),      # weights, grads, 2 buffers
    (100, 2, True, 2, 10, 50, 5, 6 * 100 + 20 + 50 + 5),  # + adam's two moments, data
    (100, 0, True, 0, 0, 0, 0, 200),                      # hogwild: no buffers
])
def test_replica_memory(params, state, local, buffers, acts, data, base, total):
    assert cost.replica_memory(params, state, local, buffers, acts, data, base) == total


def test_shard_memory():
    assert cost.shard_memory(400, 4, 1, 7) == 2 * 100 + 7


@pytest.mark.parametrize("text, value", [("10Gbit", 1.25e9), ("10Gbit/s", 1.25e9),
                                         ("1.5GB/s", 1.5e9), ("800MB", 8e8), ("100Mbps", 1e8),
                                         ("2e3", 2e3)])
def test_parse_bandwidth(text, value):
    assert parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["fast", "-1Gbit", "10Gbitz", ""])
def test_parse_bandwidth_refuses(text):
    with pytest.raises(UserError, match="--link-bandwidth .* e.g. 10Gbit"):
        parse_bandwidth(text)


@pytest.mark.parametrize("text, value", [("64GB", 64e9), ("512MiB", 512 * 2**20),
                                         ("1.5TB", 1.5e12), ("1024", 1024)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


def test_loss_slope_and_window():
    assert loss_slope([(0.0, 2.0), (1.0, 1.5), (2.0, 1.0)]) == pytest.approx(-0.5)
    assert loss_slope([(1.0, 2.0), (1.0, 1.0)]) is None
    events = [{"event": "replica_joined", "time": 0.5}]
    events += [{"event": "train", "time": 1.0 + t, "loss": 3.0 - t, "samples": 100}
               for t in range(6)]
    stats = window_stats(events, seconds=3.0)  # the events at 1, 2, 3 and 4 s
    assert stats["events"] == 4 and stats["window_seconds"] == 3.0
    assert stats["samples_per_second"] == pytest.approx(100.0)  # the first's samples excluded
    assert stats["loss_drop_per_second"] == pytest.approx(1.0)
    # from the untrained model's loss to the window's last quarter: a blow-up that came
    # part of the way down again is no drop at all
    blown = [{"event": "train", "time": float(t), "loss": loss, "samples": 10}
             for t, loss in enumerate([500.0, 300.0, 100.0, 50.0, 30.0])]
    stats = window_stats(blown, seconds=4.0, start_loss=2.3)
    assert stats["end_loss"] == 40.0  # the reports at 3 and 4 s: the last quarter
    assert stats["loss_drop_per_second"] == pytest.approx((2.3 - 40.0) / 4)
    assert stats["loss_slope"] < 0  # which a slope would have counted as a fast fall


# ---- predict, on a made-up profile --------------------------------------------------------

@pytest.fixture(autouse=True)
def no_idle_processes(request, monkeypatch):
    """The predict tests below count only what they set up: the idle processes' cores
    (`cost.AUX_BUSY`) are left out except where a test asks for them."""
    if "aux" not in request.fixturenames:
        monkeypatch.setattr(cost, "AUX_BUSY", 0.0)


@pytest.fixture
def aux():
    return cost.AUX_BUSY

def _profile(**changes) -> Profile:
    base = Profile(batch_size=100, parameters=1_000_000, layer_seconds=[0.01, 0.01],
                   layer_param_bytes=[2_000_000, 2_000_000], activation_bytes=[40_000, 4_000],
                   step_seconds={1: 0.02, 2: 0.02}, units_split=True, sequential=True,
                   augment_seconds=0.0, batch_bytes=10_000, train_samples=10_000,
                   dataset_bytes=1_000_000, rule_seconds={"sgd": 0.0, "adagrad": 0.0},
                   base_memory=100_000_000)
    return dataclasses.replace(base, **changes)


def _hardware(**changes) -> Hardware:
    base = Hardware(hosts=1, cores_per_host=4, memory_per_host=10**10, shm_bandwidth=8e9,
                    link_bandwidth=1e9, latency=0.0)
    return dataclasses.replace(base, **changes)


def test_predict_compute_bound_replicas_add_up():
    p = predict(Layout(replicas=2, shards=1, exchange=Exchange(pull=0.0, push=0.0)),
                _profile(), _hardware())
    assert p.step_seconds == pytest.approx(0.02)
    assert p.samples_per_second == pytest.approx(2 * 100 / 0.02)
    assert p.bottleneck == "compute"


def test_predict_parameter_server_traffic():
    # 4 MB each way per step over shm (8 GB/s a copy, two copies): 1 ms each way
    p = predict(Layout(replicas=1, shards=1, exchange=Exchange(pull=1.0, push=1.0)),
                _profile(), _hardware())
    assert p.parts["transfer"] == pytest.approx(2e-3)
    # the shard's work takes a little of the cores the replica's 4 threads use
    assert 0.02 < p.parts["compute"] < 0.021
    assert p.step_seconds == pytest.approx(p.parts["compute"] + 2e-3)
    fewer = predict(Layout(replicas=1, shards=1, exchange=Exchange(pull=0.25, push=0.25)),
                    _profile(), _hardware())
    assert fewer.parts["transfer"] == pytest.approx(0.5e-3)


def test_predict_oversubscribed_cores_slow_every_replica():
    hw = _hardware(cores_per_host=2)
    p = predict(Layout(replicas=4), _profile(), hw)
    assert p.step_seconds == pytest.approx(0.02 / 0.5)  # 4 busy threads on 2 cores
    assert p.samples_per_second == pytest.approx(4 * 100 / 0.04)


def test_idle_processes_cost_most_to_a_replica_of_many_threads(aux):
    hw = _hardware(cores_per_host=2)
    one = predict(Layout(replicas=1, shards=1), _profile(), hw)  # 2 threads
    two = predict(Layout(replicas=2, shards=1), _profile(), hw)  # 1 thread each
    share = 2 / (2 + 2 * aux)  # the coordinator's and the shard's
    assert two.step_seconds == pytest.approx(0.02 / share)
    assert one.step_seconds == pytest.approx(0.02 / share ** 2)


def test_predict_allreduce_between_hosts_uses_the_network():
    hw = _hardware(hosts=2, link_bandwidth=1e8)
    p = predict(Layout(replicas=2, exchange=Exchange(allreduce=True, quorum=True)), _profile(), hw)
    assert p.parts["all-reduce"] == pytest.approx(2 * 0.5 * 4e6 / 1e8)
    assert p.bottleneck == "all-reduce"


def test_predict_slow_replica_and_quorum():
    fast_links = _hardware(allreduce_bandwidth=1e15)  # all-reduce time ~0: compute decides
    everyone = predict(Layout(replicas=2, slow_factor=4.0,
                              exchange=Exchange(allreduce=True, quorum=True)),
                       _profile(), fast_links)
    fastest = predict(Layout(replicas=2, slow_factor=4.0, sync_fraction=0.5,
                             exchange=Exchange(allreduce=True, quorum=True)),
                      _profile(), fast_links)
    async_ = predict(Layout(replicas=2, slow_factor=4.0), _profile(), _hardware())
    assert everyone.samples_per_second == pytest.approx(2 * 100 / 0.08, rel=1e-3)
    assert fastest.samples_per_second == pytest.approx(100 / 0.02, rel=1e-3)
    assert async_.samples_per_second == pytest.approx(100 / 0.02 + 100 / 0.08)


def test_predict_pipeline_and_units():
    pipe = predict(Layout(replicas=1, partitions=2, micro_batches=2, stages=((0, 1), (1, 2))),
                   _profile(), _hardware(latency=0.0, link_bandwidth=1e12))
    assert pipe.parts["compute"] == pytest.approx(3 * 0.01 / 2, rel=1e-3)  # 3 ticks of 5 ms
    units = predict(Layout(replicas=1, partitions=2, split="units"), _profile(),
                    _hardware(link_bandwidth=1e12))
    assert units.parts["compute"] == pytest.approx(0.01, rel=1e-3)


def test_predict_data_servers_take_augmentation_off_the_replicas():
    profile = _profile(augment_seconds=0.03)
    hw = _hardware(cores_per_host=5)  # two replicas of 2 threads, a core for the server
    inline = predict(Layout(replicas=2), profile, hw)
    served = predict(Layout(replicas=2, data_servers=1), profile, hw)
    assert inline.step_seconds == pytest.approx(0.05)
    assert served.samples_per_second == pytest.approx(100 / 0.03)  # one server's rate
    assert served.bottleneck == "data"
    two = predict(Layout(replicas=2, data_servers=2), profile, _hardware(cores_per_host=6))
    assert two.samples_per_second > inline.samples_per_second


def test_predict_memory_counts_every_process():
    profile = _profile()
    p = predict(Layout(replicas=2, shards=2,
                       exchange=Exchange(pull=1.0, push=1.0, shard_rule=True, rule_state=1)),
                profile, _hardware())
    replica = 4 * 4e6 + 2 * 44_000 + 1e6 + 1e8
    shard = 2 * 4e6 / 2 + 1e8
    coordinator = 1e6 + 2 * 4e6 + 1e8
    assert p.memory_per_process == pytest.approx(replica)
    assert p.memory_per_host == pytest.approx(2 * replica + 2 * shard + coordinator)


def test_trials_alternate_synchronous_and_asynchronous_candidates():
    from distbelief.planner.candidates import Candidate
    from distbelief.planner.plan import trial_order

    def candidate(name, quorum):
        return Candidate(name, {}, None, Layout(replicas=2, exchange=Exchange(quorum=quorum)))

    a, b, c, s, t = (candidate("a", False), candidate("b", False), candidate("c", False),
                     candidate("s", True), candidate("t", True))
    assert [x.algorithm for x in trial_order([a, b, s, c, t])] == ["a", "s", "b", "t", "c"]
    assert [x.algorithm for x in trial_order([s, a, t])] == ["s", "a", "t"]
    assert [x.algorithm for x in trial_order([a, b])] == ["a", "b"]


def test_the_allreduce_uses_its_own_measured_bandwidth_on_one_host():
    p = predict(Layout(replicas=2, exchange=Exchange(allreduce=True, quorum=True)), _profile(),
                _hardware(allreduce_bandwidth=4e8, link_bandwidth=1e12))
    assert p.parts["all-reduce"] == pytest.approx(4e6 / 4e8)  # 2 * 1/2 * P / B
