"""Smoke run of the trace-cost bench row (bench/trace_cost.py) at tiny scale: the row works.

Root only (marked `kernel`): real programs, real connects (bench.loadgen), the kernel's bpf_stats.
No speed is asserted (speed targets live in bench/); the test checks that each state was measured
over exactly the connects made, that only the "on" states put events in the ring or the perf
buffers (the filtered-out trace sent none), and that the run restores bpf_stats and leaves no
pins behind.
"""

import glob
from pathlib import Path

import pytest

from bench import trace_cost

pytestmark = pytest.mark.kernel

CONNECTS = 100


def test_the_trace_cost_row_measures_each_state_and_only_on_sends_events():
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    pins_before = set(glob.glob("/sys/fs/bpf/meshlet-bench-trace-*"))
    record = trace_cost.run(rounds=1, connects=CONNECTS)
    assert set(record["ns_per_connect"]) == set(trace_cost.STATES)
    assert all(ns > 0 for ns in record["ns_per_connect"].values()), record
    assert record["events"] == CONNECTS, "one event per connect while on; none while filtered out or off"
    assert record["dropped"] == 0
    assert (record["perf_events"], record["perf_dropped"]) == (CONNECTS, 0), "the perf-buffer fallback's row too"
    assert "| on, filtered out |" in trace_cost.markdown(record)
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    assert set(glob.glob("/sys/fs/bpf/meshlet-bench-trace-*")) == pins_before
