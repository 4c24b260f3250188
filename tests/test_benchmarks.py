"""The benchmarks run end to end and report well-formed numbers.

Timings depend on the machine and its load, so for them only the shape of the report
and the sign of the numbers are checked (targets do not belong in pass/fail tests).
What does not depend on the machine is held to its value: the transports are exact,
and the quick runs learn (their test accuracy is well above chance).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = {"digits": 10, "mnist1d": 10}  # the quick configurations' datasets


def chance(dataset: str) -> float:
    """The accuracy of guessing one class for every sample of `dataset` (balanced classes)."""
    return 1 / NUM_CLASSES[dataset]


def run_quick(benchmark: str, *args: str, timeout: float) -> dict:
    """Run benchmarks/<benchmark>.py with `args`; its report (stdout is the JSON and nothing
    else)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{benchmark}.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_ps_bandwidth_quick_reports_every_configuration() -> None:
    report = run_quick("ps_bandwidth", "--quick", "--size-mb", "4", timeout=120)

    assert report["benchmark"] == "ps_bandwidth"
    assert report["model_bytes"] == 4_000_000
    assert report["rule"] == "sgd"
    assert report["memcpy_bytes_per_second"] > 0
    assert {(r["shards"], r["transport"]) for r in report["results"]} == {
        (1, "shm"), (1, "gloo"), (2, "shm"), (2, "gloo")}
    for r in report["results"]:
        assert r["seconds_per_step"] > 0
        assert r["bytes_per_second"] > 0
        assert r["ratio_to_memcpy"] > 0
        assert r["paired_ratio_to_memcpy"] > 0
        assert r["bytes_per_second"] == 2 * report["model_bytes"] / r["seconds_per_step"]
        assert r["exact"] is True, r  # every push applied exactly the gradient sent
    assert report["target"] == {"shm_ratio_to_memcpy": 0.8, "gloo_step_time_over_gloo_pair": 1.1,
                                "shards": 1}
    assert set(report["met"]) == {"shm", "gloo"}
    assert all(isinstance(met, bool) for met in report["met"].values())
    assert set(report["peers"]) == {"gloo_pair", "rpc"}
    for name, peer in report["peers"].items():
        assert peer["seconds_per_step"] > 0
        for r in report["results"]:
            assert r[f"step_time_over_{name}"] == r["seconds_per_step"] / peer["seconds_per_step"]
    assert report["machine"]["cpus"] >= 1
    assert report["timing"]["runs"] >= 1


def test_stragglers_quick_reports_both_algorithms() -> None:
    report = run_quick("stragglers", "--quick", "--workers", "2", timeout=300)

    assert report["benchmark"] == "stragglers" and report["workers"] == 2
    blaster, sync = report["sandblaster"], report["sync"]
    for name in ("dynamic_slow", "static_slow", "dynamic", "static"):
        assert blaster[name]["seconds_per_iteration"] > 0
        assert blaster[name]["iterations_timed"] >= 1
    assert blaster["static_slow"]["portions"] == 2 and not blaster["static_slow"]["backups"]
    assert blaster["dynamic_slow"]["portions"] == 16 and blaster["dynamic_slow"]["backups"]
    assert blaster["dynamic_slow"]["slow_worker"] == "1:4" and blaster["dynamic"]["slow_worker"] is None
    assert blaster["speedup_dynamic_vs_static_with_slow_worker"] == (
        blaster["static_slow"]["seconds_per_iteration"]
        / blaster["dynamic_slow"]["seconds_per_iteration"])
    for name in ("fraction_0.75_slow", "fraction_1_slow", "fraction_0.75", "fraction_1"):
        assert sync[name]["seconds_per_step"] > 0
    assert sync["fraction_1_slow"]["late_gradients_dropped"] == 0
    assert isinstance(blaster["met"], bool) and isinstance(sync["met"], bool)
    assert blaster["target"] == sync["target"] == 2.0


