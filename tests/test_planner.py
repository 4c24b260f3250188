"""The planner: candidates from the registry, impossible requests, and `distbelief plan` /
`--strategy auto` end to end (each with one short trial through the real launcher)."""

from __future__ import annotations

import json
import signal

import pytest

from distbelief import cli
from distbelief.algorithms.registry import ALGORITHMS
from distbelief.job import JobConfig, load_config
from distbelief.planner.candidates import enumerate_candidates, stage_ranges
from distbelief.planner.plan import host_commands

from test_planner_cost import _hardware, _profile


@pytest.fixture
def main(monkeypatch, capsys, tmp_path):
    """`distbelief ...` in this process (the trials still run as child processes)."""
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    signal.signal(signal.SIGTERM, handler)


def _names(candidates):
    return {c.algorithm for c in candidates}


def test_every_algorithm_of_the_registry_is_a_candidate():
    candidates = enumerate_candidates(JobConfig(), set(), _profile(), _hardware(cores_per_host=2))
    assert _names(candidates) == set(ALGORITHMS)
    for c in candidates:
        assert c.config.validate()  # every candidate is a config its algorithm accepts
        assert c.layout.replicas * c.layout.partitions <= 2  # within the cores
    downpour = [c for c in candidates if c.algorithm == "downpour"]
    assert {(c.options["n_fetch"], c.options["shards"], c.options["partitions"])
            for c in downpour} >= {(1, 1, 1), (4, 2, 1), (1, 2, 2)}
    assert {c.options.get("split") for c in downpour if c.options["partitions"] == 2} == {
        "layers", "units"}


def test_options_the_user_fixed_are_kept():
    base = JobConfig().with_overrides({"downpour.n_fetch": 4, "cluster.replicas": 2})
    candidates = enumerate_candidates(base, {"downpour.n_fetch", "cluster.replicas"},
                                      _profile(), _hardware(cores_per_host=4))
    assert _names(candidates) == {"downpour"}  # the others refuse --n-fetch
    assert {c.config.downpour.n_fetch for c in candidates} == {4}
    assert {c.config.cluster.replicas for c in candidates} == {2}
    only = enumerate_candidates(JobConfig(algorithm="sync"), {"algorithm"}, _profile(),
                                _hardware())
    assert _names(only) == {"sync"}


def test_many_hosts_leave_out_the_one_host_algorithm():
    candidates = enumerate_candidates(JobConfig(), set(), _profile(), _hardware(hosts=4))
    assert "hogwild" not in _names(candidates)
    assert max(c.layout.replicas for c in candidates) == 16  # 4 hosts x 4 cores


def test_stage_ranges_balance_time_and_bytes():
    profile = _profile(layer_seconds=[1.0, 0.0, 1.0, 0.0, 2.0, 0.0],
                       layer_param_bytes=[10, 0, 10, 0, 20, 0],
                       activation_bytes=[1] * 6)
    assert stage_ranges(profile, 2, None) == ((0, 4), (4, 6))  # whole blocks: [1+1] | [2]
    assert stage_ranges(profile, 3, None) == ((0, 2), (2, 4), (4, 6))
    assert stage_ranges(profile, 2, "1,5") == ((0, 1), (1, 6))


def test_host_commands_start_every_rank_once():
    cfg = JobConfig().with_overrides({"cluster.replicas": 5, "cluster.shards": 2})
    commands = host_commands(cfg, _hardware(hosts=3), "plan.toml")
    assert len(commands) == 3
    ranks = [int(part.split("=")[1].split()[0]) for c in commands
             for part in c.split() if part.startswith("RANK=")]
    assert sorted(ranks) == list(range(1 + 2 + 5))
    assert all("WORLD_SIZE=8" in c and "MASTER_ADDR=HOST0" in c for c in commands)


def test_plan_for_hosts_not_here_chooses_by_the_cost_model(main, tmp_path):
    code, out, err = main("plan", "--dataset", "digits", "--model", "mlp", "--hosts", "4",
                          "--cores-per-host", "8", "--memory-per-host", "64GB",
                          "--link-bandwidth", "10Gbit", "-o", tmp_path / "p", "--quiet")
    assert code == 0, err
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert "trials run on one host and this plan is for 4" in plan["why"]
    assert all(c["measured"] is None for c in plan["candidates"])
    assert len(plan["commands"]) == 4 and plan["hardware"]["link_bandwidth"] == 1.25e9
    chosen = load_config(tmp_path / "p" / "plan.toml").validate()
    assert chosen.algorithm == plan["choice"]["algorithm"] != "hogwild"


