"""Live sockets whose endpoint goes away (SEMANTICS A16), with real traffic through the programs.

Root only (marked `kernel`): see conftest.py for the lab and the datapath. Each test writes a
state, starts a long-lived client in a pod (stale_client.py: one query every 50 ms, one JSON line
per answer or error), then changes the state the way a sync would: the full reconcile, then the
sweep that `meshlet run` does after it (agent.runtime.stale.StaleSockets, through netlink
sock_diag in the pods' network namespaces). Times are CLOCK_MONOTONIC, one clock for the machine.

Without the `sock_destroy` kernel feature (the probe says so) the termination tests skip with that
reason; MESHLET_REQUIRE_KERNEL=1 makes the skip a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from agent.model import BackendGroup, Endpoint, FrontendState, GroupKey, Verdict, WeightedGroup

pytestmark = pytest.mark.kernel

DNS = "10.96.0.53"
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stale_client.py")
#: Generous: a loaded CI machine may be slow; the 1 s rule is checked on the events' own times.
WAIT = 20.0
#: What the next call on a destroyed UDP socket fails with (see the first test).
ABORTED = {"ECONNABORTED", "EDESTADDRREQ"}


@pytest.fixture(scope="module")
def dns_pods(lab):
    pods = [lab.add_pod("kube-system", f"dns-{i}", echo_ports=(8080,)) for i in range(1, 5)]
    try:
        yield {p.name: p for p in pods}
    finally:
        for pod in pods:
            lab.remove_pod(pod)


@pytest.fixture(scope="module")
def destroy_supported():
    from agent.datapath import sockdiag

    if not sockdiag.destroy_available():
        if os.environ.get("MESHLET_REQUIRE_KERNEL") == "1":
            pytest.fail("the kernel probe finds no netlink SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY), "
                        "and MESHLET_REQUIRE_KERNEL=1")
        pytest.skip("this kernel has no netlink SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY): "
                    "connected sockets keep their endpoint (the probe reports sock_destroy=0)")


@pytest.fixture
def sweeper(datapath, lab, destroy_supported):
    from agent.runtime.stale import StaleSockets

    made = []

    def make(terminate_tcp: bool = False):
        s = StaleSockets.open(datapath.bpffs, lab.cgroup_root, terminate_tcp=terminate_tcp)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class Client:
    """stale_client.py running in a pod; `events` fills as it prints."""

    def __init__(self, pod, mode: str, addr: str, port: int):
        self.proc = pod.popen([sys.executable, CLIENT, mode, addr, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, what, predicate) -> dict:
        deadline = time.monotonic() + WAIT
        seen = 0
        while time.monotonic() < deadline:
            events = list(self.events)
            for event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {WAIT}s; events: {self.events[-10:]}")

    def next_reply(self, after: float | None = None) -> dict:
        after = time.monotonic() if after is None else after
        return self.wait_for("reply", lambda e: e["event"] in ("reply", "alive") and e["t"] > after)

    def stop(self) -> list[dict]:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        return self.events


@pytest.fixture
def clients():
    started: list[Client] = []

    def start(pod, mode: str, addr: str, port: int) -> Client:
        c = Client(pod, mode, addr, port)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def dns_state(shares, dns_pods, names, protocol="UDP", skip=()):
    """The "dns" Service of kube-system on DNS:53/udp (or :5300/tcp), endpoints: the named pods."""
    key = GroupKey("kube-system", "dns", "dns", protocol, 4)
    eps = tuple(sorted(Endpoint(dns_pods[n].ipv4, 8080) for n in names))
    group = BackendGroup(key, eps, Verdict.FORWARD if eps else Verdict.REJECT)
    fe = FrontendState("kube-system", "dns", "dns", (WeightedGroup(1, key),))
    port = 53 if protocol == "UDP" else 5300
    return shares.state({shares.fe(DNS, port, protocol): fe}, [group], shares.clients(skip))


def write(datapath, shares, state):
    datapath.reconcile(state, shares.cgroups())


def test_connected_udp_client_loses_no_query_while_every_endpoint_is_replaced(
        datapath, shares, dns_pods, client, sweeper, clients):
    stale = sweeper()
    live = ["dns-1", "dns-2"]
    first = dns_state(shares, dns_pods, live)
    write(datapath, shares, first)
    c = clients(client, "udp", DNS, 53)
    c.next_reply()
    # The agent sweeps after its first full sync too: that visit opens a netlink socket in each
    # pod's namespace, which the sweeps after later changes reuse.
    assert stale.sweep(first) == {}
    removed_at: dict[str, float] = {}
    terminated = {}
    for new in ("dns-3", "dns-4"):
        current = c.next_reply()["peer"]
        assert current in live, (current, live)
        # Replace the endpoint the client talks to first (so the change hits it), then the other.
        old = current if not removed_at else next(n for n in live if n not in ("dns-3", "dns-4"))
        live = [n for n in live if n != old] + [new]
        state = dns_state(shares, dns_pods, live)
        write(datapath, shares, state)
        removed_at[old] = time.monotonic()  # the sync is written: A16's 1 s runs from here
        for key, n in stale.sweep(state).items():
            terminated[key] = terminated.get(key, 0) + n
        c.next_reply(after=time.monotonic() + 0.2)  # a few queries on the new endpoints
    events = c.stop()

    assert terminated.get(("udp", "endpoint_removed"), 0) >= 1, terminated
    replies = [e for e in events if e["event"] == "reply"]
    # Errors before the first answer are the lab warming up (a shared machine can take seconds
    # to answer the first datagram), not a replacement: only the later ones are counted.
    errors = [e for e in events if e["event"] == "error" and e["t"] > replies[0]["t"]]
    assert len(errors) == terminated[("udp", "endpoint_removed")], errors
    # The kernel aborts the socket (a pending receive fails with ECONNABORTED) and disconnects it
    # (a send fails with EDESTADDRREQ): which one the client meets depends on where it was.
    assert {e["errno"] for e in errors} <= ABORTED, errors
    # No query lost: every query number got exactly one answer (the failed one was retried).
    seqs = [e["seq"] for e in replies]
    assert seqs == list(range(len(seqs))), "a query was lost or answered twice"
    for name, at in removed_at.items():
        late = [e for e in replies if e["peer"] == name and e["t"] > at + 1.0]
        assert not late, f"{name} still answered {late[-1]['t'] - at:.2f}s after its removal"
    assert replies[-1]["peer"] in ("dns-3", "dns-4")


def test_sockets_meshlet_did_not_translate_are_untouched(datapath, shares, dns_pods, lab, client, sweeper, clients):
    stale = sweeper()
    write(datapath, shares, dns_state(shares, dns_pods, ["dns-1"], skip=("skipper",)))
    direct = clients(client, "udp", dns_pods["dns-1"].ipv4, 8080)  # a pod IP: never translated
    skipped = clients(lab.pod("quiet/skipper"), "udp", dns_pods["dns-1"].ipv4, 8080)
    for c in (direct, skipped):
        assert c.next_reply()["peer"] == "dns-1"
    state = dns_state(shares, dns_pods, ["dns-2"], skip=("skipper",))
    write(datapath, shares, state)
    assert stale.sweep(state) == {}
    after = time.monotonic()
    for c in (direct, skipped):
        assert c.next_reply(after=after + 0.2)["peer"] == "dns-1"
    for c in (direct, skipped):
        assert [e for e in c.stop() if e["event"] == "error"] == []


@pytest.mark.parametrize("terminate_tcp", [False, True], ids=["default-untouched", "option-terminates"])
def test_tcp_connections_are_left_alone_unless_the_option_is_on(
        datapath, shares, dns_pods, client, sweeper, clients, terminate_tcp):
    stale = sweeper(terminate_tcp=terminate_tcp)
    write(datapath, shares, dns_state(shares, dns_pods, ["dns-1"], protocol="TCP"))
    c = clients(client, "tcp", DNS, 5300)
    assert c.next_reply()["peer"] == "dns-1"
    state = dns_state(shares, dns_pods, ["dns-2"], protocol="TCP")
    write(datapath, shares, state)
    done = stale.sweep(state)
    if terminate_tcp:
        assert done == {("tcp", "endpoint_removed"): 1}
        c.wait_for("the connection's end", lambda e: e["event"] == "error")
        assert c.wait_for("a new connection", lambda e: e.get("peer") is not None and e["seq"] > 0)["peer"] == "dns-2"
    else:
        assert done == {}
        after = time.monotonic()
        c.next_reply(after=after + 0.3)
        assert [e for e in c.stop() if e["event"] == "error"] == [], "TCP is left alone by default (A14)"


def test_a_deleted_frontend_terminates_its_connected_udp_sockets(datapath, shares, dns_pods, client, sweeper, clients):
    stale = sweeper()
    write(datapath, shares, dns_state(shares, dns_pods, ["dns-1"]))
    c = clients(client, "udp", DNS, 53)
    assert c.next_reply()["peer"] == "dns-1"
    empty = shares.state({}, [], shares.clients())
    write(datapath, shares, empty)
    assert stale.sweep(empty) == {("udp", "frontend_removed"): 1}
    error = c.wait_for("the socket's end", lambda e: e["event"] == "error")
    assert error["errno"] in ABORTED


def test_an_unconnected_sticky_socket_moves_to_a_live_endpoint(datapath, shares, dns_pods, client, clients):
    write(datapath, shares, dns_state(shares, dns_pods, ["dns-1", "dns-2"]))
    c = clients(client, "udp-unconnected", DNS, 53)
    first = c.next_reply()["peer"]
    after = time.monotonic()
    assert c.next_reply(after=after + 0.2)["peer"] == first, "sticky while usable (A10)"
    other = "dns-2" if first == "dns-1" else "dns-1"
    # A scale-up keeps the choice: the endpoint is still usable.
    write(datapath, shares, dns_state(shares, dns_pods, ["dns-1", "dns-2", "dns-3"]))
    assert c.next_reply(after=time.monotonic() + 0.2)["peer"] == first, "a new set revision keeps a usable choice"
    write(datapath, shares, dns_state(shares, dns_pods, [other, "dns-3"]))
    moved_at = time.monotonic()
    reply = c.next_reply(after=moved_at)
    assert reply["peer"] in (other, "dns-3"), "the next datagram after the removal picks again (A16)"
    sticky = reply["peer"]
    assert c.next_reply(after=time.monotonic() + 0.2)["peer"] == sticky, "and keeps the new choice"
    assert not [e for e in c.stop() if e["event"] == "error"]
