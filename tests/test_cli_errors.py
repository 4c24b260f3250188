"""The `distbelief` command's user errors.

Every user error must print exactly one line ``distbelief: error: ...`` on
stderr that names the offending thing, exit with code 2, show no traceback,
and return promptly: these errors happen before any role process is spawned.
The table of cases runs the command's `main` in this process (each case costs
milliseconds, not a Python start-up); a few of them, and the other tests, run
it as the user does, a subprocess of ``python -m distbelief.cli``.
"""

import os
import re
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from distbelief import cli
from distbelief.cli import TRAIN_OPTIONS
from distbelief.job import default_of

TIMEOUT = 120
TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--quiet"]


def run_cli(cwd, *args):
    """Run ``python -m distbelief.cli ARGS`` in `cwd`; the command must return within TIMEOUT."""
    env = dict(os.environ, DISTBELIEF_CACHE=str(cwd / "cache"), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "distbelief.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Run the command's `main` in this process, as `run_cli` runs it in a subprocess (its
    SIGTERM handler and environment put back afterwards)."""
    handler = signal.getsignal(signal.SIGTERM)

    def run(cwd, *args):
        monkeypatch.chdir(cwd)
        for name, value in (("DISTBELIEF_CACHE", str(cwd / "cache")), ("COLUMNS", "200"),
                            ("RES_OPTIONS", os.environ.get("RES_OPTIONS", "")),
                            ("TORCH_CPP_LOG_LEVEL", os.environ.get("TORCH_CPP_LOG_LEVEL", ""))):
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            code = cli.main([str(a) for a in args])
        except BaseException as exc:  # a traceback on the command line
            code, extra = 1, f"Traceback (in process): {exc!r}"
        else:
            extra = ""
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out + extra, stderr=out.err)

    yield run
    signal.signal(signal.SIGTERM, handler)


def assert_user_error(result, *mentions):
    """Exit code 2, one stderr line 'distbelief: error: ...' naming each of `mentions`."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one stderr line, got {result.stderr!r}"
    line = lines[0]
    assert line.startswith("distbelief: error: "), line
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    return line


@pytest.fixture
def workdir(tmp_path):
    """A working directory holding the broken inputs the cases refer to."""
    (tmp_path / "malformed.toml").write_text("[cluster\nreplicas = 2\n")
    (tmp_path / "unknown_key.toml").write_text("[cluster]\nreplicaz = 2\n")
    (tmp_path / "unknown_section.toml").write_text("[clutser]\nreplicas = 2\n")
    (tmp_path / "wrong_type.toml").write_text('[cluster]\nreplicas = "two"\n')
    (tmp_path / "garbage.npz").write_bytes(b"\x00\x01 this is not an npz archive \xff" * 10)
    np.savez(tmp_path / "no_y.npz", x=np.zeros((20, 4), dtype=np.float32))
    (tmp_path / "bad_model.py").write_text(
        "import torch\n\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))\n")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    return tmp_path


