"""Targets are judged only on what a run measured: met, not met, or not measured."""

from bench import targets
from bench.targets import MET, NOT_MEASURED, NOT_MET


def rec(mode, n, p50, p99=None, stream=10.0, status="ok", **extra):
    r = {"mode": mode, "services": n, "status": status, "stream_gbit_s": stream,
         "connect_us": {"p50": p50, "p99": p99 or p50 * 3, "count": 100}}
    r.update(extra)
    return r


def find(verdicts, words):
    (v,) = [v for v in verdicts if all(w in v.target for w in words)]
    return v


def test_latency_against_direct_at_every_n():
    data = [rec("direct", 100, 20.0), rec("meshlet", 100, 20.5), rec("direct", 1000, 20.0), rec("meshlet", 1000, 20.4)]
    verdicts = targets.judge(data, [])
    p50 = find(verdicts, ["connect p50", "direct"])
    assert p50.status == MET and "N=100: 1.025x" in p50.measured and "not run at N=10000,50000" in p50.measured
    data[-1] = rec("meshlet", 1000, 21.0)  # 1.05x at one N is enough to miss
    assert find(targets.judge(data, []), ["connect p50", "direct"]).status == NOT_MET


def test_throughput_is_higher_is_better():
    data = [rec("direct", 100, 20, stream=10.0), rec("meshlet", 100, 20, stream=9.95)]
    assert find(targets.judge(data, []), ["throughput"]).status == MET
    data[1]["stream_gbit_s"] = 9.8
    assert find(targets.judge(data, []), ["throughput"]).status == NOT_MET


def test_against_firewalls_needs_both_modes():
    data = [rec("meshlet", 10_000, 25.0), rec("iptables-legacy", 10_000, 60.0), rec("direct", 10_000, 24.0)]
    verdicts = targets.judge(data, [])
    assert find(verdicts, ["2.3x", "iptables-legacy"]).status == MET
    assert find(verdicts, ["4.0x"]).status == NOT_MEASURED
    data.append({"mode": "nftables", "services": 10_000, "status": "timeout", "reason": "nft did not finish in 600 s"})
    nft = find(targets.judge(data, []), ["nftables"])
    assert nft.status == NOT_MEASURED and "did not finish" in nft.measured
    data[1] = rec("iptables-legacy", 10_000, 50.0)
    assert find(targets.judge(data, []), ["2.3x"]).status == NOT_MET


def test_control_plane_targets():
    cp = [
        {"services": 10_000, "cold_sync_s": 0.8, "resolve_s": 0.3, "reconcile_s": 0.5, "peak_rss_mib": 120},
        {"services": 50_000, "cold_sync_s": 2.5, "change_ms": {"p99": 3.0, "count": 100}, "peak_rss_mib": 260},
    ]
    verdicts = targets.judge([], cp)
    assert find(verdicts, ["cold sync of 10000"]).status == MET
    assert find(verdicts, ["cold sync of 50000"]).status == NOT_MET
    assert find(verdicts, ["endpoint change"]).status == MET
    rss = find(verdicts, ["RSS"])
    assert rss.status == NOT_MET and "260" in rss.measured


def test_nothing_measured_is_never_met():
    assert {v.status for v in targets.judge([], [])} == {NOT_MEASURED}


def test_rss_prefers_the_real_agents_figure():
    cp = [{"services": 1000, "peak_rss_mib": 300, "agent_peak_rss_mib": 140}]
    rss = find(targets.judge([], cp), ["RSS"])
    assert rss.status == MET and "140" in rss.measured


def test_cold_sync_adds_resolve_and_reconcile_only():
    cp = [{"services": 10_000, "resolve_s": 0.4, "plan_s": 0.2, "reconcile_s": 0.5, "cold_sync_s": 0.9}]
    v = find(targets.judge([], cp), ["cold sync of 10000"])
    assert v.status == MET
    assert v.measured == "0.900 s (resolve 0.400 + reconcile 0.500, plan 0.200 inside)"


