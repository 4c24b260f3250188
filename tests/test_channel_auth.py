"""Channels and groups over the job's store prove that their members hold the job's
token before any tensor flows (`runtime.channel`'s handshake, `JobSecret.channel_tag`).

A member with another token, or a stranger who got into the gloo pair and answers
the handshake with guesses, makes the honest side raise `Tampered` within the
timeout, before it hands any caller a message; a member that dies in the middle of
the handshake gives `ChannelClosed`, as a dead peer always does. The dying member
is a process of its own, stopped at the fault point ``channel.handshake``.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from distbelief.errors import Tampered
from distbelief.runtime.channel import HANDSHAKE_TAG, NONCE_BYTES, Channel, ChannelClosed, Group
from distbelief.runtime.faults import EXIT_STATUS
from distbelief.runtime.secret import JobSecret
from distbelief.runtime.store import TAMPERED_KEY, JobStore, new_token

TIMEOUT = 10.0
"""Each channel's timeout; every wait in these tests ends within a few of them."""


@pytest.fixture
def job(monkeypatch):
    """(token, the store's host, a factory of further connections to it)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    token = new_token()
    host = JobStore.host("127.0.0.1", 0, token, timeout=TIMEOUT)
    peers: list[JobStore] = []

    def connect() -> JobStore:
        peers.append(JobStore.connect("127.0.0.1", host.port, token, timeout=TIMEOUT))
        return peers[-1]

    try:
        yield token, host, connect
    finally:
        for store in [*peers, host]:
            store.close()


def in_threads(*calls) -> list:
    """Run each call in a thread of its own; what each returned or raised, in order."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # handed back to the test, which checks its type
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True)
               for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a channel's side is still blocked"
    return results


def raise_any(results: list) -> list:
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def test_two_channels_handshake_then_exchange_a_tensor(job, monkeypatch):
    _, host, connect = job
    peer = connect()
    tags = []
    real = JobSecret.channel_tag
    monkeypatch.setattr(JobSecret, "channel_tag",
                        lambda self, *a: tags.append(a[0]) or real(self, *a))

    def sender():
        ch = Channel(host.raw, "pg/auth/ok", 0, TIMEOUT)
        ch.send_header(7, 8)
        ch.send(torch.arange(5.0), 1)
        ch.close()

    def receiver():
        ch = Channel(peer.raw, "pg/auth/ok", 1, TIMEOUT)
        header = ch.recv_header()[:2]
        out = torch.empty(5)
        ch.recv(out, 1)
        ch.close()
        return header, out

    _, (header, out) = raise_any(in_threads(sender, receiver))
    assert header == [7, 8] and torch.equal(out, torch.arange(5.0))
    assert tags == ["pg/auth/ok"] * 4  # each side made its own tag and checked the peer's


def test_a_group_of_three_handshakes_then_sums(job):
    _, host, connect = job
    stores = [host, connect(), connect()]

    def member(r):
        group = Group(stores[r].raw, "pg/auth/three", r, 3, TIMEOUT)
        try:
            buf = torch.full((4,), float(r + 1))
            group.all_reduce_sum(buf)
            return buf
        finally:
            group.close()

    for buf in raise_any(in_threads(*(lambda r=r: member(r) for r in range(3)))):
        assert torch.equal(buf, torch.full((4,), 6.0))


def test_a_peer_with_another_token_is_refused(job):
    _, host, connect = job
    peer, other = connect(), JobSecret(new_token())
    began = time.monotonic()
    honest, wrong = in_threads(lambda: Channel(host.raw, "pg/auth/other", 0, TIMEOUT),
                               lambda: Channel(peer.raw, "pg/auth/other", 1, TIMEOUT,
                                               secret=other))
    assert time.monotonic() - began < TIMEOUT
    assert isinstance(honest, Tampered), honest
    assert str(honest) == ("channel pg/auth/other: a peer without the job's token answered "
                           "its handshake; the channel is shut down")
    assert isinstance(wrong, Tampered), wrong  # and the other side refuses the honest one