@pytest.mark.parametrize("args, mentions", [
    (["--memory-per-host", "1MB"], "does not fit in memory"),
    (["--partitions", "5", "--shards", "5"], "more than the model's 3 layers"),
    (["--trials", "-1"], "--trials -1"),
    (["--link-bandwidth", "fast"], "--link-bandwidth 'fast'"),
    (["--hosts", "0"], "--hosts 0"),
])
def test_impossible_requests_get_one_line(main, args, mentions):
    code, out, err = main("plan", "--dataset", "digits", "--model", "mlp", "--trials", "0",
                          "--quiet", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distbelief: error: ") and mentions in lines[0]


def test_plan_tries_and_writes_a_config_train_accepts(main, tmp_path):
    code, out, err = main("plan", "--dataset", "digits", "--model", "mlp", "--trials", "2",
                          "--trial-seconds", "1", "-o", tmp_path / "p", "--quiet")
    assert code == 0, err
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    tried = [c for c in plan["shortlist"] if c["measured"]]
    assert len(tried) == 2 and tried[0] == plan["shortlist"][0]  # the fastest predicted first
    waiting = {"sync", "admm"}  # steps that wait for the others: one of them is tried too
    assert len({c["algorithm"] for c in tried} & waiting) == 1
    for c in tried:
        m = c["measured"]
        # (under load a trial may report for less than its window before the planner's
        # grace runs out: at least two reports, some time apart)
        assert m["status"] == "ok" and m["events"] >= 2 and m["window_seconds"] > 0
    ok = [c for c in tried if c["measured"]["loss_drop_per_second"] is not None]
    best = max(ok, key=lambda c: c["measured"]["loss_drop_per_second"])
    assert plan["choice"]["name"] == best["name"] and best["name"] in plan["why"]
    chosen = load_config(tmp_path / "p" / "plan.toml").validate()
    assert chosen.to_dict() == JobConfig.from_dict(plan["config"]).to_dict()
    assert "chosen: " in out and f"distbelief train {tmp_path / 'p' / 'plan.toml'}" in out


def test_train_strategy_auto_keeps_the_options_given(tmp_path):
    """The trials are the plan test's; here the cost model alone chooses (trials=0)."""
    import distbelief

    summary = distbelief.train(strategy="auto", trials=0, dataset="digits",
                               model="mlp", replicas=1, steps=40,
                               run_dir=str(tmp_path / "run"))
    plan = summary["plan"]
    assert summary["algorithm"] == plan["choice"]["algorithm"]
    assert summary["steps"] == 40 and summary["config"]["model"] == "mlp"
    assert {"cluster.replicas", "train.steps", "data.dataset", "model.name"} <= set(plan["fixed"])
    served = [c for c in plan["candidates"] if ALGORITHMS[c["algorithm"]].parameters == "served"]
    assert served and all("replicas" not in c["options"] for c in served)
    assert summary["replicas"] == (1 if ALGORITHMS[summary["algorithm"]].parameters == "served"
                                   else summary["replicas"])
    assert summary["test_accuracy"] > 0.3
    assert "no trial ran" in plan["why"]


def test_strategy_options_are_refused_where_they_mean_nothing(main, tmp_path):
    code, _, err = main("train", "--trials", "2", "--dataset", "digits")
    assert code == 2 and "--trials is for --strategy auto" in err
    code, _, err = main("train", "--strategy", "auto", "--resume", tmp_path)
    assert code == 2 and "--strategy auto plans a new run" in err
    assert len(err.strip().splitlines()) == 1


def test_a_gpu_plan_is_refused_not_mispredicted(main, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = main("plan", "--dataset", "digits", "--model", "mlp", "--device", "cuda",
                        "--trials", "0", "--quiet")
    assert code == 2 and "no cost model of GPUs yet" in err and len(err.strip().splitlines()) == 1
