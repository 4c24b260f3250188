"""runtime.netif: the interface that reaches an address (gloo's interface on many hosts).
The namespace tests (tests/test_namespaces.py) check it where hosts differ."""

import pytest

from distbelief.runtime.netif import interface_of, interface_towards, local_address_towards


def test_loopback_is_reached_through_lo():
    assert local_address_towards("127.0.0.1") == "127.0.0.1"
    assert interface_towards("127.0.0.1") == "lo"
    assert interface_of("127.0.0.1") == "lo"


def test_the_default_route_leaves_through_a_named_interface():
    local = local_address_towards("198.51.100.1")  # TEST-NET-2: only a route lookup
    if local is None:
        pytest.skip("this machine has no default route")
    assert interface_of(local) not in (None, "lo")


def test_an_unknown_name_or_address_gives_none():
    assert interface_towards("no-such-host.invalid") is None
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: on no interface here
