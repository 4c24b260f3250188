"""Header channels over a Unix socket (the shared-memory transport's control path)."""

from __future__ import annotations

import socket
import stat
import struct
import threading
import time

import pytest

from distbelief.runtime.channel import ChannelClosed
from distbelief.runtime.local import LocalChannel, LocalListener

TOKEN = "a" * 32


@pytest.fixture
def listener(tmp_path):
    lst = LocalListener(tmp_path / "shard0.sock", timeout=5)
    try:
        yield lst
    finally:
        lst.close()


def accept(listener: LocalListener) -> LocalChannel:
    for _ in range(100):
        conn = listener.accept(0.05)
        if conn is not None:
            return conn
    raise AssertionError("no connection came")


def test_request_and_headers_travel_both_ways(listener):
    client = LocalChannel.connect(listener.path, TOKEN, {"client": "replica0"}, timeout=5)
    server = accept(listener)
    assert server.read_request(TOKEN) == {"client": "replica0"}
    client.send_header(2, 7, -3)
    assert server.recv_header() == [2, 7, -3, 0, 0, 0]
    server.send_header(100, 2**40)
    assert client.recv_header() == [100, 2**40, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="holds 6 integers"):
        client.send_header(*range(7))


def test_socket_is_private_and_removed_on_close(tmp_path):
    lst = LocalListener(tmp_path / "s.sock", timeout=5)
    assert stat.S_IMODE((tmp_path / "s.sock").stat().st_mode) == 0o600
    lst.close()
    assert not (tmp_path / "s.sock").exists()
    with pytest.raises(ChannelClosed, match="cannot connect"):
        LocalChannel.connect(tmp_path / "s.sock", TOKEN, {}, timeout=5)


def test_a_client_without_the_token_is_refused(listener):
    client = LocalChannel.connect(listener.path, "b" * 32, {"client": "stranger"}, timeout=5)
    server = accept(listener)
    with pytest.raises(ChannelClosed, match="without the job's token"):
        server.read_request(TOKEN)
    with pytest.raises(ChannelClosed):  # the connection was ended
        client.recv_header()


@pytest.mark.parametrize("payload", [struct.pack("<I", 1 << 30), struct.pack("<I", 5) + b"nope!",
                                     struct.pack("<I", 2) + b"[]"],
                         ids=["huge", "not-json", "not-an-object"])
def test_malformed_requests_are_refused(listener, payload):
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(listener.path))
    raw.sendall(payload)
    server = accept(listener)
    with pytest.raises(ChannelClosed):
        server.read_request(TOKEN)
    raw.close()


def test_a_peer_that_goes_away_fails_a_pending_recv_at_once(listener):
    client = LocalChannel.connect(listener.path, TOKEN, {}, timeout=30)
    server = accept(listener)
    server.read_request(TOKEN)
    threading.Timer(0.2, server.close).start()
    began = time.monotonic()
    with pytest.raises(ChannelClosed, match="closed the connection"):
        client.recv_header()
    assert time.monotonic() - began < 5


def test_a_silent_peer_fails_a_recv_after_the_timeout(tmp_path):
    lst = LocalListener(tmp_path / "s.sock", timeout=0.3)
    try:
        client = LocalChannel.connect(lst.path, TOKEN, {}, timeout=0.3)
        server = accept(lst)  # connected, and says nothing
        with pytest.raises(ChannelClosed, match="no answer within the timeout"):
            client.recv_header()
        server.close()
    finally:
        lst.close()
