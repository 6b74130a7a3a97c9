"""Endpoint selection: the usable endpoints of one Service port on this node (SEMANTICS A3-A9).

Role: merge a Service's EndpointSlices into one set of `IP:port` candidates for one Service port
and one address family (A3, A4, A5), then pick what a client on this node may use (A6 cluster
set with topology hints A8, A7 internalTrafficPolicy Local) and the verdict when nothing is
usable (A7 UNREACHABLE, A9 REJECT). Each rule is one function named after it.
May touch: nothing but its arguments (pure; no I/O, no clock).
Invariants:
- the result does not depend on the order of the slices or of the endpoints within them;
- endpoints are sorted and unique, and non-empty iff the verdict is FORWARD (model invariant).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from agent.model import BackendGroup, Endpoint, GroupKey, Verdict
from agent.resolve.objects import EndpointTraits, ServiceRecord, SliceRecord


class Candidate(NamedTuple):
    """One `IP:port` of a Service port, after merging every slice that lists it.

    A NamedTuple: one is built per endpoint of every group a commit recomputes (all of them on
    a cold sync), and a tuple is much cheaper to build than a frozen dataclass.
    """

    endpoint: Endpoint
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    for_nodes: tuple[str, ...] | None
    for_zones: tuple[str, ...] | None

    def preference(self) -> tuple:
        """A3: of two copies of one `IP:port`, a non-terminating one wins. The rest of the key only
        makes the choice total, so that the slices' order can never change the result."""
        return (
            not self.terminating,
            self.ready,
            self.serving,
            self.node_name or "",
            self.for_nodes is not None,
            self.for_nodes or (),
            self.for_zones is not None,
            self.for_zones or (),
        )


def slice_port_number(slice_: SliceRecord, port_name: str, protocol: str) -> int | None:
    """A4: the endpoint port of Service port `port_name` is the slice port with the same name
    (unnamed = "") and protocol. targetPort is never read: a named targetPort resolves per pod,
    and only the slice knows the number."""
    for port in slice_.ports:
        if port.name == port_name and port.protocol == protocol:
            return port.port
    return None


def merge_slices(slices: Iterable[SliceRecord], port_name: str, protocol: str, family: int) -> list[Candidate]:
    """A3: every slice of the Service in `family` merged; the same `IP:port` counts once.

    The result is sorted by endpoint and unique, and every later step only filters it, so the
    usable set comes out sorted without sorting again.
    """
    # Keyed by (address, port), the order Endpoint sorts in: comparing plain tuples is much
    # cheaper than comparing Endpoint dataclasses, and each Candidate is built once, at the end.
    best: dict[tuple[str, int], EndpointTraits] = {}
    for slice_ in slices:
        if slice_.family != family:
            continue
        number = slice_port_number(slice_, port_name, protocol)
        if number is None:
            continue
        for address, traits in zip(slice_.addresses, slice_.traits):
            ident = (address, number)
            held = best.get(ident)
            if held is None or _candidate(ident, traits).preference() > _candidate(ident, held).preference():
                best[ident] = traits
    return [_candidate(ident, best[ident]) for ident in sorted(best)]


def _candidate(ident: tuple[str, int], traits: EndpointTraits) -> Candidate:
    # A5 defaults (ready and serving unset = true) were applied when the slice was read.
    return Candidate(Endpoint(*ident), *traits)


def serving_terminating(candidates: Iterable[Candidate]) -> list[Candidate]:
    """A6/A7 fallback: endpoints that are shutting down but still serve."""
    return [c for c in candidates if c.serving and c.terminating]


def topology_narrow(ready: list[Candidate], node_name: str, zone: str | None) -> list[Candidate]:
    """A8: PreferSameNode iff every ready endpoint has a forNodes hint and one names this node;
    else PreferSameZone iff every ready endpoint has a forZones hint and one names our zone;
    else no narrowing. An empty list stays empty (A6 then falls back)."""
    if ready and all(c.for_nodes is not None for c in ready):
        same_node = [c for c in ready if node_name in c.for_nodes]
        if same_node:
            return same_node
    if zone is not None and ready and all(c.for_zones is not None for c in ready):
        same_zone = [c for c in ready if zone in c.for_zones]
        if same_zone:
            return same_zone
    return ready


def cluster_set(candidates: list[Candidate], node_name: str, zone: str | None) -> list[Candidate]:
    """A6: the ready endpoints narrowed by hints, else every serving-and-terminating endpoint
    (hints are not applied to the fallback)."""
    ready = [c for c in candidates if c.ready]
    return topology_narrow(ready, node_name, zone) or serving_terminating(candidates)


