"""Real connections through the socket programs: where they go, what the client sees, verdicts.

Root only (marked `kernel`): see conftest.py for what is made and removed. Clients run the lab
client (agent.lab.client) inside a pod: N connections from one process, a JSON histogram back.
"""

import json
import math
import sys
import time

import pytest

from agent.model import Verdict

pytestmark = pytest.mark.kernel

SVC4, SVC6 = "10.96.0.10", "fd00:96::10"


def write(datapath, shares, frontends, groups, skip=()):
    datapath.reconcile(shares.state(frontends, groups, shares.clients(skip)), shares.cgroups())


@pytest.mark.parametrize("address,extra", [(SVC4, ()), (SVC6, ()), (SVC4, ("--family", "mapped"))],
                         ids=["v4", "v6", "v4-mapped-on-v6-socket"])
def test_tcp_to_a_frontend_reaches_an_endpoint_and_getpeername_shows_the_frontend(
        datapath, shares, client, address, extra):
    family = 6 if ":" in address else 4
    web = shares.group("web", ["web-1"], family=family)
    write(datapath, shares, {shares.fe(address, 80): shares.split((1, web))}, [web])
    before = datapath.counters()["translated"]
    result = client.client("tcp", address, 80, 5, *extra)
    assert result["peers"] == {"web-1": 5}, result
    assert result["errors"] == {}
    shown = f"[::ffff:{address}]:80" if extra else (f"[{address}]:80" if family == 6 else f"{address}:80")
    assert result["getpeername"] == [shown]
    assert datapath.counters()["translated"] - before == 5


@pytest.mark.parametrize("address", [SVC4, SVC6], ids=["v4", "v6"])
def test_udp_flows_are_translated_and_replies_come_from_the_frontend(datapath, shares, client, address):
    family = 6 if ":" in address else 4
    dns = shares.group("dns", ["web-1", "web-2", "web-3"], family=family, protocol="UDP")
    write(datapath, shares, {shares.fe(address, 53, "UDP"): shares.split((1, dns), service="dns")}, [dns])
    shown = f"[{address}]:53" if family == 6 else f"{address}:53"

    connected = client.client("udp", address, 53, 30)
    assert connected["errors"] == {} and sum(connected["peers"].values()) == 30
    assert len(connected["peers"]) > 1, "each connected socket is a new flow with its own pick"
    assert connected["getpeername"] == [shown] and connected["reply_from"] == [shown]

    unconnected = client.client("udp", address, 53, 30, "--unconnected")
    assert unconnected["errors"] == {}
    assert len(unconnected["peers"]) == 1, "an unconnected socket keeps its first choice (A10)"
    assert unconnected["reply_from"] == [shown], "recvfrom shows the frontend (A12)"


def binomial_bound(n: int, p: float) -> float:
    """Half-width of an interval that a binomial count leaves with probability < 1e-6 (5.33 sd)."""
    return 5.33 * math.sqrt(n * p * (1 - p))


def test_weights_are_reproduced_over_2400_connections(datapath, shares, client):
    a = shares.group("a", ["web-1"])
    b = shares.group("b", ["web-2", "web-3"])
    # 1 : 2 : 1 over a, b and a rejected share (an invalid backendRef, SEMANTICS B13).
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, a), (2, b), (1, None))}, [a, b])
    n = 2400
    result = client.client("tcp", SVC4, 80, n, timeout=300)
    got = {"web-1": result["peers"].get("web-1", 0),
           "b": result["peers"].get("web-2", 0) + result["peers"].get("web-3", 0),
           "refused": result["errors"].get("ECONNREFUSED", 0)}
    assert sum(got.values()) == n, result
    for outcome, p in (("web-1", 0.25), ("b", 0.5), ("refused", 0.25)):
        assert abs(got[outcome] - n * p) <= binomial_bound(n, p), (outcome, got)
    # Inside group b, the pick is uniform.
    assert abs(result["peers"].get("web-2", 0) - got["b"] / 2) <= binomial_bound(got["b"], 0.5), result


#: The affinity timeout of the stickiness test: long enough that starting a client process on a
#: slow machine (the 6.1 kernel-matrix VM runs under software emulation) stays well inside it.
AFFINITY_S = 3