# (id, arguments after `train --dataset digits --model mlp --quiet`, strings the line must name)
CASES = [
    ("unknown-rule", ["--rule", "foo"], ["--rule", "'foo'", "adagrad"]),
    ("unknown-algorithm", ["--algorithm", "bar"], ["--algorithm", "'bar'", "downpour"]),
    ("unknown-option", ["--bogus", "1"], ["--bogus", "distbelief train --help"]),
    ("not-an-integer", ["--replicas", "two"], ["--replicas", "'two'"]),
    ("malformed-toml", ["malformed.toml"], ["malformed.toml", "not valid TOML"]),
    ("toml-unknown-key", ["unknown_key.toml"], ["unknown_key.toml", "[cluster]", "'replicaz'",
                                                 "replicas"]),
    ("toml-unknown-section", ["unknown_section.toml"], ["'clutser'", "cluster"]),
    ("toml-wrong-type", ["wrong_type.toml"], ["wrong_type.toml", "replicas", "integer",
                                              "'two'"]),
    ("missing-config", ["missing.toml"], ["missing.toml", "not found"]),
    ("zero-replicas", ["--replicas", "0"], ["--replicas", "got 0"]),
    ("zero-shards", ["--shards", "0"], ["--shards", "got 0"]),
    ("zero-steps", ["--steps", "0"], ["--steps", "got 0"]),
    ("steps-and-epochs", ["--steps", "5", "--epochs", "1"], ["--steps", "--epochs"]),
    ("nan-timeout", ["--timeout", "nan"], ["--timeout", "nan"]),
    ("missing-npz", ["--dataset", "missing.npz"], ["missing.npz", "does not exist"]),
    ("garbage-npz", ["--dataset", "garbage.npz"], ["garbage.npz", "not an .npz archive"]),
    ("npz-without-y", ["--dataset", "no_y.npz"], ["no_y.npz", "'y'"]),
    ("model-width", ["--model", "bad_model.py:make"], ["width 7", "10 classes"]),
    ("run-dir-holds-a-run", ["--run-dir", "used"], ["'used'", "already holds a run",
                                                    "--run-dir"]),
    ("sync-fraction-zero", ["--algorithm", "sync", "--sync-fraction", "0"],
     ["--sync-fraction", "got 0.0", "(0, 1]"]),
    ("sync-fraction-above-one", ["--algorithm", "sync", "--sync-fraction", "1.5"],
     ["--sync-fraction", "got 1.5"]),
    ("sync-fraction-for-downpour", ["--sync-fraction", "0.75"],
     ["--sync-fraction", "means nothing for --algorithm downpour"]),
    ("portions-below-workers", ["--algorithm", "sandblaster", "--replicas", "3", "--portions", "2"],
     ["--portions 2", "3 workers"]),
    ("lbfgs-with-a-rule", ["--algorithm", "sandblaster", "--rule", "adagrad"],
     ["--rule 'adagrad'", "means nothing for --algorithm sandblaster"]),
    ("lbfgs-with-epochs", ["--algorithm", "sandblaster", "--epochs", "2"],
     ["--epochs", "--steps"]),
    ("unknown-line-search", ["--algorithm", "sandblaster", "--line-search", "armijo"],
     ["--line-search", "'armijo'"]),
    ("slow-worker-malformed", ["--slow-worker", "fast"], ["--slow-worker 'fast'", "ID:FACTOR"]),
    ("slow-worker-unknown-replica", ["--slow-worker", "7:4"], ["replica 7", "0..1"]),
    ("balance-wrong-sum", ["--partitions", "2", "--balance", "2,2"],
     ["--balance 2,2", "sums to 4", "6 layers"]),
    ("balance-malformed", ["--partitions", "2", "--balance", "three,two"],
     ["--balance", "'three,two'", "3,2"]),
    ("balance-without-partitions", ["--balance", "3,3"], ["--balance 3,3", "--partitions"]),
    ("more-partitions-than-layers", ["--partitions", "7", "--shards", "7"],
     ["--partitions 7", "6 layers"]),
    ("model-cannot-split-by-units", ["--model", "cnn", "--partitions", "2", "--split", "units"],
     ["Conv2d", "cannot be split by units", "--split layers"]),
    ("partitions-with-sync", ["--algorithm", "sync", "--partitions", "2"],
     ["--partitions 2", "downpour"]),
    ("fewer-shards-than-partitions", ["--partitions", "3", "--shards", "2"],
     ["--shards 2", "--partitions 3"]),
    ("micro-batches-without-pipeline", ["--micro-batches", "4"],
     ["--micro-batches 4", "--split layers"]),
    ("micro-batches-above-batch", ["--partitions", "2", "--micro-batches", "80",
                                   "--batch-size", "64"], ["--micro-batches 80", "--batch-size 64"]),
    ("chunk-bytes-not-float32", ["--shard-layout", "chunks", "--chunk-bytes", "1022"],
     ["--chunk-bytes", "multiple of 4", "got 1022"]),
    ("chunks-fewer-than-shards", ["--shard-layout", "chunks", "--shards", "3"],
     ["--chunk-bytes 1048576", "1 chunks", "3 shards", "--chunk-bytes 34828 or less"]),
]


@pytest.mark.parametrize("args, mentions", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_user_error_is_one_line(workdir, run_main, args, mentions):
    assert_user_error(run_main(workdir, *TRAIN, *args), *mentions)


SUBPROCESS_CASES = ("unknown-option", "malformed-toml", "model-width", "partitions-with-sync")


@pytest.mark.parametrize("args, mentions", [c[1:] for c in CASES if c[0] in SUBPROCESS_CASES],
                         ids=[c[0] for c in CASES if c[0] in SUBPROCESS_CASES])
def test_train_user_error_is_one_line_from_the_command(workdir, args, mentions):
    """The same through ``python -m distbelief.cli``, for a few kinds of case."""
    assert_user_error(run_cli(workdir, *TRAIN, *args), *mentions)


def test_port_in_use_is_a_user_error(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli(tmp_path, *TRAIN, "--steps", "2", "--port", port)
    finally:
        sock.close()
    assert_user_error(result, f"port {port}", "already in use", "--port")


@pytest.mark.parametrize("bad", [["--dataset", "missing.npz"], ["--host", "no-such-host.invalid"]])
def test_user_error_leaves_no_run_directory(tmp_path, bad):
    assert_user_error(run_cli(tmp_path, *TRAIN, *bad))
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").iterdir())


def test_plot_without_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli(tmp_path, "plot", "empty", "-o", "out.png"), "'empty'",
                      "metrics.jsonl")
    assert not (tmp_path / "out.png").exists()


def _option_help(text):
    """{'--name': its help text with whitespace collapsed} from an argparse help page."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z][a-z-]*)", line)
        if match:
            current = match.group(1)
            blocks[current] = line[match.end():]
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {name: " ".join(body.split()) for name, body in blocks.items()}


def test_train_help_shows_every_real_default(tmp_path):
    result = run_cli(tmp_path, "train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    helps = _option_help(result.stdout)
    assert "(default: None)" not in result.stdout
    for name in TRAIN_OPTIONS:
        option = "--" + name.replace("_", "-")
        assert option in helps, f"{option} missing from --help"
        text = helps[option]
        assert text.count("(default:") == 1, f"{option}: {text!r}"
        default = default_of(name)
        if default is not None:
            assert f"(default: {default})" in text, f"{option}: {text!r}"
    assert "(default: 4 when --steps is not given)" in helps["--epochs"]
