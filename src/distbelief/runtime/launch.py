"""Starting roles: a local cluster of processes, or one role per host from the environment.

Local mode (the default): `LocalCluster` starts every role as a process forked
from the coordinator's zygote (`runtime.zygote`: an interpreter that has
imported torch once, so a role starts in milliseconds, not seconds), logs each
to ``RUN_DIR/logs/<role><id>.log``, and on exit — normal or not — terminates
and reaps every child it started (by PID, SIGTERM then SIGKILL).

Many hosts: every host runs the same ``distbelief train ...`` command with the
standard variables set by torchrun, SLURM or by hand (`EnvRole.detect`). Rank 0
is the coordinator and hosts the store at MASTER_ADDR:MASTER_PORT (unless
torchrun's agent already hosts one there), ranks 1..S are the shards and ranks
S+1.. the replicas (K consecutive ranks per replica with --partitions K);
WORLD_SIZE must be 1 + S + R*K. Every host needs the same secret job token
(`job_token`: ``--token-file`` or DISTBELIEF_TOKEN): the store listens on every
interface, and every value the job reads from it must carry a tag made with the
token (`runtime.sealed`), so a process without it can neither read the token nor
steer the job. There is no fallback: a multi-host job without one is refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from typing import TYPE_CHECKING

from distbelief.errors import UserError
from distbelief.runtime.zygote import ForkedProcess, zygote

if TYPE_CHECKING:
    from distbelief.runtime.store import JobStore


QUICK_RESOLVER = "timeout:1 attempts:1"
"""glibc resolver options for the processes of a local job (unless RES_OPTIONS is set).

