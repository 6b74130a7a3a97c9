"""Passive health (SEMANTICS A17) with real handshakes: failing endpoints are ejected node-wide.

Root only (marked `kernel`): see conftest.py for the lab and the datapath. Each test runs its own
echo servers on HEALTH_PORT in the lab's server pods (processes it starts and stops by pid), so
an endpoint can stop listening (its SYNs then get a reset) and listen again. The health maps are
emptied at the start of each test: set ids are content-addressed, so a test would otherwise meet
the ejections of an earlier one.
"""

from __future__ import annotations

import ctypes as ct
import os
import subprocess
import sys
import time
import uuid

import pytest

from agent.datapath import bpfsys, loader
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
    if not datapath.support.present["sockops"]:
        pytest.skip("this kernel lacks the sock_ops hook with socket storage (the feature probe says so): "
                    "passive health is off here")
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


def assert_skipped_while_ejected(datapath, g: BackendGroup, index: int, rec: L.HealthValue) -> None:
    """The set skips `index` while its back-off runs (read before the clock: a slow machine may
    be past the back-off by now, and then nothing is skipped)."""
    now_skipped = skipped(datapath, g)
    if time.clock_gettime_ns(time.CLOCK_MONOTONIC) < rec.until_ns:
        assert now_skipped == [index]
    else:
        assert now_skipped in ([], [index])


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
    assert_skipped_while_ejected(datapath, web, web3_index, rec)

    second = connect(client, 40)
    rec2 = record(datapath, shares, "web-3")
    extra = rec2.ejections - rec.ejections  # back-offs that ended during this batch
    assert second["errors"].get("ECONNREFUSED", 0) == extra, (second, extra)
    assert sum(second["peers"].values()) == 40 - extra
    assert set(second["peers"]) <= {"web-1", "web-2"}


def eject_web3(datapath, shares, client, servers, web) -> L.HealthValue:
    """web-3 stops listening; connections until it is ejected (a few at most)."""
    servers.stop("web-3")
    result = connect(client, 40)
    assert set(result["errors"]) <= {"ECONNREFUSED"}, result
    rec = record(datapath, shares, "web-3")
    assert rec is not None and rec.ejections >= 1, (result, rec)
    return rec


def wait_until_monotonic(ns: int) -> None:
    """Poll the clock the programs use (CLOCK_MONOTONIC = bpf_ktime_get_ns) until it passes ns."""
    while time.clock_gettime_ns(time.CLOCK_MONOTONIC) <= ns:
        time.sleep(0.05)


def test_an_endpoint_listening_again_is_picked_again_once_its_back_off_ends(datapath, shares, client, servers):
    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    rec = eject_web3(datapath, shares, client, servers, web)
    servers.start("web-3")
    wait_until_monotonic(rec.until_ns)
    # The back-off has ended: web-3 is a candidate again (chance to miss it in 30: (2/3)^30).
    result = connect(client, 30)
    assert result["errors"] == {} and "web-3" in result["peers"], result
    assert record(datapath, shares, "web-3") is None, "its first success cleared the record"
    assert skipped(datapath, web) == []


def test_two_of_two_dead_failures_pass_through_and_meshlet_rejects_nothing(datapath, shares, client, servers):
    web = group(shares, "web", ["web-1", "web-2"])  # no server listens on either
    write(datapath, shares, [web])
    before = datapath.counters()
    stats = health_stats(datapath)
    result = connect(client, 20)
    after = datapath.counters()
    assert result["errors"] == {"ECONNREFUSED": 20}, result
    assert after["rejected"] == before["rejected"], "no connection was refused by meshlet itself"
    assert after["translated"] - before["translated"] == 20, "every one went to an endpoint"
    assert len(skipped(datapath, web)) <= 1, "never more than half of the set is ejected"
    after_stats = health_stats(datapath)
    assert after_stats["ejections"] > stats["ejections"], "one of them was ejected"
    assert after_stats["capped"] > stats["capped"], "the other endpoint's failures passed through"


