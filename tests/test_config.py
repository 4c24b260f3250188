"""Tests for distbelief.config: loading, overrides, types and validation."""

import dataclasses
import math

import pytest

from distbelief.config import DEFAULT_EPOCHS, TrainConfig
from distbelief.cli import build_parser
from distbelief.job import OPTION_FIELDS, TOML_ONLY, JobConfig, apply_options, load_config
from distbelief.errors import UserError

FULL_TOML = """\
algorithm = "downpour"
[cluster]
replicas = 3
shards = 4
port = 0
timeout = 30.0
[downpour]
n_fetch = 2
n_push = 5
warm_start_steps = 7
[optimizer]
rule = "adam"
lr = 0.001
eps = 1e-6
[data]
dataset = "digits"
batch_size = 16
num_samples = 500
[model]
name = "mlp"
[train]
epochs = 2.5
seed = 11
run_dir = "runs/x"
"""


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = JobConfig().validate()
    assert cfg.train.steps is None and cfg.train.epochs is None
    assert cfg.train.resolved_epochs == DEFAULT_EPOCHS


def test_no_file_means_defaults():
    assert load_config(None) == JobConfig()


TOML_ONLY_FIELDS = {"optimizer.beta1", "optimizer.beta2", "optimizer.eps", "augment.shift",
                    "augment.scale", "augment.noise", "augment.flip", "augment.crop",
                    "augment.warp", "augment.warp_smooth", "admm.balance_mu", "admm.balance_tau",
                    "admm.boundary_step"}


def test_options_and_config_fields_match_one_to_one():
    cfg = JobConfig()
    fields = {"algorithm"} | {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
                              if section.name != "algorithm"
                              for f in dataclasses.fields(getattr(cfg, section.name))}
    options = list(OPTION_FIELDS.values())
    assert len(options) == len(set(options)), "two options set one field"
    assert set(TOML_ONLY) == TOML_ONLY_FIELDS
    assert set(options) | TOML_ONLY_FIELDS == fields and not set(options) & TOML_ONLY_FIELDS
    commands = build_parser()._subparsers._group_actions[0].choices
    dests = {a.dest for a in commands["train"]._actions} - {
        "help", "config", "quiet", "resume", "strategy", "trials", "trial_seconds"}
    assert dests == set(OPTION_FIELDS)
    planning = {"help", "config", "quiet", "trials", "trial_seconds", "hosts", "cores_per_host",
                "memory_per_host", "link_bandwidth", "output"}
    assert {a.dest for a in commands["plan"]._actions} - planning == set(OPTION_FIELDS)


def test_toml_file_is_read(tmp_path):
    cfg = load_config(write(tmp_path, FULL_TOML)).validate()
    assert (cfg.cluster.replicas, cfg.cluster.shards, cfg.cluster.timeout) == (3, 4, 30.0)
    assert (cfg.downpour.n_fetch, cfg.downpour.n_push, cfg.downpour.warm_start_steps) == (2, 5, 7)
    assert (cfg.optimizer.rule, cfg.optimizer.lr, cfg.optimizer.eps) == ("adam", 0.001, 1e-6)
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.data.num_samples) == ("digits", 16, 500)
    assert cfg.model.name == "mlp"
    assert (cfg.train.epochs, cfg.train.steps, cfg.train.seed) == (2.5, None, 11)
    assert cfg.train.run_dir == "runs/x"
    assert cfg.optimizer.momentum == 0.9  # not in the file: the default


@pytest.mark.parametrize("cfg", [
    JobConfig(),
    JobConfig.from_dict({"train": {"steps": 9, "seed": 3}, "optimizer": {"eps": 1e-3}}),
], ids=["defaults", "steps-and-eps"])
def test_to_toml_round_trips(tmp_path, cfg):
    assert load_config(write(tmp_path, cfg.to_toml())) == cfg


