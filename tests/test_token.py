"""The job token of a multi-host job: a secret the user gives, never derived.

The store of a multi-host job listens on every interface; its keys live under
the token. A job without one is refused in one line; a stranger that writes
into the store without the token (with the old guessable one, or with no
prefix at all) changes nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from _cluster import free_port, rank_processes
from distbelief.api import train
from distbelief.errors import UserError
from distbelief.runtime.launch import EnvRole, job_token, read_token_file
from distbelief.runtime.store import JobStore
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


# ---- a stranger on the store -------------------------------------------------------------

# (key, value) a stranger writes: each one, read by the job, would stop it, fail it or end
# it early (a stop signal, a NaN flag, events that are not JSON where the coordinator reads
# next, fake members, heartbeats and reports); None: add 1000 to a counter
STRANGER_KEYS = [
    ("job/stop", "true"), ("job/nonfinite", '{"shard": 0, "client": "stranger"}'),
    ("events/count", None), *((f"events/{i}", "not json") for i in range(16)),
    ("members/replica/0", '{"id": 0, "pid": 1, "host": "stranger"}'),
    ("members/shard/0", "not json"), ("shard0/up", "not json"),
    ("heartbeat/replica/0", "0"), ("beat/replica/0", None), ("beat/shard/0", None),
    ("done/replica0", '{"steps": 1}'), ("done/replica1", '{"steps": 1}'),
]


def _write_as_stranger(stores: list[dist.Store]) -> None:
    for store in stores:
        for key, value in STRANGER_KEYS:
            if value is None:
                store.add(key, 1000)
            else:
                store.set(key, value)


def test_a_stranger_without_the_token_changes_nothing(tmp_path):
    """One multi-host job with --token-file (DISTBELIEF_TOKEN set too: the file wins); a
    stranger writes the job's keys, again and again while it runs, under the token it would
    have had before (env-none-<port>: torchrun without --rdzv-id), under the environment's
    token and with no prefix at all. The job finishes as if no one had."""
    (tmp_path / "token").write_text(SECRET + "\n")
    run_dir, port = tmp_path / "run", free_port()
    args = [*ARGS, "--token-file", str(tmp_path / "token"), "--run-dir", str(run_dir)]
    with rank_processes(args, WORLD, tmp_path, token="the-environment-token",
                        port=port) as procs:
        # the namespaces a job with those tokens would use, and the store's bare keys
        strangers = [JobStore.connect("127.0.0.1", port, token, timeout=60).raw
                     for token in (f"env-none-{port}", "the-environment-token")]
        strangers.append(dist.TCPStore("127.0.0.1", port, None, False,
                                       timeout=datetime.timedelta(seconds=60)))
        # the test, knowing the secret, checks that this is the job's own store
        insider = JobStore.connect("127.0.0.1", port, SECRET, timeout=60)
        deadline, passes, seen_job = time.monotonic() + 240, 0, False
        while procs[0].poll() is None and time.monotonic() < deadline:
            try:
                _write_as_stranger(strangers)
                seen_job = seen_job or insider.has("job")
            except RuntimeError:  # the job ended and its store went with it
                break
            passes += 1
            time.sleep(0.25)
        outputs = [p.communicate(timeout=240) for p in procs]
        assert [p.returncode for p in procs] == [0] * WORLD, [o[1][-500:] for o in outputs]
    assert seen_job and passes >= 2, (seen_job, passes)
    roles = json.loads((run_dir / "cluster.json").read_text())["roles"]
    assert len(roles) == WORLD and all(r.get("host") != "stranger" for r in roles)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == 300 and summary["replicas_lost"] == 0
    assert summary["nonfinite_skipped"] == 0 and summary["test_accuracy"] >= 0.9