def test_model_parallel_quick_reports_both_partitionings() -> None:
    report = run_quick("model_parallel", "--quick", timeout=300)

    assert report["benchmark"] == "model_parallel" and report["quick"]
    assert report["settings"]["threads"] == 1 and report["settings"]["micro_batches"] == [2]
    assert [(r["partitions"], r["micro_batches"]) for r in report["runs"]] == [(1, None), (2, 2)]
    assert report["k1"]["samples_per_second"] > 0
    assert report["k2"]["samples_per_second"] > 0
    # the automatic balance comes from the layers' measured times: [9, 1] on an idle machine
    # (the 8192-way output layer alone), another cut under load; any cut between the hidden
    # layers passes one 2560-wide activation
    balance = report["k2"]["balance"]
    assert len(balance) == 2 and min(balance) >= 1 and sum(balance) == 10, balance
    assert report["speedup"] > 0
    assert report["speedup"] == report["k2"]["samples_per_second"] / report["k1"]["samples_per_second"]
    assert report["target"] == 1.6 and isinstance(report["target_met"], bool)

    boundary = report["boundary"]
    assert boundary["cut_activation_bytes_per_sample"] == 2560 * 4
    assert boundary["whole_model_activation_bytes_per_sample"] == (440 + 8 * 2560 + 8192) * 4
    # only the cut's activation and its gradient travel, far less than all the activations
    assert 0 < boundary["bytes_per_sample"] < boundary["whole_model_activation_bytes_per_sample"] / 4
    assert boundary["bytes_per_sample"] == boundary["expected_bytes_per_sample"] == 2 * 2560 * 4
    for stage in report["compute"]["stages"].values():
        assert stage["predicted_speedup"] > 0


def test_soak_quick_finishes_without_lost_updates() -> None:
    report = run_quick("soak", "--quick", timeout=300)
    assert report["benchmark"] == "soak" and report["finished"] and not report["hung"]
    assert report["total_steps"] == report["expected_steps"] == 4 * 300
    # every push the replicas saw acknowledged was applied by a shard, and no other
    assert report["pushes_applied_by_shards"] == report["pushes_acknowledged_to_replicas"] > 0
    assert report["lost_updates"] == 0 and report["no_lost_update"]
    # memory was sampled for every role: coordinator, 2 shards, 4 replicas
    assert {"coordinator", "shard0", "shard1", "replica0", "replica3"} <= set(report["rss"])
    assert all(r["warm_mb"] > 0 and r["end_mb"] > 0 for r in report["rss"].values())


def test_hogwild_quick_compares_one_and_two_workers() -> None:
    report = run_quick("hogwild", "--quick", timeout=300)
    assert report["benchmark"] == "hogwild" and report["quick"] and report["repeats"] == 1
    assert report["settings"]["threads"] == 1
    # chance is 0.1 on mnist1d; four epochs reached 0.50 (W = 1) and 0.44 to 0.47 (W = 2)
    floor = 3 * chance(report["settings"]["dataset"])
    for w in (1, 2):
        run, = report[f"w{w}"]["runs"]
        assert run["workers"] == w and run["threads_per_worker"] == 1
        assert run["samples_per_second"] > 0 and floor < run["test_accuracy"] <= 1, run
        assert run["samples_per_cpu_second"] > 0
        assert run["updates"] == w * run["steps_per_worker"]
    # the same samples for both: W = 2 takes half the steps per worker
    assert report["same_samples"]
    assert report["w1"]["runs"][0]["steps_per_worker"] == 2 * report["w2"]["runs"][0]["steps_per_worker"]
    assert report["ratio"] == report["w2"]["samples_per_second"] / report["w1"]["samples_per_second"]
    assert report["cpu_efficiency_w2_vs_w1"] > 0
    points = 100 * (report["w2"]["test_accuracy"] - report["w1"]["test_accuracy"])
    assert abs(report["accuracy_points_w2_minus_w1"] - points) < 1e-9
    assert report["target"] == {"ratio": 1.6, "accuracy_points": 1.0}
    assert isinstance(report["met"]["ratio"], bool) and isinstance(report["met"]["accuracy"], bool)
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_before"]) == 3


def test_data_serving_quick_reports_both_peers() -> None:
    report = run_quick("data_serving", "--quick", timeout=300)
    assert report["benchmark"] == "data_serving" and report["quick"]
    calibration = report["calibration"]
    assert calibration["gradient_seconds"] > 0 and calibration["warp_smooth"] >= 1
    for peer in ("served", "inline"):
        [run] = report[peer]["runs"]
        # --quick: 2 steps, a report after each; the first (start-up included) is not timed
        assert run["samples_per_second"] > 0 and run["steps_timed"] == 1
        assert report[peer]["median_samples_per_second"] == run["samples_per_second"]
    assert report["ratio_served_to_inline"] == (report["served"]["median_samples_per_second"]
                                                / report["inline"]["median_samples_per_second"])
    assert report["target"] == {"ratio": 1.5, "cores": 2} and isinstance(report["met"], bool)
    assert len(report["machine"]["load_before"]) == 3


