"""The desired state: what every client on this node must get for every Service frontend.

This module is the contract between `agent.resolve` (which builds it from Kubernetes objects,
SEMANTICS A-C) and `agent.datapath.plan` (which turns it into map entries). It is pure data:
frozen dataclasses, no I/O, nothing imported from bcc, kubernetes or the OS.

Shape, one way down:

    FrontendKey (address, port, protocol, client scope)
        -> FrontendState: a weighted split over backend groups (or reject shares)
            -> BackendGroup (one Service port, one address family): the usable endpoints on this
               node, ClientIP affinity, and a verdict when there is nothing usable.

A frontend with scope "" is the default (producer) view every client gets; a frontend with scope
N is the consumer view for clients whose pod is in namespace N (SEMANTICS B5). A scoped entry
exists only where namespace N has at least one accepted consumer route for that Service port.

The per-Service and per-endpoint classes are slotted: a 50k-Service state holds a million of
them, and a slotted instance is half the size of one with a __dict__.

Invariants (resolve guarantees them, plan relies on them):
- every GroupKey named by a FrontendState is in DesiredState.groups;
- a BackendGroup's endpoints are sorted, unique, of the group's family, and non-empty iff its
  verdict is FORWARD;
- an IPv4 address is written in dotted form, IPv6 in compressed form (`ipaddress` canonical text).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

#: Our Gateway API controllerName: the only status.parents[] entries meshlet ever writes.
CONTROLLER_NAME = "meshlet.io/mesh"

#: Namespace label and Pod annotation that opt a client out of translation (SEMANTICS C2).
SKIP_KEY = "meshlet.io/skip"

#: Service annotation that turns passive health off for that Service (SEMANTICS A17), value "off".
PASSIVE_HEALTH_KEY = "meshlet.io/passive-health"

#: Default ClientIP affinity timeout when sessionAffinityConfig leaves it unset (SEMANTICS A11).
DEFAULT_AFFINITY_TIMEOUT = 10800

#: Client scope of the default (producer) view.
DEFAULT_SCOPE = ""

#: Split slots the datapath holds per frontend (layout.MAX_SLOTS is this number, and
#: bpf/meshlet.h's MAX_SLOTS must equal it: a unit test checks): a Route rule with more
#: backendRefs is rejected whole (UnsupportedValue) instead of being cut short.
MAX_BACKEND_REFS = 16

#: Our name for the `service.kubernetes.io/service-proxy-name` label: a Service labelled with any
#: other proxy name belongs to that proxy and is never translated (SEMANTICS A1).
SERVICE_PROXY_NAME = "meshlet"

PROTOCOLS = ("TCP", "UDP", "SCTP")


class Verdict(enum.IntEnum):
    """What a backend group does with a new connection. Values are ours, not the kernel's."""

    FORWARD = 0  #: pick an endpoint
    REJECT = 1  #: no endpoints at all: ECONNREFUSED (A9, B13)
    UNREACHABLE = 2  #: endpoints exist, none usable from this node: EHOSTUNREACH (A7)


