"""The frontends of one Service (SEMANTICS A1, A2, B5, B8): what each client scope gets per
address, port and protocol.

Role: for a load-balanced Service, one default-scope frontend per (address, port, protocol), and
one consumer-scope frontend per namespace that has an accepted consumer route on that port (B5).
Without an effective rule a frontend splits to the Service's own group of the address's family
(plain A behaviour, B8); with one, to the rule's backendRefs (B11-B13).
May touch: nothing but its arguments (pure; no I/O, no clock).
Invariants:
- only load-balanced Services (A1) have frontends; addresses are canonical (the reader did it);
- a frontend of family f only names groups of family f (IPv4-mapped IPv6 is the datapath's
  business, A13: nothing special here);
- NodePorts are out of scope: the socket hooks see the node's own addresses there, and
  kube-proxy or the CNI handles them for traffic arriving from outside (A2).
"""

from __future__ import annotations

from typing import Mapping

from agent.model import DEFAULT_SCOPE, FrontendKey, FrontendState, GroupKey, RouteId, RouteRef, WeightedGroup
from agent.resolve.objects import ServiceId, ServiceRecord
from agent.resolve.routes import ParentView, effective_split, port_id


def family_of(address: str) -> int:
    # Addresses are canonical (the reader did it), so a colon means IPv6: no need to parse again.
    return 6 if ":" in address else 4


def service_frontends(service: ServiceRecord | None, view: ParentView,
                      services: Mapping[ServiceId, ServiceRecord]) -> dict[FrontendKey, FrontendState]:
    """Every frontend of `service` (A2), each with the split its client scope gets (B5, B8)."""
    if service is None or not service.load_balanced:
        return {}
    frontends: dict[FrontendKey, FrontendState] = {}
    splits: dict[tuple[RouteId, int], tuple[tuple[WeightedGroup, ...], RouteRef]] = {}
    for address in service.addresses:
        family = family_of(address)
        for port in service.ports:
            own = (WeightedGroup(1, GroupKey(service.namespace, service.name, port.name, port.protocol, family)),)
            scopes = dict(view.choices.get(port_id(port), {}))
            scopes.setdefault(DEFAULT_SCOPE, None)
            for scope, choice in scopes.items():
                key = FrontendKey(address, port.port, port.protocol, scope)
                if choice is None:
                    frontends[key] = FrontendState(service.namespace, service.name, port.name, own)
                    continue
                route = choice.winners[0]
                if (route.id, family) not in splits:
                    splits[(route.id, family)] = effective_split(route, family, services)
                split, ref = splits[(route.id, family)]
                frontends[key] = FrontendState(service.namespace, service.name, port.name, split, ref)
    return frontends