def test_file_round_trips_through_to_toml(tmp_path):
    cfg = load_config(write(tmp_path, FULL_TOML))
    assert load_config(write(tmp_path, cfg.to_toml(), "again.toml")) == cfg


def test_integer_in_a_float_field_becomes_a_float():
    cfg = JobConfig.from_dict({"optimizer": {"lr": 1}, "train": {"epochs": 2}})
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


def test_options_override_the_file(tmp_path):
    base = load_config(write(tmp_path, FULL_TOML))
    cfg = apply_options(base, {"replicas": 5, "lr": 0.1, "model": "cnn", "shards": None})
    assert (cfg.cluster.replicas, cfg.optimizer.lr, cfg.model.name) == (5, 0.1, "cnn")
    assert cfg.cluster.shards == 4  # None means "not given": the file's value stays
    assert base.cluster.replicas == 3  # the base config is not changed


@pytest.mark.parametrize("file_train, options, steps, epochs", [
    ({"epochs": 2.5}, {"steps": 40}, 40, None),      # --steps replaces the file's epochs
    ({"steps": 40}, {"epochs": 1.5}, None, 1.5),     # --epochs replaces the file's steps
    ({"steps": 40}, {"steps": 7}, 7, None),
    ({"epochs": 2.5}, {"epochs": 0.5}, None, 0.5),
    ({"epochs": 2.5}, {}, None, 2.5),
    ({}, {"steps": None, "epochs": None}, None, None),
])
def test_steps_and_epochs_replace_each_other(file_train, options, steps, epochs):
    cfg = apply_options(JobConfig.from_dict({"train": file_train}), options).validate()
    assert (cfg.train.steps, cfg.train.epochs) == (steps, epochs)


def test_steps_and_epochs_as_options_together_is_an_error():
    with pytest.raises(UserError, match="--steps 5 and --epochs 1.0 were both given"):
        apply_options(JobConfig(), {"steps": 5, "epochs": 1.0})