def host_port(host: str, port: int | str) -> str:
    """`host:port`, an IPv6 host in brackets (`[fd00::a]:80`): the one way meshlet writes an
    address with a port (logs, errors, dumps, explain, the lab)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    address: str
    port: int

    def __str__(self) -> str:
        return host_port(self.address, self.port)


@dataclass(frozen=True, order=True, slots=True)
class GroupKey:
    """One Service port seen through one address family: the unit of endpoint selection."""

    namespace: str
    service: str
    port_name: str  #: the Service port's name ("" when unnamed)
    protocol: str  #: TCP | UDP | SCTP
    family: int  #: 4 or 6

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.service}{port}/{self.protocol.lower()}/v{self.family}"


@dataclass(frozen=True, slots=True)
class BackendGroup:
    key: GroupKey
    endpoints: tuple[Endpoint, ...]  #: the usable set for this node (A6-A8), sorted
    verdict: Verdict
    affinity_timeout: int = 0  #: seconds of ClientIP affinity; 0 = none (A11)
    #: passive health (A17): failing endpoints are ejected from the choice; off per Service
    #: (PASSIVE_HEALTH_KEY) or per agent
    passive_health: bool = True


@dataclass(frozen=True, order=True, slots=True)
class RouteRef:
    """A Route rule, named for humans and for `meshlet explain`."""

    kind: str
    namespace: str
    name: str
    rule: int = 0

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} rule {self.rule}"


@dataclass(frozen=True, slots=True)
class WeightedGroup:
    """One share of a split: `group` None means the share is rejected (an invalid backendRef)."""

    weight: int
    group: GroupKey | None


@dataclass(frozen=True, order=True, slots=True)
class FrontendKey:
    address: str
    port: int
    protocol: str
    scope: str = DEFAULT_SCOPE  #: "" = default view, else the consumer namespace

    def __str__(self) -> str:
        scope = f" scope={self.scope}" if self.scope else ""
        return f"{host_port(self.address, self.port)}/{self.protocol.lower()}{scope}"


@dataclass(frozen=True, slots=True)
class FrontendState:
    """What a new connection to a frontend gets.

    An empty split (no backendRefs, or all weights 0) rejects every connection (B13). A split
    without a route is the Service's own default balancing: one share of its own group.
    """

    namespace: str
    service: str
    port_name: str
    split: tuple[WeightedGroup, ...]
    route: RouteRef | None = None


@dataclass(frozen=True)
class ClientPod:
    """A pod on this node, as a client: its namespace decides its scope (C1), `skip` opts it out (C2)."""

    uid: str
    namespace: str
    name: str
    skip: bool = False


@dataclass(frozen=True)
class DesiredState:
    frontends: Mapping[FrontendKey, FrontendState] = field(default_factory=dict)
    groups: Mapping[GroupKey, BackendGroup] = field(default_factory=dict)
    clients: Mapping[str, ClientPod] = field(default_factory=dict)  #: by pod uid


@dataclass(frozen=True)
class StateDelta:
    """Keys whose value changed, appeared or disappeared since the previous commit."""

    frontends: frozenset[FrontendKey] = frozenset()
    groups: frozenset[GroupKey] = frozenset()
    clients: frozenset[str] = frozenset()
    routes: frozenset["RouteId"] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.frontends or self.groups or self.clients or self.routes)


# --- Route status (SEMANTICS B14) -------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RouteId:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Condition:
    type: str  #: Accepted | ResolvedRefs
    status: str  #: "True" | "False"
    reason: str
    message: str
    observed_generation: int


@dataclass(frozen=True)
class ParentStatus:
    """One status.parents[] entry: the parentRef as the Route wrote it, and our conditions."""

    parent_ref: tuple[tuple[str, object], ...]  #: the parentRef's items, sorted by key
    conditions: tuple[Condition, ...]

    def parent_ref_dict(self) -> dict:
        return dict(self.parent_ref)


@dataclass(frozen=True)
class RouteStatus:
    route: RouteId
    generation: int
    parents: tuple[ParentStatus, ...]

    def as_json(self) -> dict:
        """The /status/routes form; lastTransitionTime is the status writer's business."""
        return {
            "kind": self.route.kind,
            "namespace": self.route.namespace,
            "name": self.route.name,
            "parents": [
                {
                    "parentRef": p.parent_ref_dict(),
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        {
                            "type": c.type,
                            "status": c.status,
                            "reason": c.reason,
                            "message": c.message,
                            "observedGeneration": c.observed_generation,
                        }
                        for c in p.conditions
                    ],
                }
                for p in self.parents
            ],
        }


def render_state(state: DesiredState) -> str:
    """A canonical text dump, one line per fact, sorted: the same state gives the same bytes.

    Golden tests compare this text; `meshlet explain` prints parts of it.
    """
    lines = []
    for key in sorted(state.frontends):
        fe = state.frontends[key]
        via = f" via {fe.route}" if fe.route else ""
        port = f":{fe.port_name}" if fe.port_name else ""
        lines.append(f"frontend {key} -> {fe.namespace}/{fe.service}{port}{via}")
        if not fe.split:
            lines.append("  reject (empty split)")
        for share in fe.split:
            lines.append(f"  weight {share.weight} -> {share.group if share.group else 'reject'}")
    for key in sorted(state.groups):
        group = state.groups[key]
        affinity = f" affinity={group.affinity_timeout}s" if group.affinity_timeout else ""
        health = "" if group.passive_health else " passive-health=off"
        lines.append(f"group {key} {group.verdict.name.lower()}{affinity}{health}")
        for ep in group.endpoints:
            lines.append(f"  endpoint {ep}")
    for uid in sorted(state.clients):
        pod = state.clients[uid]
        skip = " skip" if pod.skip else ""
        lines.append(f"client {pod.namespace}/{pod.name} uid={uid}{skip}")
    return "\n".join(lines) + ("\n" if lines else "")
