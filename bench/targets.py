"""The targets of issue 6 and how a run's records are judged against them. Pure.

Datapath records are the dicts of bench.datapath_bench (one per mode and N); control-plane records
those of bench.controlplane (one per N). Every target is judged only on what the run measured:
a target whose inputs are missing is "not measured", never "met"; a target "at every N" says
which N it covered.
"""

from __future__ import annotations

from dataclasses import dataclass

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"

#: meshlet's per-connection cost against direct connections, at every N.
LATENCY_VS_DIRECT = 1.03
THROUGHPUT_VS_DIRECT = 0.99
#: (mode, N, factor): meshlet's p50 connect latency at least `factor` times lower.
AGAINST_FIREWALLS = (
    ("iptables-legacy", 10_000, 2.3),
    ("iptables-legacy", 50_000, 4.0),
    ("nftables", 10_000, 1.15),
)
COLD_SYNC_SECONDS = ((10_000, 1.0), (50_000, 2.0))
CHANGE_P99_MS = (50_000, 5.0)
RSS_MIB = 250
#: Issue 16: the agent's CPU, in % of one core, on a busy node where nothing changes (bench.idle).
IDLE_CPU_PERCENT = 0.5
#: Issue 16's churn row (bench.churn): at N Services, `rate` endpoint changes a second, event-to-map
#: p99 <= this many ms and the agent's CPU under this % of one core.
CHURN = {"services": 50_000, "rate": 500, "p99_ms": 10.0, "cpu_percent": 50.0}
#: Issue 12: what passive health may add to the connect program, in ns per connect() (bpf_stats:
#: meshlet against meshlet-no-health, measured in the same run).
HEALTH_CHECK_NS = 100
#: Issue 16: ns inside meshlet's programs (bpf_stats), at every N: connect4 per translated connect,
#: connect4 per connect to an address that is no frontend (what every other connection on the node
#: pays), sendmsg4 per first datagram of a new UDP socket (the same pick as a connect: the same bound).
CONNECT_PROGRAM_NS = 1500
FRONTEND_MISS_NS = 200
SENDMSG_PROGRAM_NS = 1500
ALL_SIZES = (100, 1_000, 10_000, 50_000)
#: The control plane is judged at these N (issue 6).
CONTROL_PLANE_SIZES = (1_000, 10_000, 50_000)


@dataclass(frozen=True)
class Verdict:
    target: str
    status: str
    measured: str


def measured(records: list[dict], mode: str, n: int) -> dict | None:
    """The record of `mode` at N when it ran and measured connections, else None."""
    for r in records:
        if r["mode"] == mode and r["services"] == n and r.get("status") == "ok" and r.get("connect_us", {}).get("count"):
            return r
    return None


def _coverage(sizes, expected=ALL_SIZES) -> str:
    missing = [n for n in expected if n not in sizes]
    return f" (not run at N={','.join(map(str, missing))})" if missing else ""


def _vs_direct(records, value, limit: float, higher_is_better: bool, label: str) -> Verdict:
    parts, missed, covered = [], False, []
    for n in sorted({r["services"] for r in records}):
        mesh, direct = measured(records, "meshlet", n), measured(records, "direct", n)
        if not mesh or not direct or value(mesh) is None or value(direct) is None:
            continue
        ratio = value(mesh) / value(direct)
        covered.append(n)
        parts.append(f"N={n}: {ratio:.3f}x")
        missed |= ratio < limit if higher_is_better else ratio > limit
    if not covered:
        return Verdict(label, NOT_MEASURED, "meshlet or direct not measured")
    return Verdict(label, NOT_MET if missed else MET, "; ".join(parts) + _coverage(covered))


def _health_check_cost(records) -> Verdict:
    label = f"passive health adds < {HEALTH_CHECK_NS} ns to the connect program at every N"
    parts, missed, covered = [], False, []
    for n in sorted({r["services"] for r in records}):
        on, off = measured(records, "meshlet", n), measured(records, "meshlet-no-health", n)
        if not on or not off or on.get("program_ns_per_connect") is None \
                or off.get("program_ns_per_connect") is None:
            continue
        added = on["program_ns_per_connect"] - off["program_ns_per_connect"]
        covered.append(n)
        parts.append(f"N={n}: {added:+.0f} ns")
        missed |= added >= HEALTH_CHECK_NS
    if not covered:
        return Verdict(label, NOT_MEASURED, "meshlet or meshlet-no-health program time not measured")
    return Verdict(label, NOT_MET if missed else MET, "; ".join(parts) + _coverage(covered))


