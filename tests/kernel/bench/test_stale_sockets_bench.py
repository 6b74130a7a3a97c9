"""Smoke run of the stale-socket bench (bench/stale_sockets.py) at tiny scale: the row works.

Root only (marked `kernel`): real programs, real sockets in network namespaces the bench makes, the
agent's real sweep. No speed is asserted (speed targets live in bench/): the test checks that every
socket on the removed endpoint was ended and seen ending by its application, that the sticky row
was measured, and that the run leaves no pins behind.
"""

import glob

import pytest

from bench import stale_sockets

pytestmark = pytest.mark.kernel


def test_the_stale_socket_bench_ends_every_socket_on_the_removed_endpoint():
    pins_before = set(glob.glob("/sys/fs/bpf/meshlet-bench-stale-*"))
    record = stale_sockets.run_bench(sockets=20, pods=4, datagrams=500)
    assert record["sockets"] == 20
    assert 0 < record["terminated"] <= 20 and record["ended_seen"] == record["terminated"], record
    assert record["latency_max_seconds"] is not None
    assert all(ns and ns > 0 for ns in record["sendmsg4_ns_per_datagram"].values()), record
    assert set(glob.glob("/sys/fs/bpf/meshlet-bench-stale-*")) == pins_before
