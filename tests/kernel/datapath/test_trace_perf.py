"""`meshlet trace` through its perf-buffer fallback, against real traffic, on this kernel.

Root only (marked `kernel`). A kernel without BPF ring buffers (Linux < 5.8) sends trace events
to a perf event array instead (features.Support.trace_channel). This kernel has ring buffers, so
this module opens a datapath of its own (its own lab and pins, removed afterwards) with the test
knob MESHLET_PRETEND_NO_RINGBUF=1, which makes the probe answer "no ring buffer": the programs
are compiled for the fallback, exactly as on an older kernel. The trace tests of test_trace.py
run here again, unchanged, against it (imported below: a forward, a reject and an unreachable,
a UDP flow, a consumer route, a skip, the filters, tracing off after exit and after a killed
trace's lease, a second trace refused); the tests written here add what only the fallback has.
"""

import json
import os
import sys

import pytest

from agent.datapath import features, loader
from agent.datapath import layout as L
from agent.datapath import trace as T
from test_trace import (  # noqa: F401  (collected again here, with this module's datapath)
    SVC4,
    test_a_consumer_route_shows_its_scope_and_route,
    test_a_forwarded_connection_shows_pod_frontend_backend_endpoint_and_verdict,
    test_a_pod_that_opted_out_shows_as_skipped,
    test_a_rejected_and_an_unreachable_connection_show_their_errno,
    test_a_udp_flow_is_one_event_its_later_datagrams_none,
    test_filters_run_in_the_kernel_and_drop_what_was_not_asked,
    test_tracing_is_off_after_exit_and_after_a_killed_trace_s_lease,
    tracing,
    write,
)

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def world(make_world):
    lab_of_pods, pins, attached_datapath = make_world
    with lab_of_pods("tp") as lab, pins() as bpffs, pytest.MonkeyPatch.context() as env:
        env.setenv(features.PRETEND_NO_RINGBUF_ENV, "1")
        with attached_datapath(lab, bpffs) as dp:
            env.delenv(features.PRETEND_NO_RINGBUF_ENV)
            yield lab, bpffs, dp


@pytest.fixture(scope="module")
def lab(world):
    return world[0]


@pytest.fixture(scope="module")
def bpffs(world):
    return world[1]


@pytest.fixture(scope="module")
def datapath(world):
    return world[2]


def test_the_knob_makes_the_programs_send_to_a_perf_event_array(datapath, bpffs):
    assert datapath.support.trace_channel == L.TRACE_PERF
    assert datapath.support.log_fields()["trace_channel"] == "perf"
    assert os.path.exists(loader.map_pin(bpffs, "trace_perf"))
    assert not os.path.exists(loader.map_pin(bpffs, "trace_events")), "one channel pinned: the programs' one"


def connect_on_one_cpu(pod, cpu: int, count: int) -> dict:
    """`count` connections to SVC4:80 from a client process that runs on `cpu` only: each decision
    goes to that CPU's perf buffer."""
    done = pod.run(["taskset", "-c", str(cpu), sys.executable, "-m", "agent.lab.client", "tcp", SVC4, "80",
                    "--count", str(count)], timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_decisions_that_find_a_perf_buffer_full_are_counted_as_dropped(datapath, shares, client, bpffs):
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web))}, [web])
    with open("/sys/devices/system/cpu/online") as f:
        cpu = T.online_cpus(f.read())[0]
    connections = 100
    control = T.Control(bpffs)
    buffers = T.PerfBuffers(bpffs, pages=1)  # one page a CPU: 39 decisions (104-byte records)
    try:
        dropped_before = control.dropped
        control.start(T.Filter(), T.monotonic_ns() + 600 * 10**9)  # no renewal here: a long lease
        assert connect_on_one_cpu(client, cpu, connections)["errors"] == {}  # nothing read meanwhile
        received = [T.decode(r, {}, str, 0) for r in buffers.records()]
        dropped = control.dropped - dropped_before
        # The next decision on that CPU finds room again; the perf core writes its loss report first.
        assert connect_on_one_cpu(client, cpu, 1)["errors"] == {}
        control.off()
        later = list(buffers.records())
        assert connect_on_one_cpu(client, cpu, 1)["errors"] == {}  # tracing is off: nothing more
        assert list(buffers.records()) == [] and control.dropped - dropped_before == dropped
    finally:
        control.off()
        buffers.close()
        control.close()
    assert 0 < len(received) < connections and dropped > 0
    assert len(received) + dropped == connections, "every decision was either received or counted"
    assert {e.frontend for e in received} == {f"{SVC4}:80"}
    assert len(later) == 1 and buffers.lost == dropped, "PERF_RECORD_LOST reports the same decisions"