def test_steps_and_epochs_in_the_file_together_is_an_error(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 5\nepochs = 1.0\n"))
    with pytest.raises(UserError, match="train.steps = 5 and train.epochs = 1.0 are both set"):
        cfg.validate()


@pytest.mark.parametrize("train, resolved", [
    ({}, DEFAULT_EPOCHS),
    ({"epochs": 0.25}, 0.25),
    ({"steps": 10}, None),
])
def test_resolved_epochs(train, resolved):
    assert TrainConfig(**train).resolved_epochs == resolved


@pytest.mark.parametrize("data, message", [
    ({"algorithmm": "downpour"}, r"unknown key 'algorithmm'; valid keys are algorithm, cluster"),
    ({"cluster": {"replicaz": 2}}, r"\[cluster\]: unknown key 'replicaz'; valid keys are replicas"),
    ({"cluster": 2}, r"\[cluster\] must be a table, got 2"),
    ({"cluster": {"replicas": "two"}}, r"\[cluster\] replicas must be an integer, got 'two'"),
    ({"cluster": {"replicas": 2.0}}, r"replicas must be an integer, got 2.0"),
    ({"cluster": {"replicas": True}}, r"replicas must be an integer, got True"),
    ({"optimizer": {"lr": "fast"}}, r"\[optimizer\] lr must be a number, got 'fast'"),
    ({"optimizer": {"lr": False}}, r"lr must be a number, got False"),
    ({"optimizer": {"rule": 3}}, r"\[optimizer\] rule must be a string, got 3"),
    ({"algorithm": 1}, r"algorithm must be a string, got 1"),
    ({"model": {"name": None}}, r"\[model\] name must not be empty"),
])
def test_from_dict_refuses_unknown_keys_and_wrong_types(data, message):
    with pytest.raises(UserError, match=r"^job\.toml: .*" + message):
        JobConfig.from_dict(data, source="job.toml")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"config file '.*nope.toml' not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match=r"'.*bad.toml' is not valid TOML \(.*line 1.*\): fix"):
        load_config(write(tmp_path, "[cluster\n", "bad.toml"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_config(bad)
    with pytest.raises(UserError, match=r"wrong.toml: \[train\] steps must be an integer"):
        load_config(write(tmp_path, '[train]\nsteps = "10"\n', "wrong.toml"))


def test_unknown_option_is_an_error():
    with pytest.raises(UserError, match="unknown option 'replica'"):
        apply_options(JobConfig(), {"replica": 2})


def test_option_of_the_wrong_type_is_an_error():
    with pytest.raises(UserError, match=r"^options: \[cluster\] replicas must be an integer"):
        apply_options(JobConfig(), {"replicas": "2"})


@pytest.mark.parametrize("options, message", [
    ({"algorithm": "hogwash"}, r"--algorithm 'hogwash' is not one of downpour, sync, sandblaster"),
    ({"rule": "rmsprop"}, r"--rule 'rmsprop' is not one of sgd, momentum, adagrad, adam"),
    ({"transport": "rdma"}, r"--transport 'rdma' is not one of auto, shm, gloo"),
    ({"replicas": 0}, r"--replicas must be >= 1, got 0"),
    ({"shards": -1}, r"--shards must be >= 1, got -1"),
    ({"n_fetch": 0}, r"--n-fetch must be >= 1, got 0"),
    ({"n_push": 0}, r"--n-push must be >= 1, got 0"),
    ({"warm_start_steps": -1}, r"--warm-start-steps must be >= 0"),
    ({"batch_size": 0}, r"--batch-size must be >= 1"),
    ({"eval_every": -1}, r"--eval-every must be >= 0"),
    ({"log_every": 0}, r"--log-every must be >= 1"),
    ({"port": 65536}, r"--port must be in 0..65535, got 65536"),
    ({"port": -1}, r"--port must be in 0..65535, got -1"),
    ({"timeout": 0.0}, r"--timeout must be a finite number of seconds > 0, got 0.0"),
    ({"timeout": math.nan}, r"--timeout .* got nan"),
    ({"timeout": math.inf}, r"--timeout .* got inf"),
    ({"lr": 0.0}, r"--lr must be a finite number > 0, got 0.0"),
    ({"lr": math.nan}, r"--lr .* got nan"),
    ({"lr": math.inf}, r"--lr .* got inf"),
    ({"momentum": -0.5}, r"--momentum must be >= 0, got -0.5"),
    ({"weight_decay": -1.0}, r"--weight-decay must be >= 0, got -1.0"),
    ({"steps": 0}, r"--steps must be >= 1, got 0"),
    ({"epochs": 0.0}, r"--epochs must be a finite number > 0, got 0.0"),
    ({"epochs": math.inf}, r"--epochs .* got inf"),
    ({"epochs": math.nan}, r"--epochs .* got nan"),
    ({"steps": 5, "warm_start_steps": 5}, r"--warm-start-steps 5 must be smaller than --steps 5"),
    ({"num_samples": 9}, r"--num-samples must be >= 10, got 9"),
])
def test_validate_names_the_bad_value(options, message):
    cfg = apply_options(JobConfig(), options)
    with pytest.raises(UserError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    assert ": " in str(info.value)  # problem, then the fix


@pytest.mark.parametrize("optimizer, message", [
    ({"beta1": 1.0}, r"optimizer.beta1 must be in \[0, 1\), got 1.0"),
    ({"beta2": -0.1}, r"optimizer.beta2 must be in \[0, 1\), got -0.1"),
    ({"eps": -1e-8}, r"optimizer.eps must be >= 0"),
])
def test_validate_checks_the_file_only_settings(optimizer, message):
    with pytest.raises(UserError, match=message):
        JobConfig.from_dict({"optimizer": optimizer}).validate()


def test_validate_returns_the_config_for_chaining():
    cfg = JobConfig()
    assert cfg.validate() is cfg


@pytest.mark.parametrize("options, message", [
    ({"algorithm": "sync", "sync_fraction": 0.0}, r"--sync-fraction must be in \(0, 1\], got 0.0"),
    ({"algorithm": "sync", "sync_fraction": 1.5}, r"--sync-fraction must be in \(0, 1\], got 1.5"),
    ({"algorithm": "sandblaster", "replicas": 3, "portions": 2},
     r"--portions 2 is smaller than the 3 workers \(--replicas\)"),
    ({"algorithm": "sandblaster", "rule": "adagrad"},
     r"--rule 'adagrad' means nothing for --algorithm sandblaster"),
    ({"algorithm": "sandblaster", "momentum": 0.5}, r"--momentum 0.5 means nothing for --algorithm sandblaster"),
    ({"algorithm": "sandblaster", "epochs": 2.0}, r"--epochs 2.0 means nothing .* give --steps"),
    ({"algorithm": "sandblaster", "batch_size": 32}, r"--batch-size 32 means nothing .* --portions"),
    ({"algorithm": "sandblaster", "line_search": "backtracking"},
     r"--line-search 'backtracking' is not one of strong_wolfe, none"),
    ({"algorithm": "sandblaster", "history": 0}, r"--history must be >= 1, got 0"),
    ({"algorithm": "sandblaster", "push_every": 0}, r"--push-every must be >= 1, got 0"),
    ({"algorithm": "sandblaster", "tolerance_grad": -1.0}, r"--tolerance-grad must be a finite"),
    ({"algorithm": "sync", "n_fetch": 2}, r"--n-fetch 2 means nothing for --algorithm sync"),
    ({"algorithm": "sync", "portions": 8}, r"--portions 8 means nothing for --algorithm sync"),
    ({"sync_fraction": 0.75}, r"--sync-fraction 0.75 means nothing for --algorithm downpour"),
    ({"backups": False}, r"--backups False means nothing for --algorithm downpour"),
    ({"slow_worker": "1"}, r"--slow-worker '1' is not ID:FACTOR"),
    ({"slow_worker": "a:4"}, r"--slow-worker 'a:4' is not ID:FACTOR"),
    ({"slow_worker": "2:4"}, r"--slow-worker '2:4' names replica 2, but there are 2"),
    ({"slow_worker": "1:0.5"}, r"the factor must be a finite number >= 1"),
])
def test_validate_refuses_wrong_combinations(options, message):
    cfg = apply_options(JobConfig(), options)
    with pytest.raises(UserError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


def test_resolved_fills_the_algorithm_defaults():
    downpour = JobConfig().validate().resolved()
    assert (downpour.optimizer.rule, downpour.optimizer.lr) == ("adagrad", 0.02)
    assert downpour.train.steps is None and downpour.sandblaster.portions is None
    blaster = apply_options(JobConfig(), {"algorithm": "sandblaster", "replicas": 3}).validate().resolved()
    assert (blaster.optimizer.rule, blaster.optimizer.lr) == (None, 1.0)
    assert (blaster.sandblaster.portions, blaster.train.steps) == (24, 50)
    given = apply_options(JobConfig(), {"algorithm": "sandblaster", "lr": 0.5, "steps": 7,
                                        "portions": 5}).validate().resolved()
    assert (given.optimizer.lr, given.train.steps, given.sandblaster.portions) == (0.5, 7, 5)
    assert apply_options(JobConfig(), {"slow_worker": "1:4"}).validate().cluster.slowdown == (1, 4.0)


def test_backups_reads_true_and_false_from_toml(tmp_path):
    cfg = load_config(write(tmp_path, 'algorithm = "sandblaster"\n[sandblaster]\nbackups = false\n'))
    assert cfg.sandblaster.backups is False
    with pytest.raises(UserError, match=r"backups must be true or false, got 'no'"):
        load_config(write(tmp_path, '[sandblaster]\nbackups = "no"\n', "b.toml"))