def test_vs_ddp_quick_reports_plain_ddp_and_downpour() -> None:
    report = run_quick("vs_ddp", "--quick", timeout=180)
    assert report["benchmark"] == "vs_ddp" and report["quick"] and report["repeats"] == 1
    assert report["settings"]["threads_per_process"] == 1
    assert list(report["peers"]) == ["plain", "ddp", "downpour_f1"]
    assert report["evaluation"]["test_samples"] == 800
    assert report["evaluation"]["every_samples"] == 2 * 64 * report["settings"]["eval_every"]
    assert [r["peer"] for r in report["runs"]] == ["plain", "ddp", "downpour_f1"]
    # chance is 0.1 on mnist1d; two epochs reached 0.59 (plain), 0.30 (ddp: half the
    # steps, of twice the batch) and 0.42 to 0.44 (downpour_f1)
    floor = 2 * chance(report["settings"]["dataset"])
    for run in report["runs"]:
        assert "error" not in run, run
        assert 0 < run["training_began_seconds"] < run["startup_seconds"] < run["wall_seconds"]
        assert 0 < run["steady_samples_per_second"] < math.inf
        assert run["samples"] == 2 * 3200  # 2 epochs of the 3,200 training samples, all peers
        assert floor < run["final_test_accuracy"] <= 1 and run["test_samples"] == 800, run
        assert len(run["evals"]) >= 2  # on the way and at the end
        hit = run["time_to_target_seconds"]  # null when 0.95 was not reached, never made up
        assert hit is None or run["training_began_seconds"] < hit < run["wall_seconds"]
        assert (hit is None) == (run["time_to_target_training_seconds"] is None)
    for name, peer in report["peers"].items():
        assert peer["errors"] == 0 and 0 < peer["steady_samples_per_second"] < math.inf
        assert peer["samples_per_second_vs_ddp"] == (peer["steady_samples_per_second"]
                                                     / report["peers"]["ddp"]["steady_samples_per_second"])
    assert report["peers"]["ddp"]["samples_per_second_vs_ddp"] == 1.0
    assert report["runs"][2]["command"][:2] == ["train", "--algorithm"]
    assert 0 < report["runs"][2]["eval_cpu_share_estimate"] < 1
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_before"]) == 3


def test_admm_quick_reports_time_to_accuracy_and_dual_layers_throughput() -> None:
    report = run_quick("admm", "--quick", timeout=300)

    assert report["benchmark"] == "admm" and report["quick"]
    assert set(report["time_to_accuracy"]) == {"admm_r2_fixed"}
    run = report["time_to_accuracy"]["admm_r2_fixed"]["runs"][0]
    assert run["final_accuracy"] > chance("mnist1d")
    assert run["seconds"] is None or 0 < run["seconds"] <= run["wall_seconds"]
    dual = report["dual_layers"]
    for name in ("admm", "pipeline"):
        assert dual[name]["samples_per_second"] > 0 and dual[name]["boundary_bytes"] > 0
        assert dual[name]["test_accuracy"] > chance("mnist1d")
    assert dual["samples_per_second_ratio"] == (dual["admm"]["samples_per_second"]
                                                / dual["pipeline"]["samples_per_second"])


def test_paper_quick_reports_and_plots_one_algorithm(tmp_path) -> None:
    out = tmp_path / "paper.png"
    report = run_quick("paper", "--quick", "--only", "easgd", "--plot", str(out), timeout=300)

    assert report["benchmark"] == "paper" and report["quick"] and report["seeds"] == 1
    easgd = report["algorithms"]["easgd"]
    assert easgd["lr"] in [r["lr"] for r in easgd["sweep"]] and len(easgd["runs"]) == 1
    assert set(easgd["seconds_to"]) == {"0.80", "0.90", "0.95"}
    assert easgd["samples_per_second"] > 0 and easgd["bytes_per_sample"] > 0
    assert 0 <= easgd["final_accuracy"] <= 1
    assert set(report["order_to_0.90"]) | set(report["not_reached"]) == {"easgd"}
    assert out.stat().st_size > 10_000  # the curves


def test_gpu_without_cuda_says_skipped_and_exits_0() -> None:
    """benchmarks/gpu.py on a machine without CUDA (made so with CUDA_VISIBLE_DEVICES="")."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"benchmark": "gpu", "skipped": "no CUDA device"}


def test_planner_quick_reports_regret_and_rank_correlation() -> None:
    report = run_quick("planner", "--quick", timeout=240)

    assert report["benchmark"] == "planner" and report["quick"]
    [scenario] = report["scenarios"]
    rows = scenario["candidates"]
    assert len(rows) == 2 and rows[0]["chosen"] and rows[0]["tried_by_planner"]
    assert all(r["status"] == "ok" and r["measured_samples_per_second"] > 0 for r in rows)
    drops = [r["loss_drop_per_second"] for r in rows]
    best = max(drops)
    assert scenario["regret"] == drops[0] / best  # the choice's over the best measured
    assert scenario["rank_correlation"] is None  # Spearman needs three points
    assert report["summary"]["regret"] == {scenario["scenario"]: scenario["regret"]}