def _program_time(records, field: str, limit: float, label: str) -> Verdict:
    """meshlet's `field` (ns, bpf_stats) <= limit at every N it was measured."""
    parts, missed, covered = [], False, []
    for n in sorted({r["services"] for r in records}):
        mesh = measured(records, "meshlet", n)
        if not mesh or mesh.get(field) is None:
            continue
        covered.append(n)
        parts.append(f"N={n}: {mesh[field]:.0f} ns")
        missed |= mesh[field] > limit
    if not covered:
        return Verdict(label, NOT_MEASURED, "meshlet program time not measured")
    return Verdict(label, NOT_MET if missed else MET, "; ".join(parts) + _coverage(covered))


def judge(datapath: list[dict], controlplane: list[dict]) -> list[Verdict]:
    verdicts = [
        _vs_direct(datapath, lambda r: r["connect_us"]["p50"], LATENCY_VS_DIRECT, False,
                   f"meshlet connect p50 <= {LATENCY_VS_DIRECT}x direct at every N"),
        _vs_direct(datapath, lambda r: r["connect_us"]["p99"], LATENCY_VS_DIRECT, False,
                   f"meshlet connect p99 <= {LATENCY_VS_DIRECT}x direct at every N"),
        _vs_direct(datapath, lambda r: r.get("stream_gbit_s"), THROUGHPUT_VS_DIRECT, True,
                   f"meshlet stream throughput >= {THROUGHPUT_VS_DIRECT}x direct"),
    ]
    verdicts.append(_health_check_cost(datapath))
    verdicts += [
        _program_time(datapath, "program_ns_per_connect", CONNECT_PROGRAM_NS,
                      f"connect4 program <= {CONNECT_PROGRAM_NS} ns per translated connect at every N"),
        _program_time(datapath, "miss_program_ns_per_connect", FRONTEND_MISS_NS,
                      f"frontend miss (a connect to no Service) <= {FRONTEND_MISS_NS} ns in connect4 at every N"),
        _program_time(datapath, "sendmsg_program_ns_per_datagram", SENDMSG_PROGRAM_NS,
                      f"sendmsg4 program <= {SENDMSG_PROGRAM_NS} ns per new UDP socket's first datagram at every N"),
    ]
    for mode, n, factor in AGAINST_FIREWALLS:
        label = f"p50 connect >= {factor}x lower than {mode} at N={n}"
        mesh, other = measured(datapath, "meshlet", n), measured(datapath, mode, n)
        if not mesh or not other:
            failed = [r for r in datapath if r["mode"] == mode and r["services"] == n and r.get("reason")]
            why = f"{mode}: {failed[0]['reason']}" if failed else "not run at this N"
            verdicts.append(Verdict(label, NOT_MEASURED, why))
            continue
        ratio = other["connect_us"]["p50"] / mesh["connect_us"]["p50"]
        verdicts.append(Verdict(label, MET if ratio >= factor else NOT_MET,
                                f"{ratio:.2f}x ({other['connect_us']['p50']} us vs {mesh['connect_us']['p50']} us)"))
    by_n = {r["services"]: r for r in controlplane if r.get("status", "ok") == "ok"}
    for n, limit in COLD_SYNC_SECONDS:
        label = f"cold sync of {n} Services x 10 endpoints <= {limit:g} s"
        r = by_n.get(n)
        if not r or r.get("cold_sync_s") is None:
            verdicts.append(Verdict(label, NOT_MEASURED, "not run at this N"))
            continue
        verdicts.append(Verdict(label, MET if r["cold_sync_s"] <= limit else NOT_MET,
                                f"{r['cold_sync_s']:.3f} s ({cold_sync_parts(r)})"))
    n, limit = CHANGE_P99_MS
    label = f"one endpoint change at N={n}: p99 <= {limit:g} ms"
    r = by_n.get(n)
    if not r or not r.get("change_ms", {}).get("count"):
        verdicts.append(Verdict(label, NOT_MEASURED, "not run at this N"))
    else:
        p99 = r["change_ms"]["p99"]
        verdicts.append(Verdict(label, MET if p99 <= limit else NOT_MET,
                                f"p99 {p99:.2f} ms over {r['change_ms']['count']} changes"))
    # The real agent's own figure when `meshlet run` was measured (its peak through a periodic
    # full reconcile when the run went that far), else the bench child's.
    rss = [(r["services"], agent_peak_rss(r) or r["peak_rss_mib"]) for r in controlplane
           if agent_peak_rss(r) or r.get("peak_rss_mib")]
    label = f"peak RSS of the agent process <= {RSS_MIB} MiB"
    if not rss:
        verdicts.append(Verdict(label, NOT_MEASURED, "no control-plane run"))
    else:
        worst_n, worst = max(rss, key=lambda item: item[1])
        verdicts.append(Verdict(label, MET if worst <= RSS_MIB else NOT_MET,
                                f"max {worst:.0f} MiB (at N={worst_n})"
                                + _coverage([n for n, _ in rss], CONTROL_PLANE_SIZES)))
    return verdicts