def test_a_route_split_keeps_its_weights_while_an_endpoint_inside_one_backend_is_ejected(
        datapath, shares, client, servers):
    servers.start("web-1")
    servers.start("web-2")  # web-3 never listens: it is ejected from backend a
    a = group(shares, "web-a", ["web-1", "web-3"])
    b = group(shares, "web-b", ["web-2"])
    route = RouteRef("HTTPRoute", "shop", "split", 0)
    write(datapath, shares, [a, b], shares.split((50, a), (50, b), route=route))
    n = 400
    result = connect(client, n)
    to_a = result["peers"].get("web-1", 0) + result["errors"].get("ECONNREFUSED", 0)
    to_b = result["peers"].get("web-2", 0)
    assert to_a + to_b == n and set(result["errors"]) <= {"ECONNREFUSED"}, result
    assert result["errors"].get("ECONNREFUSED", 0) <= F + record(datapath, shares, "web-3").ejections - 1
    assert_skipped_while_ejected(datapath, a, a.endpoints.index(Endpoint(shares.address("web-3", 4), HEALTH_PORT)),
                                 record(datapath, shares, "web-3"))
    # 50/50 kept (B12): 5.33 standard deviations of a fair binomial around n/2.
    assert abs(to_a - n / 2) <= 5.33 * (n * 0.25) ** 0.5, result


def test_the_service_annotation_off_keeps_picking_a_failing_endpoint(datapath, shares, client, servers):
    servers.start("web-1")
    servers.start("web-2")
    web = group(shares, "web", ["web-1", "web-2", "web-3"], passive_health=False)
    write(datapath, shares, [web])
    result = connect(client, 60)
    # Uniform picks: web-3 gets ~20 of 60; with passive health it would get at most F.
    assert result["errors"].get("ECONNREFUSED", 0) > F + 3, result
    assert record(datapath, shares, "web-3") is None and skipped(datapath, web) == []


def check_restart_kept_it(datapath, shares, client, web, rec):
    """After a restart: the same record, still skipped, and no more failures than re-ejections."""
    after = record(datapath, shares, "web-3")
    assert after is not None and after.until_ns == rec.until_ns, "the record survived the restart"
    if time.clock_gettime_ns(time.CLOCK_MONOTONIC) < rec.until_ns:
        assert skipped(datapath, web) != []
    result = connect(client, 30)
    extra = record(datapath, shares, "web-3").ejections - rec.ejections
    assert result["errors"].get("ECONNREFUSED", 0) == extra, (result, extra)


def test_an_agent_restart_keeps_the_ejection(datapath, shares, client, servers, lab, bpffs):
    from agent.datapath import Datapath

    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    rec = eject_web3(datapath, shares, client, servers, web)
    # What a restarted agent does: open (adopting the pins), write the same state, attach.
    second = Datapath.open(bpffs, lab.cgroup_root, datapath.sizes)
    try:
        assert second.adopted
        second.reconcile(shares.state({shares.fe(SVC, 80): shares.split((1, web))}, [web], shares.clients()),
                         shares.cgroups())
        second.attach()
        check_restart_kept_it(datapath, shares, client, web, rec)
    finally:
        second.close()
        datapath.attach()  # the session's programs behind the links again, for the tests after


def test_a_layout_upgrade_carries_the_ejection_to_the_new_maps(datapath, shares, client, servers, bpffs):
    """What an agent of a newer layout does at start (loader.carry_over): copy the older layout's
    health records and set ejections into its new maps. The older layout here is the session's
    real maps, holding an ejection made by real handshakes, pinned under a layout version below
    the current one in a bpffs directory of this test's own."""
    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    rec = eject_web3(datapath, shares, client, servers, web)
    sid = bytes(L.U64(P.set_id(P.group_id(web.key), web.endpoints)))
    ejected = datapath.maps["ejections"].lookup(sid)
    assert ejected is not None

    upgraded = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    older = os.path.join(upgraded, f"v{L.LAYOUT_VERSION - 1}", "maps")
    os.makedirs(older)
    new_maps = {}
    try:
        for name in L.CARRIED_MAPS:
            bpfsys.obj_pin(datapath.maps[name].fd, os.path.join(older, name))
            spec = L.MAP_SPECS[name]
            fd = bpfsys.map_create(spec.type, ct.sizeof(spec.key), ct.sizeof(spec.value), spec.max_entries(datapath.sizes))
            new_maps[name] = bpfsys.Map(fd, bpfsys.map_info(fd))
        carried = loader.carry_over(upgraded, new_maps)
        assert carried["health"] >= 1 and carried["ejections"] >= 1, carried
        key = L.HealthKey(port=P.socket.htons(HEALTH_PORT))
        key.addr[:] = P.addr16(shares.address("web-3", 4))
        after = new_maps["health"].lookup(bytes(key))
        assert after is not None and L.HealthValue.from_buffer_copy(after).until_ns == rec.until_ns
        assert new_maps["ejections"].lookup(sid) == ejected, "the set still skips web-3 in the new maps"
    finally:
        for m in new_maps.values():
            m.close()
        for name in os.listdir(older):
            os.unlink(os.path.join(older, name))
        os.removedirs(older)  # up to and including the test's bpffs directory, now empty


