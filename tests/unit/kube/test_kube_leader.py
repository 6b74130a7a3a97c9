"""Leader election over a Lease on the stand-in API server: one writer, hand-over within the lease.

Timings are shrunk (lease 2 s, renew 0.5 s, retry 0.2 s) so that hand-overs take seconds; the
rules checked are the ones the defaults (15 s / 5 s / 2 s) rely on.
"""

from __future__ import annotations

import threading
import time

import pytest

from agent.runtime.leader import LeaderElector
from kube_testing import wait_until

LEASE, RENEW, RETRY = 2, 0.5, 0.2
NAMESPACE = "meshlet-system"


class Timeline:
    """Who led when, from the on_start / on_stop callbacks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str]] = []

    def callbacks(self, name: str):
        def on_start():
            with self.lock:
                self.events.append((time.monotonic(), name, "start"))

        def on_stop():
            with self.lock:
                self.events.append((time.monotonic(), name, "stop"))

        return on_start, on_stop

    def started(self, name: str) -> list[float]:
        with self.lock:
            return [t for t, who, what in self.events if who == name and what == "start"]

    def assert_never_two_leaders(self) -> None:
        leading: set[str] = set()
        with self.lock:
            for _, who, what in self.events:
                if what == "start":
                    assert not leading, f"{who} started leading while {leading} still led: {self.events}"
                    leading.add(who)
                else:
                    leading.discard(who)


@pytest.fixture
def electors(api_client):
    timeline = Timeline()
    made: list[tuple[LeaderElector, threading.Thread]] = []

    def make(name: str) -> LeaderElector:
        on_start, on_stop = timeline.callbacks(name)
        elector = LeaderElector(api_client, name, NAMESPACE, on_start, on_stop,
                                lease_seconds=LEASE, renew_seconds=RENEW, retry_seconds=RETRY)
        thread = threading.Thread(target=elector.run, name=f"elector-{name}", daemon=True)
        thread.start()
        made.append((elector, thread))
        return elector

    make.timeline = timeline
    yield make
    for elector, thread in made:
        elector.stop()
        thread.join(5)
    timeline.assert_never_two_leaders()


def lease(apiserver) -> dict:
    return apiserver.get("Lease", NAMESPACE, "meshlet-status-writer")


def test_one_of_two_leads_and_the_lease_says_so(apiserver, electors):
    a = electors("agent-a")
    wait_until(lambda: a.is_leader, 3, "agent-a leading")
    b = electors("agent-b")
    time.sleep(LEASE + 2 * RETRY)  # more than a lease: a keeps renewing, b must stay standby
    assert a.is_leader and not b.is_leader
    spec = lease(apiserver)["spec"]
    assert spec["holderIdentity"] == "agent-a"
    assert spec["leaseDurationSeconds"] == LEASE
    assert spec["leaseTransitions"] == 0
    assert spec["renewTime"] > spec["acquireTime"]  # renewed, not re-acquired
    assert electors.timeline.started("agent-b") == []


def test_standby_takes_over_within_the_lease_when_the_leader_dies(apiserver, electors):
    a = electors("agent-a")
    wait_until(lambda: a.is_leader, 3, "agent-a leading")
    b = electors("agent-b")
    time.sleep(3 * RETRY)  # b has seen the Lease

    a.stop(release=False)  # dies: no more renewals, the Lease is left as it was
    died = time.monotonic()
    wait_until(lambda: b.is_leader, LEASE + 2 * RETRY + 1, "agent-b taking over")
    took = electors.timeline.started("agent-b")[0] - died
    assert LEASE - RENEW - 0.1 <= took <= LEASE + 2 * RETRY + 0.2, took
    spec = lease(apiserver)["spec"]
    assert spec["holderIdentity"] == "agent-b"
    assert spec["leaseTransitions"] == 1


def test_a_leader_that_stops_cleanly_hands_over_at_once(apiserver, electors):
    a = electors("agent-a")
    wait_until(lambda: a.is_leader, 3, "agent-a leading")
    b = electors("agent-b")
    time.sleep(2 * RETRY)

    a.stop()  # releases the Lease
    stopped = time.monotonic()
    wait_until(lambda: b.is_leader, LEASE, "agent-b taking over")
    assert electors.timeline.started("agent-b")[0] - stopped <= 2 * RETRY + 0.2


def test_a_leader_cut_off_from_the_api_steps_down_before_anyone_takes_over(apiserver, electors):
    a = electors("agent-a")
    wait_until(lambda: a.is_leader, 3, "agent-a leading")
    b = electors("agent-b")

    def a_cannot_write(method, path, query, body):
        if method == "PUT" and "/leases/" in path and (body or {}).get("spec", {}).get("holderIdentity") == "agent-a":
            return 503, {"kind": "Status", "code": 503, "message": "stand-in: unavailable"}
        return None

    apiserver.add_hook(a_cannot_write)
    wait_until(lambda: b.is_leader, 2 * LEASE, "agent-b taking over")
    assert not a.is_leader
    stops_of_a = [t for t, who, what in electors.timeline.events if who == "agent-a" and what == "stop"]
    assert stops_of_a and stops_of_a[0] < electors.timeline.started("agent-b")[0]
    # (the fixture also checks the whole timeline: never two leaders at once)


def test_a_lease_taken_by_another_makes_the_leader_step_down(apiserver, electors):
    a = electors("agent-a")
    wait_until(lambda: a.is_leader, 3, "agent-a leading")
    current = lease(apiserver)
    current["spec"]["holderIdentity"] = "someone-else"
    apiserver.update(current, check_version=True)
    wait_until(lambda: not a.is_leader, RENEW + 2 * RETRY + 1, "agent-a stepping down")
