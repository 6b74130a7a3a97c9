"""`meshlet run` ends a connected UDP socket whose endpoint left its Service (SEMANTICS A16).

Root only (marked `kernel`); safety as in runtime_agent_helpers.py: the agent attaches only to the
lab's cgroup subtree, with its own bpffs directory, and every process is stopped by its pid. The
client is tests/kernel/datapath/stale_client.py (one DNS-like query every 50 ms on one connected
UDP socket, reconnecting after an error), run in the lab's client pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from runtime_agent_helpers import manifests, write_atomically

pytestmark = pytest.mark.kernel

DNS_IP = "10.96.77.53"
CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datapath", "stale_client.py")


def dns_manifests(endpoint_ip: str) -> str:
    return manifests([endpoint_ip], service="dns", cluster_ip=DNS_IP, port=53, protocol="UDP", port_name="dns")


def events_of(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{") and line.endswith("}\n")]


def wait_for_event(path, predicate, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events_of(path):
            if predicate(event):
                return event
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s: {events_of(path)[-10:]}")


def test_the_agent_ends_a_connected_udp_socket_whose_endpoint_left(world, tmp_path):
    a, b = world.pods["mesh/echo-a"], world.pods["mesh/echo-b"]
    write_atomically(world.manifests_dir / "dns.yaml", dns_manifests(a.ipv4))
    agent = world.agent()
    agent.wait_ready()
    assert "sock_destroy" in agent.log_text().split("event=kernel.features", 1)[1].split("\n", 1)[0]
    out_path = tmp_path / "client.jsonl"
    with open(out_path, "w") as out:
        client = world.pods["default/client"].popen([sys.executable, CLIENT, "udp", DNS_IP, "53"],
                                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_event(out_path, lambda e: e.get("peer") == "echo-a", "an answer from echo-a")
        changed_at = time.monotonic()
        write_atomically(world.manifests_dir / "dns.yaml", dns_manifests(b.ipv4))
        error = wait_for_event(out_path, lambda e: e["event"] == "error" and e["t"] > changed_at,
                               "the socket's end")
        wait_for_event(out_path, lambda e: e.get("peer") == "echo-b", "an answer from echo-b")
    finally:
        client.stdin.close()
        try:
            client.wait(10)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    events = events_of(out_path)
    replies = [e for e in events if e["event"] == "reply"]
    assert [e["seq"] for e in replies] == list(range(len(replies))), "no query lost: the failed one was retried"
    # The manifests are re-read within 0.2 s, the sync follows at once: 1 s after the sync (A16),
    # with room for the file watch, is 1.5 s after the change.
    assert error["t"] - changed_at < 1.5, f"the socket ended {error['t'] - changed_at:.2f}s after the change"
    late = [e for e in replies if e["peer"] == "echo-a" and e["t"] > changed_at + 1.5]
    assert not late, late
    code, metrics = agent.get("/metrics")
    assert 'meshlet_sockets_terminated_total{protocol="udp",reason="endpoint_removed"} 1.0' in metrics
    assert 'meshlet_kernel_feature{feature="sock_destroy"} 1.0' in metrics