def judge_idle(idle: list[dict]) -> list[Verdict]:
    """Issue 16: the agent's CPU on a busy node where nothing changes (bench.idle records)."""
    label = f"idle agent CPU on a busy node <= {IDLE_CPU_PERCENT:g} % of one core"
    runs = [r for r in idle if r.get("cpu_percent") is not None]
    if not runs:
        failed = [r for r in idle if r.get("note")]
        return [Verdict(label, NOT_MEASURED, failed[0]["note"] if failed else "not run")]
    worst = max(runs, key=lambda r: r["cpu_percent"])
    return [Verdict(label, MET if worst["cpu_percent"] <= IDLE_CPU_PERCENT else NOT_MET,
                    f"{worst['cpu_percent']:.2f} % over {worst['seconds']:g} s ({idle_setup(worst)})")]


def judge_churn(churn: list[dict]) -> list[Verdict]:
    """Issue 16: event-to-map p99 and the agent's CPU under steady endpoint churn (bench.churn)."""
    n, rate = CHURN["services"], CHURN["rate"]
    p99_label = f"{rate} endpoint changes/s at N={n}: event-to-map p99 <= {CHURN['p99_ms']:g} ms"
    cpu_label = f"{rate} endpoint changes/s at N={n}: agent CPU < {CHURN['cpu_percent']:g} % of one core"
    runs = [r for r in churn if r.get("services") == n and r.get("rate") == rate and r.get("observed")]
    if not runs:
        why = "not run at this N and rate" + "".join(f"; {r['note']}" for r in churn if r.get("note"))
        return [Verdict(p99_label, NOT_MEASURED, why), Verdict(cpu_label, NOT_MEASURED, why)]
    r = runs[0]
    p99 = r.get("event_to_map_p99_le_ms")
    p99_ok = p99 is not None and p99 <= CHURN["p99_ms"]
    return [
        Verdict(p99_label, MET if p99_ok else NOT_MET,
                f"p99 <= {_ms(p99)} ({100 * r['within_10ms']:.1f} % within 10 ms) over {r['observed']} changes "
                f"at {r['sent_rate']:g}/s"),
        Verdict(cpu_label, MET if r["cpu_percent"] < CHURN["cpu_percent"] else NOT_MET,
                f"{r['cpu_percent']:.1f} % over {r['seconds']:g} s"),
    ]


def _ms(bound: float | None) -> str:
    return "more than the last bucket" if bound is None else f"{bound:g} ms"


def idle_setup(r: dict) -> str:
    return (f"{r['pods']} pods x {r['containers']} containers, {r['system_services']} system services, "
            f"{r['services']} Services x {r['endpoints_per_service']}")


def agent_peak_rss(r: dict) -> float | None:
    """The agent's VmHWM: after its first periodic full reconcile if measured, else after ready."""
    return r.get("agent_peak_rss_after_full_mib") or r.get("agent_peak_rss_mib")


def cold_sync_parts(r: dict) -> str:
    """Cold sync is resolve + reconcile; plan runs inside reconcile and is shown as such."""
    if r.get("resolve_s") is None or r.get("reconcile_s") is None:
        return "total"
    inside = f", plan {r['plan_s']:.3f} inside" if r.get("plan_s") is not None else ""
    return f"resolve {r['resolve_s']:.3f} + reconcile {r['reconcile_s']:.3f}{inside}"