@pytest.mark.parametrize("timeout, syn_retries", [("2", None), ("10", "1")], ids=["client-gives-up", "kernel-gives-up"])
def test_a_blackholed_endpoint_times_out_and_is_ejected(datapath, shares, client, servers, timeout, syn_retries):
    """SYNs dropped by the endpoint's netns. client-gives-up: the client closes after its 2 s
    connect timeout, by which time its SYN went unanswered for a whole RTO (retransmitted once).
    kernel-gives-up: with net.ipv4.tcp_syn_retries=1 in the client's netns the kernel ends the
    handshake itself after ~3 s (ETIMEDOUT). Both are failures."""
    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    web3 = shares.pods["web-3"]
    rules = (f"table inet meshlet_test_blackhole {{\n chain input {{\n"
             f"  type filter hook input priority 0;\n  tcp dport {HEALTH_PORT} drop\n }}\n}}\n")
    done = web3.run(["nft", "-f", "-"], input=rules)
    assert done.returncode == 0, done.stderr
    old_retries = client.run(["sysctl", "-n", "net.ipv4.tcp_syn_retries"]).stdout.strip()
    try:
        if syn_retries:
            assert client.run(["sysctl", "-q", "-w", f"net.ipv4.tcp_syn_retries={syn_retries}"]).returncode == 0
        result = connect(client, 40, "--timeout", timeout)
        timeouts = result["errors"].get("ETIMEDOUT", 0)
        assert set(result["errors"]) <= {"ETIMEDOUT"}, result
        rec = record(datapath, shares, "web-3")
        assert rec is not None and rec.ejections >= 1, (result, rec)
        assert timeouts <= F + rec.ejections - 1, (result, rec)
    finally:
        client.run(["sysctl", "-q", "-w", f"net.ipv4.tcp_syn_retries={old_retries}"])
        web3.run(["nft", "delete", "table", "inet", "meshlet_test_blackhole"])


def test_maps_dump_and_explain_show_the_ejected_endpoint(datapath, shares, client, servers, bpffs):
    from click.testing import CliRunner

    from agent.datapath import cli as maps_cli
    from agent.datapath import dump
    from agent.explain import explain_connection, parse_client, parse_target, render

    for name in ("web-1", "web-2", "web-3"):
        servers.start(name)
    web = group(shares, "web", ["web-1", "web-2", "web-3"])
    write(datapath, shares, [web])
    rec = eject_web3(datapath, shares, client, servers, web)
    web3 = f"{shares.address('web-3', 4)}:{HEALTH_PORT}"

    # Decoded as of a moment inside the back-off (decode is pure: the clock is an input).
    view = dump.decode(dump.read_raw(bpffs), now_ns=rec.until_ns - 500_000_000)
    (row,) = [h for h in view.health if h.endpoint == web3]
    assert row.ejections == rec.ejections and row.backoff_left_seconds == 0.5
    assert row.skipped_in == (str(web.key),)
    explained = explain_connection(view, parse_client("default/client"), parse_target(f"{SVC}:80/tcp"))
    (line,) = explained.groups
    shares_by_endpoint = {e.endpoint: (e.share, e.ejected_seconds) for e in line.endpoints}
    assert shares_by_endpoint[web3] == (0.0, 0.5)
    assert sorted(s for s, _ in shares_by_endpoint.values()) == [0.0, 0.5, 0.5]
    assert any("ejected by passive health" in text and web3 in text for text in render(explained))

    # The command itself: the record is there whatever the clock says now.
    done = CliRunner().invoke(maps_cli.dump, ["health", "--bpffs", bpffs])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0].split() == ["ENDPOINT", "FAILURES", "EJECTIONS", "BACKOFF-LEFT", "SKIPPED-IN"]
    assert any(line.startswith(web3) for line in done.output.splitlines()[1:]), done.output
