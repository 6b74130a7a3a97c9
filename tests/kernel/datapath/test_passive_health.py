"""Passive health (SEMANTICS A17) with real handshakes: failing endpoints are ejected node-wide.

Root only (marked `kernel`): see conftest.py for the lab and the datapath. Each test runs its own
echo servers on HEALTH_PORT in the lab's server pods (processes it starts and stops by pid), so
an endpoint can stop listening (its SYNs then get a reset) and listen again. The health maps are
emptied at the start of each test: set ids are content-addressed, so a test would otherwise meet
the ejections of an earlier one.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.model import BackendGroup, Endpoint, GroupKey, RouteRef, Verdict

pytestmark = pytest.mark.kernel

HEALTH_PORT = 8090  #: the echo servers these tests start and stop
SVC = "10.96.0.90"
F = L.HEALTH_FAILURES


class Servers:
    """Echo servers on HEALTH_PORT in some lab pods, started and stopped by the test."""

    def __init__(self, lab):
        self.lab = lab
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        pod = self.lab.pod(f"shop/{name}")
        proc = pod.popen([sys.executable, "-m", "agent.lab.echo", "--name", name, "--port", str(HEALTH_PORT)],
                         stdout=subprocess.PIPE, text=True)
        self.procs[name] = proc
        assert proc.stdout.readline().strip() == "ready", f"echo in {name} did not start"

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def servers(lab, datapath):
    for name in ("health", "ejections"):
        m = datapath.maps[name]
        m.delete_batch(m.keys())
    s = Servers(lab)
    try:
        yield s
    finally:
        s.stop_all()


def group(shares, service: str, names, passive_health: bool = True) -> BackendGroup:
    key = GroupKey("shop", service, "http", "TCP", 4)
    eps = tuple(sorted(Endpoint(shares.address(n, 4), HEALTH_PORT) for n in names))
    return BackendGroup(key, eps, Verdict.FORWARD, passive_health=passive_health)


def write(datapath, shares, groups, split=None):
    split = split or shares.split(*((1, g) for g in groups))
    datapath.reconcile(shares.state({shares.fe(SVC, 80): split}, groups, shares.clients()), shares.cgroups())


def connect(client, count: int, *extra: str) -> dict:
    return client.client("tcp", SVC, 80, count, *extra)


def record(datapath, shares, name: str) -> L.HealthValue | None:
    key = L.HealthKey(port=P.socket.htons(HEALTH_PORT))
    key.addr[:] = P.addr16(shares.address(name, 4))
    raw = datapath.maps["health"].lookup(bytes(key))
    return None if raw is None else L.HealthValue.from_buffer_copy(raw)


def skipped(datapath, g: BackendGroup) -> list[int]:
    """Indexes of g's current set skipped now."""
    sid = P.set_id(P.group_id(g.key), g.endpoints)
    raw = datapath.maps["ejections"].lookup(bytes(L.U64(sid)))
    if raw is None:
        return []
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    value = L.SetEjections.from_buffer_copy(raw)
    return sorted(s.index for s in value.slot if s.until_ns > now)


def health_stats(datapath) -> dict[str, int]:
    out = {}
    for index, name in L.HEALTH_STATS.items():
        values = datapath.maps["health_stats"].lookup(bytes(L.U32(index))) or []
        out[name] = sum(int.from_bytes(v, "little") for v in values)
    return out


def test_an_endpoint_that_stops_listening_fails_at_most_f_connections_then_none(
        datapath, shares, client, servers):
    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    assert connect(client, 30)["errors"] == {}

    servers.stop("web-3")
    first = connect(client, 40)
    failed = first["errors"].get("ECONNREFUSED", 0)
    assert set(first["errors"]) <= {"ECONNREFUSED"}, first
    rec = record(datapath, shares, "web-3")
    assert rec is not None and rec.ejections >= 1, "web-3 was ejected"
    # F failures eject it; each later failure is a re-ejection after a back-off ended (one probe
    # connection per back-off), so the failures never exceed F + the extra ejections.
    assert failed <= F + rec.ejections - 1, (first, rec.ejections)
    web3_index = web.endpoints.index(Endpoint(shares.address("web-3", 4), HEALTH_PORT))
    assert skipped(datapath, web) == [web3_index]

    second = connect(client, 40)
    rec2 = record(datapath, shares, "web-3")
    extra = rec2.ejections - rec.ejections  # back-offs that ended during this batch
    assert second["errors"].get("ECONNREFUSED", 0) == extra, (second, extra)
    assert sum(second["peers"].values()) == 40 - extra
    assert set(second["peers"]) <= {"web-1", "web-2"}
