"""Routes attached to Services (SEMANTICS B1-B14): attachment, choice of the effective rule,
backendRef resolution and Route status.

Role: given typed records (agent.resolve.objects), decide which Route rule a client scope gets on
each Service port and what each Route's status.parents[] says. Each rule is one function named
after it; the Resolver calls them only for what changed.
May touch: nothing but its arguments (pure; no I/O, no clock).
Invariants:
- a route with a whole-route problem (B9, bad weights, too many backendRefs) is never a candidate
  anywhere, so it hides nothing (B9);
- a consumer route (namespace N != the parent's) is a candidate only in scope N (B5, C3);
- the result never depends on the order routes were given in: candidates are ordered by B7's
  key, which is total (creationTimestamp, namespace, name, kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from agent.model import (
    DEFAULT_SCOPE,
    Condition,
    GroupKey,
    ParentStatus,
    RouteId,
    RouteRef,
    RouteStatus,
    WeightedGroup,
)
from agent.resolve.objects import (
    ROUTE_KINDS,
    BackendRefRecord,
    ParentRefRecord,
    RouteRecord,
    ServiceId,
    ServicePort,
    ServiceRecord,
)

#: (port number, protocol): a Service port's identity (names may be empty; numbers per protocol
#: are unique, which the Service reader enforces).
PortId = tuple[int, str]

# Condition types and reasons, as Gateway API spells them.
ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
NO_MATCHING_PARENT = "NoMatchingParent"
UNSUPPORTED_VALUE = "UnsupportedValue"
CONFLICTED = "RouteReasonConflicted"
INVALID_KIND = "InvalidKind"
BACKEND_NOT_FOUND = "BackendNotFound"


def port_id(port: ServicePort) -> PortId:
    return (port.port, port.protocol)


def describe_port(port: ServicePort) -> str:
    name = f" ({port.name})" if port.name else ""
    return f"{port.port}/{port.protocol}{name}"


# --- attachment (B2, B3, B5) -----------------------------------------------------------------


def attached_ports(service: ServiceRecord, ref: ParentRefRecord, protocol: str) -> tuple[ServicePort, ...]:
    """B3: the parent's ports matching `port` and `sectionName` (each only when set), with the
    protocol the route kind speaks (UDPRoute: UDP, every other kind: TCP)."""
    return tuple(
        p for p in service.ports
        if p.protocol == protocol
        and (ref.port is None or p.port == ref.port)
        and (ref.section_name is None or p.name == ref.section_name)
    )


def route_scope(route_namespace: str, parent_namespace: str) -> str:
    """B5: a producer route (same namespace as its parent) shapes the default view; a consumer
    route shapes only the view of clients in its own namespace."""
    return DEFAULT_SCOPE if route_namespace == parent_namespace else route_namespace


def no_matching_parent(service: ServiceRecord | None, ref: ParentRefRecord, protocol: str) -> str:
    """B2/B3: why a parentRef attaches to nothing ("" when it attaches somewhere)."""
    if ref.problem:
        return f"{ref.problem}"
    where = f"Service {ref.namespace}/{ref.name}"
    if service is None:
        return f"{where} not found"
    if not service.load_balanced:
        return f"{where} {service.not_balanced}, so it has no frontend to attach to"
    if not attached_ports(service, ref, protocol):
        wanted = [f"protocol {protocol}"]
        if ref.port is not None:
            wanted.append(f"port {ref.port}")
        if ref.section_name is not None:
            wanted.append(f"name {ref.section_name!r}")
        have = ", ".join(describe_port(p) for p in service.ports) or "none"
        return f"{where} has no port with {' and '.join(wanted)} (its ports: {have})"
    return ""


# --- choice of the effective rule (B5-B8) ---------------------------------------------------


def precedence(kind: str) -> int:
    """B6: lower wins. Only TCP kinds ever compete; UDPRoute is alone on UDP ports."""
    return ROUTE_KINDS.index(kind)


def order_key(route: RouteRecord) -> tuple:
    """B7: creationTimestamp (missing last), then namespace/name; the kind only makes it total."""
    return (route.order, route.id.kind)


@dataclass(frozen=True)
class PortChoice:
    """The candidate routes of one client scope on one Service port, decided."""

    winners: tuple[RouteRecord, ...]  #: routes of the winning kind, in B7 order: [0] is effective
    losers: frozenset[RouteId]  #: candidates of a weaker kind (B6)


@dataclass(frozen=True)
class ParentView:
    """Every candidate set of one parent Service: (port, scope) -> choice."""

    choices: Mapping[PortId, Mapping[str, PortChoice]]

    def choice(self, port: PortId, scope: str) -> PortChoice | None:
        return self.choices.get(port, {}).get(scope)


EMPTY_VIEW = ParentView({})


def parent_view(service: ServiceRecord | None, routes: Iterable[RouteRecord]) -> ParentView:
    """B2-B7 for one parent Service: the candidate routes per port and client scope, the kind
    that wins each set, and the B7 order inside it."""
    if service is None or not service.load_balanced:
        return EMPTY_VIEW
    candidates: dict[PortId, dict[str, dict[RouteId, RouteRecord]]] = {}
    for route in routes:
        if route.unsupported:
            continue  # B9: no effect anywhere, hides nothing
        scope = route_scope(route.id.namespace, service.namespace)
        for ref in route.parents:
            if ref.problem or ref.service != service.id:
                continue
            for port in attached_ports(service, ref, route.protocol):
                candidates.setdefault(port_id(port), {}).setdefault(scope, {})[route.id] = route
    choices: dict[PortId, dict[str, PortChoice]] = {}
    for port, scopes in candidates.items():
        for scope, by_id in scopes.items():
            best = min(precedence(r.id.kind) for r in by_id.values())
            winners = sorted((r for r in by_id.values() if precedence(r.id.kind) == best), key=order_key)
            losers = frozenset(rid for rid, r in by_id.items() if precedence(r.id.kind) != best)
            choices.setdefault(port, {})[scope] = PortChoice(tuple(winners), losers)
    return ParentView(choices)


# --- backendRefs (B10-B13) --------------------------------------------------------------------


@dataclass(frozen=True)
class BackendVerdict:
    """A backendRef resolved: the backend Service port, or why the ref is invalid (B10)."""

    service: ServiceId | None
    port: ServicePort | None
    reason: str = ""  #: "" when valid, else InvalidKind | BackendNotFound
    message: str = ""


def resolve_backend_ref(ref: BackendRefRecord, protocol: str,
                        services: Mapping[ServiceId, ServiceRecord]) -> BackendVerdict:
    """B10: a valid ref names a core Service that exists, is not ExternalName, and has the port
    (with the route's protocol). Cross-namespace refs need no ReferenceGrant for Service parents."""
    if ref.group not in ("", "core") or ref.kind != "Service":
        group = ref.group or "core"
        return BackendVerdict(None, None, INVALID_KIND, f"kind {ref.kind} of group {group} is not supported "
                              "(only a core Service can be a backend)")
    if ref.problem:
        return BackendVerdict(None, None, BACKEND_NOT_FOUND, ref.problem)
    where = f"Service {ref.namespace}/{ref.name}"
    service = services.get((ref.namespace, ref.name))
    if service is None:
        return BackendVerdict(None, None, BACKEND_NOT_FOUND, f"{where} not found")
    if service.external_name:
        return BackendVerdict(None, None, INVALID_KIND, f"{where} is of type ExternalName, which has no endpoints")
    for port in service.ports:
        if port.port == ref.port and port.protocol == protocol:
            return BackendVerdict(service.id, port)
    return BackendVerdict(None, None, BACKEND_NOT_FOUND, f"{where} has no port {ref.port}/{protocol}")


def effective_split(route: RouteRecord, family: int, services: Mapping[ServiceId, ServiceRecord]
                    ) -> tuple[tuple[WeightedGroup, ...], RouteRef]:
    """B8, B11-B13: the split of the route's first rule on a frontend of `family`.

    Every backendRef keeps its share (weight unset = 1, applied when read); an invalid ref's share
    rejects (group None). A valid ref names its Service's own group of the same family and port
    name: that Service's endpoints and affinity (B11), never its routes (one level only). A backend
    without endpoints of this family gets a group with verdict REJECT (B13). A route without rules
    counts as one rule without backendRefs (the API's default rule), which rejects everything."""
    ref_name = RouteRef(route.id.kind, route.id.namespace, route.id.name, 0)
    if not route.rules:
        return (), ref_name
    shares = []
    for ref in route.rules[0].backend_refs:
        verdict = resolve_backend_ref(ref, route.protocol, services)
        group = None
        if verdict.service is not None and verdict.port is not None:
            namespace, name = verdict.service
            group = GroupKey(namespace, name, verdict.port.name, route.protocol, family)
        shares.append(WeightedGroup(ref.weight, group))
    return tuple(shares), ref_name


# --- status (B14) -----------------------------------------------------------------------------


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Condition:
    return Condition(type_, "True" if ok else "False", reason, message, generation)


def resolved_refs(route: RouteRecord, services: Mapping[ServiceId, ServiceRecord]) -> Condition:
    """B14: True, or False with the first invalid ref's reason and every invalid ref listed."""
    invalid = []
    single_rule = len(route.rules) == 1
    for i, rule in enumerate(route.rules):
        for j, ref in enumerate(rule.backend_refs):
            verdict = resolve_backend_ref(ref, route.protocol, services)
            if verdict.reason:
                where = f"backendRef {j}" if single_rule else f"rule {i} backendRef {j}"
                invalid.append((verdict.reason, f"{where}: {verdict.message}"))
    if not invalid:
        return _condition(RESOLVED_REFS, True, RESOLVED_REFS, "all backendRefs resolved", route.generation)
    return _condition(RESOLVED_REFS, False, invalid[0][0], "; ".join(m for _, m in invalid), route.generation)


def accepted(route: RouteRecord, ref: ParentRefRecord, service: ServiceRecord | None,
             view: ParentView) -> Condition:
    """B14 Accepted for one parentRef, reasons checked in order: NoMatchingParent (B2/B3),
    UnsupportedValue (B9), RouteReasonConflicted (B6: lost on every attached port)."""
    gen = route.generation
    missing = no_matching_parent(service, ref, route.protocol)
    if missing:
        return _condition(ACCEPTED, False, NO_MATCHING_PARENT, missing, gen)
    if route.unsupported:
        return _condition(ACCEPTED, False, UNSUPPORTED_VALUE,
                          f"{route.unsupported}; the route has no effect", gen)
    assert service is not None  # no_matching_parent checked it
    scope = route_scope(route.id.namespace, service.namespace)
    ports = attached_ports(service, ref, route.protocol)
    beaten_by = []
    for port in ports:
        choice = view.choice(port_id(port), scope)
        if choice is None or route.id not in choice.losers:
            break  # wins (or ties on kind) on this port
        beaten_by.append(f"{describe_port(port)} by {choice.winners[0].id}")
    else:
        return _condition(ACCEPTED, False, CONFLICTED,
                          f"a route kind of higher precedence holds every attached port: {', '.join(beaten_by)}", gen)
    where = f"Service {service.namespace}/{service.name}"
    kind = "producer" if scope == DEFAULT_SCOPE else f"consumer (clients in namespace {scope})"
    ports_text = ", ".join(describe_port(p) for p in ports)
    return _condition(ACCEPTED, True, ACCEPTED, f"attached to {where} ports {ports_text} as a {kind} route", gen)


def route_status(route: RouteRecord, services: Mapping[ServiceId, ServiceRecord],
                 views: Mapping[ServiceId, ParentView]) -> RouteStatus | None:
    """B14: one status.parents[] entry per parentRef of ours (duplicates were merged when the
    route was read); None for a route with no Service parent (not ours: no entry at all)."""
    if not route.parents:
        return None
    refs = resolved_refs(route, services)
    parents = []
    for ref in route.parents:
        service = services.get(ref.service) if not ref.problem else None
        view = views.get(ref.service, EMPTY_VIEW)
        parents.append(ParentStatus(ref.raw, (accepted(route, ref, service, view), refs)))
    return RouteStatus(route.id, route.generation, tuple(parents))
