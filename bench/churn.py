"""The churn benchmark: endpoint changes at a steady rate into the real agent (issue 16).

`run` starts the real agent (`meshlet run`, Kubernetes mode against the tests' stand-in API
server, bench.agentproc) on N Services x k endpoints, waits for /readyz and a settling pause,
then replaces one endpoint of one EndpointSlice `rate` times a second for `seconds` (the
stand-in server's update, which its watch streams carry to the agent), on a fixed schedule that
catches up when it falls behind. It then waits until the agent has written every change.

Figures:
- event-to-map: the agent's own histogram (meshlet_event_to_map_seconds: from the change
  reaching the agent to the end of the sync that wrote it), the observations of the window
  alone (the difference of two scrapes); percentiles are bucket upper bounds ("<= 5 ms");
- agent CPU: utime + stime from /proc over the window until the last change was written, in %
  of one core;
- the rate really sent (the bench process shares the machine);
- the full reconciles inside the window and their seconds (meshlet_sync_duration_seconds,
  mode="full"): changes arriving while one runs wait for its end (none unless drift was found);
- the periodic map check's steps inside the window, their seconds and the longest one's bucket
  (a change arriving during a step waits for its end).

May touch: what bench.agentproc does; a cgroup subtree of the lab's (empty: no pods).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.agentproc import check_window, full_syncs, histogram_buckets, start_agent
from bench.synth import make_services, with_endpoint_replaced
from bench.topology import Lab

#: Issue 16's churn row.
SERVICES, RATE, SECONDS = 50_000, 500, 60.0
HISTOGRAM = "meshlet_event_to_map_seconds"


def run(services: int = SERVICES, rate: float = RATE, seconds: float = SECONDS, k: int = 10,
        settle: float = 5.0, ready_timeout: float = 600.0, catch_up_timeout: float = 60.0) -> dict:
    """One churn measurement; the record's `status` says whether it ran."""
    from bench import controlplane as cp

    record = {"services": services, "endpoints_per_service": k, "rate": rate, "seconds": seconds, "status": "ok"}
    with Lab() as lab, tempfile.TemporaryDirectory() as scratch:
        svcs = make_services(services, k, udp_every=0)
        cluster = [cp.namespace_object()] + cp.objects(svcs)
        agent = start_agent(lab, Path(scratch), cluster, lab.cgroup_subtree("churn"), "churn", ready_timeout)
        del cluster
        if isinstance(agent, str):
            return record | {"status": "failed", "note": agent}
        time.sleep(settle)  # start-up work (first full sync, collector) is not churn cost
        before_text = text = agent.metrics_text()
        before = histogram_buckets(text, HISTOGRAM)
        full_before = full_syncs(text)
        cpu_before, start = agent.cpu_seconds(), time.monotonic()
        sent = 0
        total = int(rate * seconds)
        while sent < total:
            due = start + sent / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            old = svcs[sent % services]
            svcs[old.index] = new = with_endpoint_replaced(old, sent)
            change = cp.slice_object(new, generation=sent + 2)
            del change["metadata"]["resourceVersion"]  # the server's to give
            agent.apiserver.update(change)
            sent += 1
        sent_s = time.monotonic() - start
        # Until the agent has written what was sent (changes to one object may coalesce into one
        # observation, hence also "no new observation for a second").
        deadline, last, last_change = time.monotonic() + catch_up_timeout, -1.0, time.monotonic()
        while time.monotonic() < deadline:
            text = agent.metrics_text()
            buckets = histogram_buckets(text, HISTOGRAM)
            observed = buckets.get(float("inf"), 0) - before.get(float("inf"), 0)
            if observed >= sent:
                break
            if observed != last:
                last, last_change = observed, time.monotonic()
            elif time.monotonic() - last_change > 1.0:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        cpu = agent.cpu_seconds() - cpu_before
        full_after = full_syncs(text)
        record.update(full_syncs=int(full_after[0] - full_before[0]),
                      full_sync_s=round(full_after[1] - full_before[1], 3), **check_window(before_text, text))
        record.update(changes=sent, sent_rate=round(sent / sent_s, 1), cpu_percent=round(100 * cpu / elapsed, 2),
                      loadavg=os.getloadavg(), **event_to_map(before, buckets))
    return record


def event_to_map(before: dict[float, float], after: dict[float, float]) -> dict:
    """Observations between two scrapes of the histogram: count and bucket-bound percentiles."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    count = delta.get(float("inf"), 0)
    out = {"observed": int(count)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        bound = next((le for le, cumulative in delta.items() if count and cumulative >= q * count), None)
        out[f"event_to_map_{name}_le_ms"] = None if bound is None or bound == float("inf") else bound * 1000
    out["within_10ms"] = round(delta.get(0.01, 0) / count, 4) if count else None
    return out