def local_set(candidates: list[Candidate], node_name: str) -> list[Candidate]:
    """A7: the ready endpoints on this node, else the serving-and-terminating ones on this node.
    Hints never narrow this set (A8)."""
    local = [c for c in candidates if c.node_name == node_name]
    return [c for c in local if c.ready] or serving_terminating(local)


def has_any_endpoint(candidates: list[Candidate]) -> bool:
    """A7: "endpoints exist" means some endpoint could serve a client somewhere: ready, or serving
    while terminating. A not-ready endpoint that is not shutting down does not count (it is a pod
    still starting), so a Service whose only pods are starting rejects instead of pretending
    they are elsewhere."""
    return any(c.ready or (c.serving and c.terminating) for c in candidates)


def select_endpoints(candidates: list[Candidate], local_only: bool, node_name: str,
                     zone: str | None) -> tuple[tuple[Endpoint, ...], Verdict]:
    """A6-A9: the usable endpoints for a client on this node and the verdict. `candidates` as
    merge_slices gives them: sorted by endpoint, one per endpoint."""
    usable = local_set(candidates, node_name) if local_only else cluster_set(candidates, node_name, zone)
    if usable:
        # Sorted and unique already: `candidates` is (merge_slices), and the sets only filter it.
        return tuple(c.endpoint for c in usable), Verdict.FORWARD
    if local_only and has_any_endpoint(candidates):
        # A7: kube-proxy drops silently (clients hang); we fail fast with EHOSTUNREACH.
        return (), Verdict.UNREACHABLE
    return (), Verdict.REJECT  # A9


def backend_group(key: GroupKey, service: ServiceRecord | None, slices: Iterable[SliceRecord],
                  node_name: str, zone: str | None, passive_health: bool = True) -> BackendGroup:
    """One backend group: the endpoints of `key` usable here, and the Service's ClientIP affinity
    (A11) and passive health (A17: on unless the agent or the Service turns it off). A group whose
    Service is gone rejects (it is about to lose its last user)."""
    if service is None:
        return BackendGroup(key, (), Verdict.REJECT, passive_health=passive_health)
    uniform = _uniform_endpoints(slices, key.port_name, key.protocol, key.family)
    if uniform is not None:
        endpoints, verdict = _select_uniform(*uniform, service.local_only, node_name, zone)
    else:
        candidates = merge_slices(slices, key.port_name, key.protocol, key.family)
        endpoints, verdict = select_endpoints(candidates, service.local_only, node_name, zone)
    return BackendGroup(key, endpoints, verdict, service.affinity_timeout,
                        passive_health and service.passive_health)


# --- the common case, without a Candidate per endpoint ------------------------------------------


def _uniform_endpoints(slices: Iterable[SliceRecord], port_name: str, protocol: str, family: int
                       ) -> tuple[list[tuple[str, int]], EndpointTraits] | None:
    """(the merged `IP:port`s, sorted and unique; their one EndpointTraits) when every endpoint
    of every slice that counts for this port has the same traits (the interned EndpointTraits
    instance: most Services, whose endpoints are all ready on the same node or all without a
    node), else None. None too when no endpoint counts (the general path says why).

    Why it holds: merge_slices keeps one copy of each `IP:port`, and copies with equal traits
    are equal candidates, so the merge is the sorted unique `IP:port`s; every rule of
    select_endpoints filters candidates by their traits alone or keeps the whole list (hints:
    "every ready endpoint has one"), so on candidates with one traits value its answer is all
    of them or none, the same as its answer for one of them (_select_uniform).
    """
    idents: list[tuple[str, int]] = []
    shared: EndpointTraits | None = None
    for slice_ in slices:
        if slice_.family != family:
            continue
        number = slice_port_number(slice_, port_name, protocol)
        if number is None or not slice_.traits:
            continue
        first = slice_.traits[0]
        if shared is None:
            shared = first
        if first != shared or slice_.traits.count(first) != len(slice_.traits):
            return None
        idents += [(address, number) for address in slice_.addresses]
    if shared is None:
        return None
    return sorted(set(idents)), shared


def _select_uniform(idents: list[tuple[str, int]], traits: EndpointTraits, local_only: bool,
                    node_name: str, zone: str | None) -> tuple[tuple[Endpoint, ...], Verdict]:
    """select_endpoints on candidates that all carry `traits` (see _uniform_endpoints): decided
    on one of them, then applied to all."""
    _one, verdict = select_endpoints([_candidate(idents[0], traits)], local_only, node_name, zone)
    if verdict != Verdict.FORWARD:
        return (), verdict
    return tuple([Endpoint(address, port) for address, port in idents]), verdict