Every c10d store connection looks up the name of the address it connects to
(``getnameinfo``, for a log line), and for loopback reached over IPv6
(``::ffff:127.0.0.1``) that goes to DNS. Where the DNS server is slow or
unreachable — an offline cluster, a sandbox — each lookup that goes unanswered
costs 5 s x 2 attempts by default; with these options at most 1 s."""


@dataclass
class Child:
    role: str
    ident: int
    process: ForkedProcess
    log_path: Path
    part: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalCluster:
    """Spawns role processes; always reaps them. Not thread-safe (coordinator thread only).

    Example::

        with LocalCluster(run_dir / "logs", env) as cluster:
            cluster.spawn("shard", 0)
            ...
    """

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = Path(log_dir)
        self.env = env
        self.children: list[Child] = []
        self.retired: list[Child] = []  # replaced children, reaped

    def __enter__(self) -> LocalCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def spawn(self, role: str, ident: int, extra_env: dict[str, str] | None = None,
              part: int | None = None) -> Child:
        """Start one role process (`part`: its partition of a model-parallel replica)."""
        # children see the coordinator's import path (the zygote sets it), so a model or data
        # factory importable here is importable in every role
        env = {"RES_OPTIONS": QUICK_RESOLVER, **os.environ, **self.env,
               "DISTBELIEF_ROLE": role, "DISTBELIEF_ID": str(ident),
               **({"DISTBELIEF_PART": str(part)} if part is not None else {}),
               **(extra_env or {})}
        log_path = self.log_dir / (f"{role}{ident}.log" if part is None
                                   else f"{role}{ident}.part{part}.log")
        process = zygote().spawn(env, log_path)  # forked from a warm interpreter
        child = Child(role, ident, process, log_path, part)
        self.children.append(child)
        return child

    def retire(self, role: str, ident: int) -> list[Child]:
        """Kill (SIGKILL) and reap every child of (role, ident), and forget them for good:
        a replacement is about to take their place. Returns them."""
        gone = [c for c in self.children if c.role == role and c.ident == ident]
        for child in gone:
            if child.process.poll() is None:
                _signal(child.process, signal.SIGKILL)
            child.process.wait(10)
        self.children = [c for c in self.children if c not in gone]
        self.retired.extend(gone)
        return gone

    def exited(self) -> list[Child]:
        """Children that have exited (returncode set), in spawn order."""
        return [c for c in self.children if c.process.poll() is not None]

    def wait_exit(self, role: str, timeout: float) -> bool:
        """Wait up to `timeout` for every child of `role` to exit; True when they all did."""
        deadline = time.monotonic() + timeout
        for child in (c for c in self.children if c.role == role):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                return False
        return True

    def shutdown(self, grace: float = 5.0) -> None:
        """Terminate (then kill) every child still running, and reap them all."""
        alive = [c for c in self.children + self.retired if c.process.poll() is None]
        for child in alive:
            _signal(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child.process, signal.SIGKILL)
                child.process.wait(5)


def _signal(process: ForkedProcess, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a child's log, for error messages."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


TOKEN_ENV = "DISTBELIEF_TOKEN"
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_hex(16))'"
"""A command that prints a fresh random 128-bit token (hex), for the messages and the README."""


def job_token(token_file: str | None) -> str:
    """The secret token of a multi-host job: the token file's (read on this host), else
    DISTBELIEF_TOKEN. UserError, one line, when there is neither or the one given is bad.

    Nothing is ever derived from the launcher's variables: torchrun's run id, the master
    port and SLURM's job id are all guessable, and the store listens on every interface.
    The token is never printed.

    Example::

        token = job_token(cfg.cluster.token_file)   # the same string on every host
    """
    if token_file is not None:
        return read_token_file(token_file)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(
            "this process is one rank of a multi-host job (RANK/WORLD_SIZE set) but has no "
            f"secret job token: make one with {MAKE_TOKEN} and set it as {TOKEN_ENV} on every "
            "host (the same value), or write it to a file readable on every host and give "
            "--token-file PATH")
    _check_characters(token, TOKEN_ENV)
    return token


def read_token_file(path: str) -> str:
    """The token in file `path`, surrounding whitespace stripped. UserError, one line, when
    the file is missing, unreadable, empty, shorter than MIN_TOKEN_CHARS or holds characters
    a token cannot (whitespace, '/', control characters)."""
    where = f"--token-file {path!r}"
    fix = f"write a secret into it, e.g. {MAKE_TOKEN} > {path}, readable on every host"
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"{where} does not exist on this host: give a file readable on every "
                        f"host of the job, e.g. made with {MAKE_TOKEN} > {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(f"{where} cannot be read on this host ({why}): give a text file "
                        f"holding the job's secret; {fix}") from None
    if not token:
        raise UserError(f"{where} is empty: {fix}")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"{where} holds a token of {len(token)} characters, fewer than "
                        f"{MIN_TOKEN_CHARS}: too easy to guess; {fix}")
    _check_characters(token, where)
    return token


def _check_characters(token: str, where: str) -> None:
    # a token with whitespace, '/' or control characters is a copy-and-paste accident
    if not token.isprintable() or any(c.isspace() or c == "/" for c in token):
        raise UserError(f"{where}: the token holds whitespace, '/' or control characters: "
                        f"use letters and digits, e.g. the output of {MAKE_TOKEN}")


@dataclass(frozen=True)
class EnvRole:
    """This process's role when started one-per-host by torchrun, SLURM or by hand.

    `token_file`: the job's ``--token-file`` (None: DISTBELIEF_TOKEN); `token` reads it
    when first asked (`job_token`), so that a job refused for other reasons says those.
    """

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    agent_store: bool
    token_file: str | None = None

    @classmethod
    def detect(cls, token_file: str | None = None) -> EnvRole | None:
        """The role from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (or SLURM_*), or None."""
        env = os.environ
        rank = env.get("RANK", env.get("SLURM_PROCID"))
        world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS"))
        addr = env.get("MASTER_ADDR")
        port = env.get("MASTER_PORT")
        if rank is None or world is None or addr is None or port is None:
            return None
        try:
            return cls(int(rank), int(world), addr, int(port),
                       env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                       token_file)
        except ValueError:
            raise UserError(f"RANK={rank}, WORLD_SIZE={world}, MASTER_PORT={port} must be "
                            "integers: check the launcher's environment") from None

    @cached_property
    def token(self) -> str:
        """The job's secret token (`job_token`), read once; UserError when there is none."""
        return job_token(self.token_file)

    def role(self, shards: int, replicas: int,
             partitions: int = 1) -> tuple[str, int, int | None]:
        """(role, id, partition) for this rank: 0 coordinator, then shards, then replicas
        (replica r's partitions k = 0..K-1 one after another; partition None when K = 1)."""
        expected = 1 + shards + replicas * partitions
        if self.world_size != expected:
            per = f" x {partitions} partitions" if partitions > 1 else ""
            raise UserError(
                f"WORLD_SIZE={self.world_size} but the job needs 1 coordinator + {shards} shards "
                f"+ {replicas} replicas{per} = {expected} processes: start {expected} processes "
                "or change --shards/--replicas/--partitions")
        if self.rank == 0:
            return "coordinator", 0, None
        if self.rank <= shards:
            return "shard", self.rank - 1, None
        r, k = divmod(self.rank - 1 - shards, partitions)
        return "replica", r, (k if partitions > 1 else None)


def role_env(store: JobStore, cfg) -> dict[str, str]:
    """The environment a locally spawned role process needs to join this job's store."""
    return {**loopback_env(cfg.cluster.host), "DISTBELIEF_STORE": f"{cfg.cluster.host}:{store.port}",
            "DISTBELIEF_TOKEN": store.token, "DISTBELIEF_TIMEOUT": str(cfg.cluster.timeout),
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}


def loopback_env(host: str) -> dict[str, str]:
    """Keep gloo's channels on the loopback interface when the job is local to this host."""
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        return {"GLOO_SOCKET_IFNAME": "lo"}
    return {}
