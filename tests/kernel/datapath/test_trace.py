"""`meshlet trace` against real traffic: a real trace process, real connections from lab pods.

Root only (marked `kernel`): see conftest.py for what is made and removed. Each test starts
`meshlet trace ... -o json --count N` as its own process (the CLI a user runs), waits until it says
it is tracing, makes the connections and reads the decoded events the process printed. Traffic
that a filter must drop is sent before the traffic it must keep, so a filter that fails shows up
as a wrong first event.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.datapath import bpfsys, loader
from agent.datapath import layout as L
from agent.datapath import trace as T
from agent.model import RouteRef, Verdict

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SVC4, SVC6, OTHER4 = "10.96.0.10", "fd00:96::10", "10.96.0.11"
DEADLINE_S = 60


class Trace:
    """A running `meshlet trace` process."""

    def __init__(self, bpffs: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "trace", "--bpffs", bpffs, "-o", "json", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self.proc.stderr.readline()  # blocks until it says it traces, or it ends

    def ready(self) -> "Trace":
        assert "tracing" in self.first, (self.first, self.proc.stderr.read() if self.proc.poll() is not None else "")
        return self

    def events(self) -> tuple[list[dict], str]:
        out, err = self.proc.communicate(timeout=DEADLINE_S)
        assert self.proc.returncode == 0, self.first + err
        return [json.loads(line) for line in out.splitlines()], self.first + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=DEADLINE_S)


@pytest.fixture
def tracing(bpffs):
    started = []

    def start(*args: str) -> Trace:
        t = Trace(bpffs, *args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def write(datapath, shares, frontends, groups):
    datapath.reconcile(shares.state(frontends, groups, shares.clients()), shares.cgroups())


def endpoint(shares, name: str, family: int = 4) -> str:
    address = shares.address(name, family)
    return f"[{address}]:{shares.ECHO_PORT}" if family == 6 else f"{address}:{shares.ECHO_PORT}"


def control(bpffs: str) -> L.TraceControl:
    with bpfsys.Map.open_pinned(loader.map_pin(bpffs, "trace_control")) as m:
        return L.TraceControl.from_buffer_copy(m.lookup(bytes(L.U32(0))))


def test_a_forwarded_connection_shows_pod_frontend_backend_endpoint_and_verdict(datapath, shares, client, tracing):
    web = shares.group("web", ["web-1"])
    web6 = shares.group("web", ["web-2"], family=6)
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web)),
                             shares.fe(SVC6, 80): shares.split((1, web6))}, [web, web6])
    t = tracing("--count", "2").ready()
    client.client("tcp", SVC4, 80, 1)
    client.client("tcp", SVC6, 80, 1)
    (v4, v6), _ = t.events()
    assert v4["client"] == "default/client" and v4["kind"] == "connect"
    assert (v4["frontend"], v4["protocol"], v4["scope"], v4["route"]) == (f"{SVC4}:80", "TCP", "", "")
    assert (v4["backend"], v4["endpoint"]) == ("shop/web:http/tcp/v4", endpoint(shares, "web-1"))
    assert (v4["verdict"], v4["errno"]) == ("forward", "")
    assert v4["netns_cookie"] != 0 and abs(v4["time"] - time.time()) < 3600
    assert (v6["frontend"], v6["backend"], v6["endpoint"]) == (
        f"[{SVC6}]:80", "shop/web:http/tcp/v6", endpoint(shares, "web-2", 6))
    assert v6["netns_cookie"] == v4["netns_cookie"], "same pod, same network namespace"


def test_a_rejected_and_an_unreachable_connection_show_their_errno(datapath, shares, client, tracing):
    local = shares.group("local", [], verdict=Verdict.UNREACHABLE)
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split(),  # no backendRefs: rejected
                             shares.fe(OTHER4, 80): shares.split((1, local), service="local")}, [local])
    t = tracing("--count", "2").ready()
    assert client.client("tcp", SVC4, 80, 1)["errors"] == {"ECONNREFUSED": 1}
    assert client.client("tcp", OTHER4, 80, 1)["errors"] == {"EHOSTUNREACH": 1}
    (rejected, unreachable), _ = t.events()
    assert (rejected["frontend"], rejected["verdict"], rejected["errno"], rejected["endpoint"]) == (
        f"{SVC4}:80", "reject", "ECONNREFUSED", "")
    assert (unreachable["frontend"], unreachable["backend"], unreachable["verdict"], unreachable["errno"]) == (
        f"{OTHER4}:80", "shop/local:http/tcp/v4", "unreachable", "EHOSTUNREACH")


def test_a_pod_that_opted_out_shows_as_skipped(datapath, shares, lab, tracing):
    web = shares.group("web", ["web-1"])
    datapath.reconcile(shares.state({shares.fe(SVC4, 80): shares.split((1, web))}, [web], shares.clients(("skipper",))),
                       shares.cgroups())
    t = tracing("--count", "1").ready()
    lab.pod("quiet/skipper").client("tcp", SVC4, 80, 1)  # untranslated: ENETUNREACH from the lab node
    (event,), _ = t.events()
    assert (event["client"], event["frontend"], event["verdict"], event["endpoint"], event["errno"]) == (
        "quiet/skipper", f"{SVC4}:80", "skip", "", "")


def test_a_udp_flow_is_one_event_its_later_datagrams_none(datapath, shares, client, tracing):
    dns = shares.group("dns", ["web-3"], protocol="UDP")
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 53, "UDP"): shares.split((1, dns), service="dns"),
                             shares.fe(SVC4, 80): shares.split((1, web))}, [dns, web])
    t = tracing("--count", "2").ready()
    assert client.client("udp", SVC4, 53, 5, "--unconnected")["errors"] == {}
    client.client("tcp", SVC4, 80, 1)  # the marker: the next event after the flow's one
    (flow, marker), _ = t.events()
    assert (flow["kind"], flow["frontend"], flow["protocol"], flow["endpoint"], flow["verdict"]) == (
        "datagram", f"{SVC4}:53", "UDP", endpoint(shares, "web-3"), "forward")
    assert marker["frontend"] == f"{SVC4}:80", "5 datagrams of one flow are one decision"


def test_a_consumer_route_shows_its_scope_and_route(datapath, shares, lab, tracing):
    web = shares.group("web", ["web-1"])
    canary = shares.group("web-canary", ["web-3"])
    route = RouteRef("HTTPRoute", "team-a", "canary")
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web)),
                             shares.fe(SVC4, 80, scope="team-a"): shares.split((1, canary), route=route)},
          [web, canary])
    t = tracing("--count", "1").ready()
    lab.pod("team-a/consumer").client("tcp", SVC4, 80, 1)
    (event,), _ = t.events()
    assert (event["client"], event["scope"], event["route"]) == ("team-a/consumer", "team-a", str(route))
    assert (event["backend"], event["endpoint"]) == ("shop/web-canary:http/tcp/v4", endpoint(shares, "web-3"))


def test_filters_run_in_the_kernel_and_drop_what_was_not_asked(datapath, shares, client, lab, tracing, bpffs):
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web)),
                             shares.fe(SVC4, 81): shares.split((1, web)),
                             shares.fe(OTHER4, 80): shares.split()}, [web])
    t = tracing("--from", "default/client", "--to", f"{SVC4}:80/tcp", "--verdict", "forward", "--count", "1").ready()
    # A ring buffer can be watched without taking it over (a perf buffer cannot: the trace owns
    # it, and the first event it prints being the kept one shows the same there).
    ring = T.Ring(bpffs) if os.path.exists(loader.map_pin(bpffs, "trace_events")) else None
    try:
        before = ring and ring.producer
        lab.pod("team-a/consumer").client("tcp", SVC4, 80, 2)  # another pod
        client.client("tcp", SVC4, 81, 2)  # another port
        client.client("tcp", OTHER4, 80, 2)  # another address, and a reject
        assert (ring and ring.producer) == before, "filtered decisions never reach the ring buffer"
        client.client("tcp", SVC4, 80, 1)
        (event,), err = t.events()
    finally:
        if ring:
            ring.close()
    assert (event["client"], event["frontend"], event["verdict"]) == ("default/client", f"{SVC4}:80", "forward")
    assert "1 events; tracing is off" in err and "lost" not in err


def test_tracing_is_off_after_exit_and_after_a_killed_trace_s_lease(datapath, shares, client, tracing, bpffs):
    web = shares.group("web", ["web-1"])
    write(datapath, shares, {shares.fe(SVC4, 80): shares.split((1, web))}, [web])

    done = tracing("--count", "1").ready()
    client.client("tcp", SVC4, 80, 1)
    done.events()
    assert control(bpffs).expires_ns == 0, "a trace that ends switches tracing off"

    killed = tracing().ready()
    assert control(bpffs).expires_ns > T.monotonic_ns()
    second = tracing()
    assert second.proc.wait(timeout=DEADLINE_S) == 2 and "another `meshlet trace` is running" in (
        second.first + second.proc.stderr.read())
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(timeout=DEADLINE_S)
    expires, dropped = control(bpffs).expires_ns, control(bpffs).dropped
    assert expires > 0, "a killed trace cannot clean up: its lease is what ends it"
    deadline = time.monotonic() + DEADLINE_S
    while T.monotonic_ns() <= expires:
        assert time.monotonic() < deadline, "the lease never ended"
        time.sleep(0.2)  # polling the kernel's clock against the lease, not synchronising
    reader = T.open_channel(bpffs)  # the killed trace's perf buffers left the array with it
    try:
        reader.skip_pending()
        client.client("tcp", SVC4, 80, 3)
        assert list(reader.records()) == [], "no event after the lease ended"
        assert control(bpffs).dropped == dropped, "and none dropped either: none was sent"
    finally:
        reader.close()
