"""RESULTS.md is generated from the JSON alone, and keeps the hand-written analysis."""

from pathlib import Path

from bench import report


def results():
    def rec(mode, p50, **extra):
        r = {"mode": mode, "services": 100, "status": "ok", "apply_full_s": 0.02, "conn_per_s": 9000.0,
             "connect_us": {"p01": 10.0, "p50": p50, "p90": p50 + 5, "p99": p50 + 20, "count": 10},
             "positions_us": {p: {"p50": p50, "count": 5} for p in ("start", "middle", "end")},
             "udp_us": {"p50": 20.0, "p99": 40.0, "count": 5}, "stream_gbit_s": 10.0,
             "wrong_endpoint": 0, "errors": {}}
        r.update(extra)
        return r

    return {
        "date": "2025-01-01 00:00:00 UTC",
        "stamp": "20250101-000000",
        "command": "python -m bench --short",
        "machine": {"cpu": "test cpu", "cores": 2, "memory_gib": 4.0, "kernel": "6.1", "os": "Debian",
                    "python": "3.11", "tools": {"nft": "nftables v1"}, "loadavg_start": (1.0, 1.0, 1.0)},
        "loadavg_end": (2.0, 2.0, 2.0),
        "note": "2 cores shared with other test runs",
        "datapath": [
            rec("direct", 20.0, apply_full_s=None),
            rec("meshlet", 20.2, apply_change={"p50": 0.0004}, program_ns_per_connect=1234.0,
                miss_program_ns_per_connect=87.0, sendmsg_program_ns_per_datagram=1456.0,
                sockops_ns_per_connect=300.0),
            rec("iptables-legacy", 40.0),
            {"mode": "nftables", "services": 100, "status": "timeout", "reason": "nft did not finish in 5 s",
             "apply_full_s": None, "apply_full_timeout_s": 5.0},
        ],
        "controlplane": [{"services": 1000, "resolve_s": 0.1, "plan_s": 0.05, "reconcile_s": 0.2,
                          "cold_sync_s": 0.3, "change_ms": {"p50": 0.5, "p99": 1.0, "count": 9},
                          "peak_rss_mib": 80.0, "agent_ready_s": 1.5, "agent_peak_rss_mib": 120.0,
                          "memory_mib": [["imports", 25.0, 25.0], ["resolved", 60.0, 61.0]]}],
    }


def test_markdown_has_machine_targets_and_every_record(tmp_path):
    md = tmp_path / "RESULTS.md"
    text = report.render_markdown(results(), [], None, md)
    assert "Kernel: 6.1" in text and "2 cores shared" in text
    assert "| meshlet connect p50 <= 1.03x direct at every N | **met** | N=100: 1.010x" in text
    assert "| 100 | meshlet | 0.020 s | 0.4 ms | 10.0 | 20.2 |" in text
    assert "| 100 | nftables | > 5 s (timed out) |" in text
    # prog ns, miss ns, sendmsg ns, sock_ops ns (issue 16's rows), then wrong/err.
    assert "| 10.00 | 1234 | 87 | 1456 | 300 | 0/0 |" in text
    assert "| frontend miss (a connect to no Service) <= 200 ns in connect4 at every N | **met** | N=100: 87 ns" in text
    assert "| 1000 | 0.100 s | 0.050 s | 0.200 s | 0.300 s | 0.50 ms | 1.00 ms | 80 MiB | 1.50 s | 120 MiB |" in text
    assert "- N=1000: imports 25 (25), resolved 60 (61)" in text


def test_regeneration_keeps_the_analysis(tmp_path):
    md = tmp_path / "RESULTS.md"
    report.write_markdown("first\n", md)
    md.write_text(md.read_text() + "\nWhy iptables is slow: a linear chain.\n")
    report.write_markdown("second\n", md)
    text = md.read_text()
    assert text.startswith("second\n") and "first" not in text
    assert text.count(report.ANALYSIS_MARKER) == 1 and "Why iptables is slow" in text


def test_the_idle_row_and_its_target():
    data = results()
    data["idle"] = [{"pods": 110, "containers": 3, "system_services": 150, "services": 1000,
                     "endpoints_per_service": 10, "seconds": 60, "cgroups": 594, "walk_ms": 4.8,
                     "pods_found": 110, "loadavg": (0.2, 0.3, 0.4), "cpu_percent": 0.21, "status": "ok",
                     "full_syncs": 0, "full_sync_s": 0.0, "check_steps": 31, "check_step_s": 0.021,
                     "check_step_max_le_ms": 1.0, "check_cycles": 1}]
    text = report.render_markdown(data, [], None)
    assert "| idle agent CPU on a busy node <= 0.5 % of one core | **met** | 0.21 % over 60 s" in text
    assert ("| 110 pods x 3 + 150 services (594 cgroups) | 1000 x 10 | 60 s | 0.21 % | 0 (0.00 s) | "
            "31 (0.02 s, <= 1.00 ms) | 110 | 4.8 ms | 1.9 % |" in text)


def test_the_churn_row():
    data = results()
    data["churn"] = [{"services": 10000, "endpoints_per_service": 10, "rate": 500, "seconds": 20, "status": "ok",
                      "changes": 10000, "sent_rate": 498.0, "observed": 10000, "cpu_percent": 14.03,
                      "loadavg": (1.0, 2.0, 3.0), "event_to_map_p50_le_ms": 2.5, "event_to_map_p90_le_ms": 10.0,
                      "event_to_map_p99_le_ms": 50.0, "within_10ms": 0.9284, "full_syncs": 1, "full_sync_s": 0.41}]
    text = report.render_markdown(data, [], None)
    assert ("| 10000 | 500/s | 20 s | 498/s | 10000 | <= 2.5 ms | <= 10.0 ms | <= 50.0 ms | 92.8 % | 14.0 % | "
            "1 (0.41 s) | - |" in text), "a record made before the check ran in steps: no check cell"
    assert "| 500 endpoint changes/s at N=50000: event-to-map p99 <= 10 ms | **not measured** |" in text


def test_the_check_window_is_the_difference_of_two_scrapes():
    from bench.agentproc import check_window

    def scrape(counts, total, cycles):
        bounds = ("0.001", "0.002", "0.005", "+Inf")
        return "\n".join([f'meshlet_map_check_step_seconds_bucket{{le="{le}"}} {c}' for le, c in zip(bounds, counts)]
                         + [f"meshlet_map_check_step_seconds_sum {total}",
                            f"meshlet_map_check_cycles_total {cycles}"])

    before = scrape((10, 10, 10, 10), 0.004, 1)
    after = scrape((40, 45, 45, 45), 0.030, 3)  # 35 steps more, the longest <= 2 ms
    assert check_window(before, after) == {"check_steps": 35, "check_step_s": 0.026, "check_step_max_le_ms": 2.0,
                                           "check_cycles": 2}
