"""Fixtures for the datapath kernel tests: one lab of pods and one attached datapath per session.

Root only (every test here is marked `kernel`). The lab (agent.lab.pods) makes its own network
namespaces and cgroup subtree; the datapath is attached to that subtree only, with its pins in a
bpffs directory of its own (/sys/fs/bpf/meshlet-test-<random>). Teardown uninstalls (detaches
the links, removes the pins) and removes the lab, also when a test fails.

Helpers come as fixtures (`shares` builds states), not imports: test modules never import this
file. Each test writes the whole desired state it needs with a full reconcile (which sweeps what the
previous test left), so tests do not depend on each other's order. Frontends live in
10.96.0.0/16 and fd00:96::/64: addresses that exist nowhere, so an untranslated connection fails
(ENETUNREACH from the lab's node) instead of reaching anything.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import pytest

from agent.model import (
    BackendGroup,
    ClientPod,
    DesiredState,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteRef,
    Verdict,
    WeightedGroup,
)

ECHO_PORT = 8080  #: every server pod answers TCP and UDP here with its name


@dataclass
class Shares:
    """Builds DesiredStates over the lab's pods for one test."""

    pods: dict
    ECHO_PORT = ECHO_PORT

    def group(self, service: str, names, family: int = 4, protocol: str = "TCP", affinity: int = 0,
              verdict: Verdict | None = None, namespace: str = "shop") -> BackendGroup:
        key = GroupKey(namespace, service, "http", protocol, family)
        eps = tuple(sorted(Endpoint(self.address(n, family), ECHO_PORT) for n in names))
        if verdict is None:
            verdict = Verdict.FORWARD if eps else Verdict.REJECT
        if verdict != Verdict.FORWARD:
            eps = ()
        return BackendGroup(key, eps, verdict, affinity)

    def address(self, name: str, family: int) -> str:
        pod = self.pods[name]
        return pod.ipv4 if family == 4 else pod.ipv6

    @staticmethod
    def state(frontends: dict, groups, clients=()) -> DesiredState:
        return DesiredState(frontends=frontends, groups={g.key: g for g in groups},
                            clients={c.uid: c for c in clients})

    @staticmethod
    def split(*shares, route: RouteRef | None = None, service: str = "web") -> FrontendState:
        """shares: (weight, BackendGroup or None for a rejected share)."""
        return FrontendState("shop", service, "http",
                             tuple(WeightedGroup(w, g.key if g is not None else None) for w, g in shares),
                             route)

    def clients(self, skip: tuple[str, ...] = ()) -> tuple[ClientPod, ...]:
        return tuple(ClientPod(p.uid, p.namespace, p.name, skip=p.name in skip) for p in self.pods.values())

    def cgroups(self) -> dict[str, int]:
        return {p.uid: p.cgroup_id for p in self.pods.values()}

    @staticmethod
    def fe(address: str, port: int, protocol: str = "TCP", scope: str = "") -> FrontendKey:
        return FrontendKey(address, port, protocol, scope)


@contextlib.contextmanager
def lab_of_pods(prefix: str):
    """A lab with the pods every test here knows (clients, and echo servers web-1..3)."""
    from agent.lab.pods import Lab, unique_lab_name

    with Lab(unique_lab_name(prefix)) as lab:
        lab.add_pod("default", "client", echo_ports=())
        lab.add_pod("team-a", "consumer", echo_ports=())
        lab.add_pod("quiet", "skipper", echo_ports=())
        for name in ("web-1", "web-2", "web-3"):
            lab.add_pod("shop", name, echo_ports=(ECHO_PORT,))
        yield lab


@contextlib.contextmanager
def pins():
    """A fresh bpffs directory for the datapath's pins, uninstalled (links and pins) afterwards."""
    path = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        from agent.datapath import uninstall

        uninstall(path)
        assert not os.path.exists(path), f"pins left under {path}"


@contextlib.contextmanager
def attached_datapath(lab, bpffs):
    from agent.datapath import Datapath, MapSizes

    # Small maps: a test suite needs few entries, and the overflow tests can fill them.
    dp = Datapath.open(bpffs, lab.cgroup_root, MapSizes(affinity=1024, clients=64))
    try:
        assert dp.adopted is False
        dp.reconcile(DesiredState(), {})
        dp.attach()
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="session")
def lab():
    with lab_of_pods("dp") as lab:
        yield lab


@pytest.fixture(scope="session")
def bpffs():
    with pins() as path:
        yield path


@pytest.fixture(scope="session")
def datapath(lab, bpffs):
    with attached_datapath(lab, bpffs) as dp:
        yield dp


@pytest.fixture(scope="session")
def make_world():
    """For a module that needs a datapath of its own (other kernel features): (lab, bpffs,
    datapath) context managers, the same the session fixtures use."""
    return lab_of_pods, pins, attached_datapath


@pytest.fixture
def shares(lab) -> Shares:
    return Shares({p.name: p for p in lab.pods.values()})


@pytest.fixture
def client(lab):
    return lab.pod("default/client")