def test_a_stranger_in_the_pair_never_gets_a_message_through(job):
    """A stranger who holds a gloo pair to the honest side sends a header at once and
    answers the handshake as best it can (a guessed tag); the honest side raises
    `Tampered` and reports it to the coordinator, and no caller ever reads the header."""
    _, host, connect = job
    host.act_as("replica 0")
    stranger_store = connect().raw.clone()  # here only to get into the pair

    def stranger():
        pg = dist.ProcessGroupGloo(dist.PrefixStore("pg/auth/stranger", stranger_store), 1, 2,
                                   datetime.timedelta(seconds=TIMEOUT))
        header = pg.send([torch.full((6,), 666, dtype=torch.int64)], 0, 0)
        for size in (NONCE_BYTES, 32):  # a nonce, then a tag: random bytes either way
            got = torch.empty(size // 8, dtype=torch.int64)
            pending = pg.recv([got], 0, HANDSHAKE_TAG)
            pg.send([torch.randint(-2**62, 2**62, (size // 8,))], 0, HANDSHAKE_TAG).wait()
            pending.wait()
        header.wait()
        return pg

    def honest():
        channel = Channel(host.raw, "pg/auth/stranger", 0, TIMEOUT)
        return channel.recv_header()  # reached only when the stranger got through

    began = time.monotonic()
    got, pg = in_threads(honest, stranger)
    assert isinstance(got, Tampered), f"the honest side read {got!r} from a stranger"
    assert time.monotonic() - began < TIMEOUT
    assert "pg/auth/stranger" in str(got) and "without the job's token" in str(got)
    report = host.get_json(TAMPERED_KEY) if host.raw.try_get(TAMPERED_KEY) else None
    assert report == {"role": "replica 0", "what": str(got)}
    if not isinstance(pg, BaseException):
        pg.shutdown()


def test_a_group_member_with_another_token_is_refused(job):
    _, host, connect = job
    stores, other = [host, connect(), connect()], JobSecret(new_token())

    def member(r):
        return Group(stores[r].raw, "pg/auth/grp", r, 3, TIMEOUT,
                     secret=other if r == 2 else None)

    began = time.monotonic()
    results = in_threads(*(lambda r=r: member(r) for r in range(3)))
    assert time.monotonic() - began < TIMEOUT
    assert all(isinstance(res, Tampered) for res in results), results
    assert str(results[0]) == ("group pg/auth/grp: a peer without the job's token answered "
                               "its handshake as member 2; the group is shut down")


PEER = """
import os, sys
from distbelief.runtime.channel import Channel, Group
from distbelief.runtime.store import JobStore
port, kind = int(sys.argv[1]), sys.argv[2]
store = JobStore.connect("127.0.0.1", port, os.environ["JOB_TOKEN"], timeout=10)
if kind == "channel":
    Channel(store.raw, "pg/auth/dies", 1, 10)
else:
    Group(store.raw, "pg/auth/dies", 2, 3, 10)
"""


@pytest.mark.parametrize("kind", ["channel", "group"])
def test_a_peer_that_dies_in_the_handshake_closes_the_channel(job, kind):
    token, host, connect = job
    env = {**os.environ, "JOB_TOKEN": token, "DISTBELIEF_FAULTS": "channel.handshake/*/1=exit"}
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(host.port), kind], env=env,
                            stderr=subprocess.PIPE)
    try:
        if kind == "channel":
            calls = [lambda: Channel(host.raw, "pg/auth/dies", 0, TIMEOUT)]
        else:
            stores = [host, connect()]
            calls = [lambda r=r: Group(stores[r].raw, "pg/auth/dies", r, 3, TIMEOUT)
                     for r in range(2)]
        began = time.monotonic()
        results = in_threads(*calls)
        assert time.monotonic() - began < 2 * TIMEOUT
        assert all(isinstance(res, ChannelClosed) for res in results), results
        assert proc.wait(TIMEOUT) == EXIT_STATUS, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()
