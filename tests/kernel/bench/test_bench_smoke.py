"""Smoke run of the benchmarks at tiny scale: the harnesses and the rule generators work.

Real namespaces, real rule sets (iptables-restore, nft -f), meshlet's real programs, real
connections through the C load generator. No speed is asserted: the test checks that the
kube-proxy layouts (and meshlet) really balance connections over the endpoints, that every mode
reaches exactly the same endpoint set, that an endpoint change is applied everywhere, and that the
bench removes every namespace and cgroup it made; and that the control-plane harness measures
its child and the real agent (`meshlet run` against the tests' stand-in API server).
"""

import subprocess
from pathlib import Path

import pytest

from bench import datapath_bench, loadgen
from bench.modes import ALL_MODES, MODE_CLASSES
from bench.synth import make_services

pytestmark = pytest.mark.kernel

N, K = 3, 3
POSITION_CONNS = 240  #: 80 expected per endpoint
#: chi-square critical value for 2 degrees of freedom at p = 0.0001: a fair split fails 1 in 10^4.
CHI2_CRITICAL = 18.42


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def bench_cgroups() -> set[str]:
    from bench.topology import cgroup2_mount

    return {p.name for p in cgroup2_mount().iterdir() if p.name.startswith("meshlet-bench-")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    modes = [m for m in ALL_MODES if MODE_CLASSES[m].unavailable() is None]
    netns_before, cgroups_before = netns_names(), bench_cgroups()
    plan = datapath_bench.DatapathPlan(
        sizes=[N], modes=modes, k=K, rounds=1, crr_per_round=200, position_conns=POSITION_CONNS,
        udp_per_round=60, stream_seconds=0.2, changes=2, warmup=20, apply_timeout=60, udp_every=1,
    )
    workdir = tmp_path_factory.mktemp("bench")
    records = datapath_bench.run_size(plan, N, loadgen.build(workdir / "bin"), workdir, {})
    return {
        "records": {r["mode"]: r for r in records},
        "leftover_netns": {n for n in netns_names() - netns_before if n.startswith("mlb")},
        "leftover_cgroups": bench_cgroups() - cgroups_before,
    }


def test_every_mode_ran_without_errors(smoke):
    records = smoke["records"]
    # direct, meshlet and nftables must run on any supported node; the iptables backends may be absent.
    assert {"direct", "meshlet", "nftables"} <= set(records)
    for mode, r in records.items():
        assert r["status"] == "ok", (mode, r.get("reason"))
        assert r["errors"] == {}, mode
        assert r["wrong_endpoint"] == 0, mode
        assert r["wrong_udp_reply_source"] == 0, mode
        assert r["connect_us"]["count"] == 200
        assert r["udp_us"]["count"] == 60 and r["udp_send_us"]["count"] == 60
        assert r["stream_gbit_s"] > 0


def test_every_mode_reaches_the_same_endpoint_set(smoke):
    services = {s.index: s for s in make_services(N, K, udp_every=1)}
    expected = None
    for mode, r in smoke["records"].items():
        reached = {(pos, ep) for pos, counts in r["reached_at_positions"].items() for ep in counts}
        expected = expected or reached
        assert reached == expected, mode
    # ...and that set is every endpoint of the three Services at the chain positions.
    assert len(expected) == 3 * K
    assert all(ep in {ip for s in services.values() for ip in s.endpoints} for _, ep in expected)


@pytest.mark.parametrize("mode", ["meshlet", "iptables-legacy", "iptables-nft", "nftables"])
def test_connections_are_balanced_across_endpoints(smoke, mode):
    r = smoke["records"].get(mode)
    if r is None and mode.startswith("iptables"):
        pytest.skip(f"{mode} is not installed here")
    assert r is not None, f"{mode} did not run"
    for position, counts in r["reached_at_positions"].items():
        assert len(counts) == K, (position, counts)
        expected = POSITION_CONNS / K
        chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert chi2 < CHI2_CRITICAL, (mode, position, counts)


def test_an_endpoint_change_reaches_every_mode(smoke):
    for mode, r in smoke["records"].items():
        if mode == "direct":
            continue
        after = r["after_change"]
        assert after["errors"] == 0, mode
        assert set(after["reached"]) == set(after["expected"]), mode
        assert len(r["apply_change_s"]) == 2, mode


def test_program_times_with_and_without_passive_health_are_measured(smoke):
    # The bench rows of issue 12: the connect program's time with and without the health check,
    # and the sock_ops program's time per connection (bpf_stats).
    for mode in ("meshlet", "meshlet-no-health"):
        r = smoke["records"][mode]
        assert r["program_ns_per_connect"] > 0, mode
        assert r["sockops_ns_per_connect"] > 0, mode


def test_frontend_miss_and_udp_program_times_are_measured(smoke):
    # Issue 16's rows: connect4's time on connects to no frontend (each reached the very address
    # dialled, untouched), and sendmsg4's per new UDP socket's first datagram.
    for mode in ("meshlet", "meshlet-no-health"):
        r = smoke["records"][mode]
        assert r["miss_program_ns_per_connect"] > 0, mode
        assert r["wrong_miss_endpoint"] == 0, mode
        assert r["sendmsg_program_ns_per_datagram"] > 0, mode
    assert "miss_program_ns_per_connect" not in smoke["records"]["direct"]


def test_the_bench_removes_what_it_made(smoke):
    assert smoke["leftover_netns"] == set()
    assert smoke["leftover_cgroups"] == set()


def test_the_control_plane_harness_measures_the_child_and_the_real_agent():
    # Tiny N: checks the harness (the child's cold sync and changes, `meshlet run` against the
    # stand-in API server up to /readyz), not speed.
    from bench import controlplane

    cgroups_before = bench_cgroups()
    record = controlplane.run_one(20, 3, changes=4)
    assert record["status"] == "ok", record.get("note")
    assert record["frontends"] == 20
    assert record["change_ms"]["count"] == 4
    assert record["cold_sync_s"] > 0 and record["peak_rss_mib"] > 0
    agent = controlplane.agent_run(20, 3, timeout=120, through_full=False)
    assert agent.get("agent_ready_s", 0) > 0, agent.get("agent_note")
    assert agent["agent_peak_rss_mib"] >= agent["agent_rss_mib"] > 0
    assert bench_cgroups() - cgroups_before == set()


def test_the_idle_harness_measures_the_real_agent_on_a_node_tree():
    # A short window and few Services: checks the harness (the tree is built and seen by the
    # agent, its CPU is read, everything is removed), not the figure.
    from bench import idle

    cgroups_before = bench_cgroups()
    record = idle.run(seconds=2, pods=6, containers=2, system_services=4, services=5, k=2, settle=0.5,
                      ready_timeout=120)
    assert record["status"] == "ok", record.get("note")
    assert record["pods_found"] == 6
    assert record["cgroups"] > 6 * 3 + 4
    assert record["cpu_percent"] >= 0 and record["walk_ms"] > 0 and record["full_syncs"] >= 0
    # Only the idle harness's own subtrees: another bench may run beside this test.
    assert {c for c in bench_cgroups() - cgroups_before if c.endswith("-idle")} == set()


def test_the_churn_harness_measures_the_real_agents_event_to_map():
    # A tiny N, rate and window: checks the harness (changes reach the agent through the stand-in
    # API server's watch, its histogram and CPU are read, everything is removed), not the figure.
    from bench import churn

    cgroups_before = bench_cgroups()
    record = churn.run(services=20, rate=20, seconds=1, k=3, settle=0.2, ready_timeout=120)
    assert record["status"] == "ok", record.get("note")
    assert record["changes"] == 20 and record["observed"] == 20
    assert record["event_to_map_p99_le_ms"] is not None and record["cpu_percent"] >= 0
    assert record["full_syncs"] == 0  # a 1 s window holds no periodic full reconcile
    assert {c for c in bench_cgroups() - cgroups_before if c.endswith("-churn")} == set()
