"""The job token of a multi-host job: a secret the user gives, never derived.

The store of a multi-host job listens on every interface, so a job without one is
refused in one line. What a stranger without the token can do to a job is tested in
test_stranger.py (it also writes the job's names as guessed, bare and under the old
guessable tokens' namespaces).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _cluster import free_port
from distbelief.api import train
from distbelief.errors import UserError
from distbelief.runtime.launch import EnvRole, job_token, read_token_file
from test_cli_errors import assert_user_error

SECRET = "4f1c0a9e7b2d8c3f6a5e0d1b9c8a7f6e"
ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--replicas", "2", "--shards", "1",
        "--steps", "150", "--quiet"]
WORLD = 4  # coordinator + 1 shard + 2 replicas


def rank_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DISTBELIEF_TOKEN"}
    return {**env, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra}


# ---- refusal, as the user meets it -------------------------------------------------------

@pytest.mark.parametrize("token_file, mentions", [
    (None, ["no secret job token", "DISTBELIEF_TOKEN", "secrets.token_hex(16)",
            "--token-file PATH"]),
    ("empty", ["--token-file", "is empty", "secrets.token_hex(16)"]),
    ("missing", ["--token-file", "does not exist on this host", "secrets.token_hex(16)"]),
], ids=["no-token", "empty-file", "missing-file"])
def test_a_multi_host_job_without_a_token_is_refused_in_one_line(tmp_path, token_file,
                                                                 mentions):
    (tmp_path / "empty").write_text("\n")
    extra = [] if token_file is None else ["--token-file", str(tmp_path / token_file)]
    result = subprocess.run([sys.executable, "-m", "distbelief.cli", *ARGS, *extra],
                            cwd=tmp_path, env=rank_env(0, free_port()), capture_output=True,
                            text=True, timeout=120)
    assert_user_error(result, *mentions)
    assert not (tmp_path / "runs").exists()


# ---- where the token comes from ------------------------------------------------------

def test_the_token_file_wins_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(f"  {SECRET}\n")
    monkeypatch.setenv("DISTBELIEF_TOKEN", "from-the-environment")
    assert job_token(str(path)) == SECRET  # whitespace around it is not part of it
    assert job_token(None) == "from-the-environment"
    monkeypatch.setenv("DISTBELIEF_TOKEN", "  ")
    with pytest.raises(UserError, match="no secret job token"):
        job_token(None)


@pytest.mark.parametrize("content, message", [
    ("short-secret", r"12 characters, fewer than 16"),
    ("with/a/slash/in/the/token", r"whitespace, '/' or control characters"),
    ("two words of a long enough token", r"whitespace, '/' or control characters"),
])
def test_a_bad_token_file_is_refused(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        read_token_file(str(path))
    assert "\n" not in str(info.value) and content not in str(info.value)


def test_an_unreadable_token_file_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"cannot be read on this host \(Is a directory\)"):
        read_token_file(str(tmp_path))


def test_the_token_is_asked_for_only_once_the_role_is_known(monkeypatch):
    """`detect` does not read the token: a job refused for another reason says that one."""
    for key, value in {"RANK": "1", "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DISTBELIEF_TOKEN", raising=False)
    env = EnvRole.detect()
    assert env is not None and env.role(1, 2) == ("shard", 0, None)
    with pytest.raises(UserError, match="no secret job token"):
        env.token
    monkeypatch.setenv("DISTBELIEF_TOKEN", SECRET)
    assert EnvRole.detect().token == SECRET


def test_a_local_job_checks_its_token_file(tmp_path):
    with pytest.raises(UserError, match="does not exist on this host"):
        train(dataset="digits", model="mlp", steps=1, token_file=str(tmp_path / "missing"),
              run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
