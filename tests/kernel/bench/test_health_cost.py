"""Smoke run of the passive-health cost bench row (bench/health_cost.py) at tiny scale: the row works.

Root only (marked `kernel`): real programs, real connects (bench.loadgen), the kernel's bpf_stats.
No speed is asserted (speed targets live in bench/); the test checks that each state was measured
(connect4 and sockops), that the ejected endpoint was really skipped in its state and picked in
the others, and that the run restores bpf_stats and leaves no pins behind.
"""

import glob
from pathlib import Path

import pytest

from bench import health_cost

pytestmark = pytest.mark.kernel


def test_the_health_cost_row_measures_each_state_and_the_ejection_is_skipped():
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    pins_before = set(glob.glob("/sys/fs/bpf/meshlet-bench-health-*"))
    record = health_cost.run(rounds=1, connects=150)
    assert set(record["ns_per_connect"]) == set(health_cost.STATES)
    assert all(ns > 0 for state in record["ns_per_connect"].values() for ns in state.values()), record
    ejected = health_cost.ENDPOINTS[2]
    assert ejected not in record["reached"]["on, one ejected"], record["reached"]
    assert set(record["reached"]["on"]) == set(health_cost.ENDPOINTS), "chance to miss one: (2/3)^150"
    assert "| on, one ejected |" in health_cost.markdown(record)
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    assert set(glob.glob("/sys/fs/bpf/meshlet-bench-health-*")) == pins_before