def test_client_ip_affinity_sticks_slides_and_expires(datapath, shares, client):
    web = shares.group("web", ["web-1", "web-2", "web-3"], affinity=AFFINITY_S)
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web))}, [web])
    first = client.client("tcp", SVC4, 80, 40)
    assert first["errors"] == {} and len(first["peers"]) == 1, first
    # Sliding: each use refreshes the timestamp, so uses 1 s apart keep the choice for twice the
    # timeout. One process makes them all, so a slow process start (the 6.1 VM runs under
    # emulation) never stretches a gap; without the slide, 7 uses over 6 s would re-pick twice
    # and stay on one pod with p = 1/9.
    slid = client.client("tcp", SVC4, 80, 7, "--interval", "1.0")
    assert slid["errors"] == {} and len(slid["peers"]) == 1, slid
    (chosen,) = slid["peers"]
    # Expiry: after the timeout a new pick is made (uniform over 3: the same pod comes back with
    # p = 1/3, so try up to 14 times; all 14 the same by chance: p < 3e-7).
    for _ in range(14):
        time.sleep(AFFINITY_S + 0.3)
        again = client.client("tcp", SVC4, 80, 1)["peers"]
        if again != {chosen: 1}:
            break
    else:
        pytest.fail(f"affinity never expired: always {chosen}")
    # A remembered endpoint that left the set is not used any more.
    (now,) = again
    others = [p for p in ("web-1", "web-2", "web-3") if p != now]
    web2 = shares.group("web", others, affinity=AFFINITY_S)
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web2))}, [web2])
    assert now not in client.client("tcp", SVC4, 80, 10)["peers"]


def test_a_consumer_scope_wins_for_its_namespace_only(datapath, shares, lab):
    default = shares.group("web", ["web-1"])
    consumer_view = shares.group("web-v2", ["web-2"])
    write(datapath, shares, {
        shares.fe(SVC4, 80): shares.split((1, default)),
        shares.fe(SVC4, 80, scope="team-a"): shares.split((1, consumer_view)),
    }, [default, consumer_view])
    assert lab.pod("team-a/consumer").client("tcp", SVC4, 80, 5)["peers"] == {"web-2": 5}
    assert lab.pod("default/client").client("tcp", SVC4, 80, 5)["peers"] == {"web-1": 5}
    # A node process (in no pod cgroup) gets the default view (SEMANTICS B5).
    node = lab.run_on_node([sys.executable, "-m", "agent.lab.client", "tcp", SVC4, "80", "--count", "3"])
    assert json.loads(node.stdout)["peers"] == {"web-1": 3}, node.stderr


@pytest.mark.parametrize("kind,extra", [("tcp", ()), ("udp", ()), ("udp", ("--unconnected",))],
                         ids=["tcp", "udp-connect", "udp-sendto"])
def test_verdicts_fail_at_once_with_their_errno(datapath, shares, client, kind, extra):
    proto = "TCP" if kind == "tcp" else "UDP"
    empty = shares.group("gone", [], protocol=proto)
    local = shares.group("local", [], protocol=proto, verdict=Verdict.UNREACHABLE)
    write(datapath, shares, {
        shares.fe("10.96.0.21", 80, proto): shares.split(),  # no backendRefs / all weights 0
        shares.fe("10.96.0.22", 80, proto): shares.split((1, empty)),  # no endpoints (A9)
        shares.fe("10.96.0.23", 80, proto): shares.split((1, None)),  # only an invalid backendRef (B13)
        shares.fe("10.96.0.24", 80, proto): shares.split((1, local)),  # none usable here (A7)
    }, [empty, local])
    before = datapath.counters()
    for address in ("10.96.0.21", "10.96.0.22", "10.96.0.23"):
        assert client.client(kind, address, 80, 2, *extra)["errors"] == {"ECONNREFUSED": 2}, address
    assert client.client(kind, "10.96.0.24", 80, 2, *extra)["errors"] == {"EHOSTUNREACH": 2}
    after = datapath.counters()
    assert after["rejected"] - before["rejected"] == 6
    assert after["unreachable"] - before["unreachable"] == 2
    assert after["miss"] == 0


def test_a_skipped_pod_is_never_translated(datapath, shares, lab):
    web = shares.group("web", ["web-1"], family=6)
    write(datapath, shares, {shares.fe(SVC6, 80): shares.split((1, web))}, [web], skip=("skipper",))
    before = datapath.counters()["skipped"]
    result = lab.pod("quiet/skipper").client("tcp", SVC6, 80, 2)
    # Untranslated, the connection goes to the frontend address itself, which the lab's node
    # does not route: ENETUNREACH (never a datapath verdict).
    assert result["peers"] == {} and result["errors"] == {"ENETUNREACH": 2}, result
    assert datapath.counters()["skipped"] - before == 2
    assert lab.pod("default/client").client("tcp", SVC6, 80, 1)["peers"] == {"web-1": 1}


def test_a_pod_connecting_to_its_own_service_may_pick_itself(datapath, shares, lab):
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web))}, [web])
    assert lab.pod("shop/web-1").client("tcp", SVC4, 80, 3)["peers"] == {"web-1": 3}


def test_traffic_to_other_addresses_is_untouched(datapath, shares, client, lab):
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web))}, [web])
    web3 = lab.pod("shop/web-3")
    result = client.client("tcp", web3.ipv4, shares.ECHO_PORT, 3)
    assert result["peers"] == {"web-3": 3} and result["getpeername"] == [f"{web3.ipv4}:{shares.ECHO_PORT}"]
    # Same address, another port: not a frontend either.
    assert client.client("tcp", SVC4, 81, 1)["errors"] == {"ENETUNREACH": 1}