def idle_record(cpu_percent=None, **extra):
    r = {"pods": 110, "containers": 3, "system_services": 150, "services": 1000, "endpoints_per_service": 10,
         "seconds": 60, "cgroups": 594, "walk_ms": 4.8, "pods_found": 110, "loadavg": (0.2, 0.2, 0.2),
         "status": "ok"}
    if cpu_percent is not None:
        r["cpu_percent"] = cpu_percent
    r.update(extra)
    return r


def test_idle_cpu_is_judged_on_the_worst_run_and_never_met_unmeasured():
    (v,) = targets.judge_idle([idle_record(0.2), idle_record(0.7)])
    assert v.status == NOT_MET and "0.70 %" in v.measured and "110 pods x 3 containers" in v.measured
    assert targets.judge_idle([idle_record(0.3)])[0].status == MET
    (failed,) = targets.judge_idle([idle_record(status="failed", note="agent not ready: boom")])
    assert failed.status == NOT_MEASURED and "boom" in failed.measured
    assert targets.judge_idle([])[0].status == NOT_MEASURED


def churn_record(services=50_000, p99=5.0, cpu=20.0, **extra):
    r = {"services": services, "endpoints_per_service": 10, "rate": 500, "seconds": 60, "status": "ok",
         "changes": 30000, "sent_rate": 499.0, "observed": 30000, "cpu_percent": cpu, "loadavg": (1, 1, 1),
         "event_to_map_p50_le_ms": 2.5, "event_to_map_p90_le_ms": 5.0, "event_to_map_p99_le_ms": p99,
         "within_10ms": 0.995}
    r.update(extra)
    return r


def test_churn_is_judged_at_its_n_only():
    p99, cpu = targets.judge_churn([churn_record()])
    assert p99.status == MET and "p99 <= 5 ms (99.5 % within 10 ms)" in p99.measured
    assert cpu.status == MET and "20.0 %" in cpu.measured
    p99, cpu = targets.judge_churn([churn_record(p99=25.0, cpu=60.0)])
    assert (p99.status, cpu.status) == (NOT_MET, NOT_MET)
    (p99, _) = targets.judge_churn([churn_record(p99=None)])  # beyond the last bucket
    assert p99.status == NOT_MET and "more than the last bucket" in p99.measured
    assert {v.status for v in targets.judge_churn([churn_record(services=10_000)])} == {NOT_MEASURED}
    assert {v.status for v in targets.judge_churn([])} == {NOT_MEASURED}


def test_passive_health_cost_on_the_connect_program():
    data = [rec("meshlet", 100, 20, program_ns_per_connect=260.0),
            rec("meshlet-no-health", 100, 20, program_ns_per_connect=230.0)]
    v = find(targets.judge(data, []), ["passive health"])
    assert v.status == MET and "N=100: +30 ns" in v.measured
    data[0]["program_ns_per_connect"] = 340.0
    assert find(targets.judge(data, []), ["passive health"]).status == NOT_MET
    assert find(targets.judge(data[:1], []), ["passive health"]).status == NOT_MEASURED


def test_program_time_rows_of_issue_16():
    data = [rec("meshlet", 100, 20, program_ns_per_connect=900.0, miss_program_ns_per_connect=80.0,
                sendmsg_program_ns_per_datagram=1000.0),
            rec("meshlet", 10_000, 20, program_ns_per_connect=1400.0, miss_program_ns_per_connect=150.0)]
    verdicts = targets.judge(data, [])
    connect = find(verdicts, ["connect4 program", "translated"])
    assert connect.status == MET and "N=100: 900 ns; N=10000: 1400 ns" in connect.measured
    assert find(verdicts, ["frontend miss"]).status == MET
    sendmsg = find(verdicts, ["sendmsg4"])
    assert sendmsg.status == MET and "N=10000" not in sendmsg.measured
    data[1]["miss_program_ns_per_connect"] = 250.0  # one N above the bound is enough to miss
    data[1]["program_ns_per_connect"] = 1600.0
    verdicts = targets.judge(data, [])
    assert find(verdicts, ["frontend miss"]).status == NOT_MET
    assert find(verdicts, ["connect4 program", "translated"]).status == NOT_MET
    assert find(targets.judge([rec("meshlet", 100, 20)], []), ["sendmsg4"]).status == NOT_MEASURED
