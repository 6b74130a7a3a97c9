"""Leader election over a Lease on the stand-in API server: one writer, hand-over within the lease.

Timings are shrunk (lease 2 s, renew 0.5 s, retry 0.2 s); the rules checked are the ones the
defaults (15 s / 5 s / 2 s) rely on. Hand-over timing is checked on an injected clock (the
`stepped` electors); the tests with running electors wait on conditions with a deadline.
"""

from __future__ import annotations

import threading
import time

import pytest

from agent.runtime.leader import LeaderElector

LEASE, RENEW, RETRY = 2, 0.5, 0.2
NAMESPACE = "meshlet-system"


class Timeline:
    """Who led when, from the on_start / on_stop callbacks."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str]] = []

    def callbacks(self, name: str):
        def on_start():
            with self.lock:
                self.events.append((self.clock(), name, "start"))

        def on_stop():
            with self.lock:
                self.events.append((self.clock(), name, "stop"))

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


def lease(apiserver) -> dict:
    return apiserver.get("Lease", NAMESPACE, "meshlet-status-writer")


class Clock:
    """The electors' monotonic clock, moved by the test (the Lease's wall-clock timestamps stay real)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stepped(api_client):
    """Electors on one injected clock, not running: the test calls step() as run() would, at
    the times it chooses, so the hand-over timing is exact whatever the machine's load."""
    clock = Clock()
    timeline = Timeline(clock)
    made: list[LeaderElector] = []

    def make(name: str) -> LeaderElector:
        on_start, on_stop = timeline.callbacks(name)
        elector = LeaderElector(api_client, name, NAMESPACE, on_start, on_stop, lease_seconds=LEASE,
                                renew_seconds=RENEW, retry_seconds=RETRY, clock=clock)
        made.append(elector)
        return elector

    def advance(seconds: float, *electors: LeaderElector) -> None:
        """Let `seconds` pass in RETRY steps, each elector taking its round at every step."""
        for _ in range(round(seconds / RETRY)):
            clock.now += RETRY
            for elector in electors:
                elector.step()

    make.clock, make.timeline, make.advance = clock, timeline, advance
    yield make
    timeline.assert_never_two_leaders()


def test_one_of_two_leads_and_the_lease_says_so(apiserver, stepped):
    a = stepped("agent-a")
    a.step()
    assert a.is_leader
    b = stepped("agent-b")
    stepped.advance(2 * LEASE, a, b)  # two leases: a keeps renewing, b must stay standby
    assert a.is_leader and not b.is_leader
    spec = lease(apiserver)["spec"]
    assert spec["holderIdentity"] == "agent-a"
    assert spec["leaseDurationSeconds"] == LEASE
    assert spec["leaseTransitions"] == 0
    assert spec["renewTime"] > spec["acquireTime"]  # renewed, not re-acquired
    assert stepped.timeline.started("agent-b") == []


def test_standby_takes_over_within_the_lease_when_the_leader_dies(apiserver, stepped):
    a, b = stepped("agent-a"), stepped("agent-b")
    a.step()
    stepped.advance(RENEW, a, b)  # a renewed; b has seen the Lease change
    a.resign(release=False)  # a stops leading and never renews again: the Lease is left as it was
    died = stepped.clock.now
    stepped.advance(2 * LEASE, b)
    took = stepped.timeline.started("agent-b")[0] - died
    # b judges expiry from when it saw the last renewal, on its own clock, polling every RETRY.
    assert LEASE - RENEW <= took <= LEASE + RETRY + 1e-9, took
    spec = lease(apiserver)["spec"]
    assert spec["holderIdentity"] == "agent-b"
    assert spec["leaseTransitions"] == 1


def test_a_leader_that_stops_cleanly_hands_over_at_once(apiserver, stepped):
    a, b = stepped("agent-a"), stepped("agent-b")
    a.step()
    stepped.advance(2 * RETRY, a, b)
    a.resign()  # what run() does on stop(): steps down and releases the Lease
    stopped = stepped.clock.now
    stepped.advance(RETRY, b)  # b's next round
    assert b.is_leader and stepped.timeline.started("agent-b") == [stopped + RETRY]


def test_a_leader_cut_off_from_the_api_steps_down_before_anyone_takes_over(apiserver, stepped):
    a, b = stepped("agent-a"), stepped("agent-b")
    a.step()
    assert a.is_leader

    def a_cannot_write(method, path, query, body):
        if method == "PUT" and "/leases/" in path and (body or {}).get("spec", {}).get("holderIdentity") == "agent-a":
            return 503, {"kind": "Status", "code": 503, "message": "stand-in: unavailable"}
        return None

    apiserver.add_hook(a_cannot_write)
    stepped.advance(2 * LEASE, a, b)
    assert b.is_leader and not a.is_leader
    stops_of_a = [t for t, who, what in stepped.timeline.events if who == "agent-a" and what == "stop"]
    assert stops_of_a and stops_of_a[0] < stepped.timeline.started("agent-b")[0]
    # (the fixture also checks the whole timeline: never two leaders at once)


def test_a_lease_taken_by_another_makes_the_leader_step_down(apiserver, stepped):
    a = stepped("agent-a")
    a.step()
    assert a.is_leader
    current = lease(apiserver)
    current["spec"]["holderIdentity"] = "someone-else"
    apiserver.update(current, check_version=True)
    stepped.advance(RENEW + RETRY, a)  # its next renewal finds the Lease taken
    assert not a.is_leader
