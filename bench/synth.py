"""The synthetic cluster every mode is measured on: N Services x k endpoints, pure data.

Service i (0-based) is `bench/svc-%05d`, port name `p80`, ClusterIP = host i+1 of SERVICE_CIDR,
port 80/TCP (BASELINES.md 8.1). Every `udp_every`-th Service also has a UDP twin on the same
address and port, so UDP first-datagram latency can be measured without doubling the rule sets
the TCP figures are taken on. Endpoint j of Service i is drawn from a shared pool in POD_CIDR
(500k endpoints do not fit in a /16); the k endpoints of one Service are always distinct.

Invariants: the same (n, k, udp_every) gives the same Services; endpoints are sorted by their
"IP:port" string, the order kube-proxy emits them in; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from agent.model import (
    BackendGroup,
    DesiredState,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    Verdict,
    WeightedGroup,
)

NAMESPACE = "bench"
PORT_NAME = "p80"
SERVICE_PORT = 80
TARGET_PORT = 8080
#: ClusterIPs live here; only the client netns of the firewall modes routes it.
SERVICE_CIDR = "10.96.0.0/16"
#: Every endpoint address is local in the server netns (AnyIP route over this range).
POD_CIDR = "10.244.0.0/16"

_SERVICE_BASE = int(ipaddress.ip_network(SERVICE_CIDR).network_address)
_POD_BASE = int(ipaddress.ip_network(POD_CIDR).network_address)
_POD_HOSTS = ipaddress.ip_network(POD_CIDR).num_addresses - 2
MAX_SERVICES = ipaddress.ip_network(SERVICE_CIDR).num_addresses - 2


@dataclass(frozen=True)
class Service:
    index: int
    vip: str
    endpoints: tuple[str, ...]  #: endpoint IPs, sorted by "IP:port"
    protocols: tuple[str, ...]  #: "tcp", and "udp" for a twin

    @property
    def name(self) -> str:
        return f"svc-{self.index:05d}"

    def endpoint_strings(self) -> list[str]:
        return [f"{ip}:{TARGET_PORT}" for ip in self.endpoints]


def pod_address(slot: int) -> str:
    return str(ipaddress.IPv4Address(_POD_BASE + 1 + slot % _POD_HOSTS))


def _sorted_endpoints(ips) -> tuple[str, ...]:
    return tuple(sorted(ips, key=lambda ip: f"{ip}:{TARGET_PORT}"))


def make_services(n: int, k: int = 10, udp_every: int = 10) -> list[Service]:
    if not 0 < n <= MAX_SERVICES:
        raise ValueError(f"between 1 and {MAX_SERVICES} Services fit in {SERVICE_CIDR}, not {n}")
    services = []
    for i in range(n):
        protocols = ("tcp", "udp") if udp_every and i % udp_every == 0 else ("tcp",)
        services.append(
            Service(
                index=i,
                vip=str(ipaddress.IPv4Address(_SERVICE_BASE + 1 + i)),
                endpoints=_sorted_endpoints(pod_address(i * k + j) for j in range(k)),
                protocols=protocols,
            )
        )
    return services


def with_endpoint_replaced(service: Service, generation: int) -> Service:
    """One endpoint change: the Service's first endpoint is swapped for a fresh address.

    The fresh address comes from the far end of the pool (counted down by generation) and is never
    one of the Service's current endpoints, so the Service keeps k distinct endpoints.
    """
    kept = service.endpoints[1:]
    step = 0
    while True:
        slot = _POD_HOSTS - 1 - (service.index * 7 + generation + step) % (_POD_HOSTS // 4)
        fresh = pod_address(slot)
        if fresh not in service.endpoints:
            return replace(service, endpoints=_sorted_endpoints([fresh, *kept]))
        step += 1


def group_key(service: Service, proto: str) -> GroupKey:
    return GroupKey(NAMESPACE, service.name, PORT_NAME, proto.upper(), 4)


def frontend_key(service: Service, proto: str) -> FrontendKey:
    return FrontendKey(service.vip, SERVICE_PORT, proto.upper())


def desired_state(services) -> DesiredState:
    """The DesiredState resolve would produce for these Services: one group per port, no routes."""
    frontends = {}
    groups = {}
    for svc in services:
        for proto in svc.protocols:
            gkey = group_key(svc, proto)
            groups[gkey] = BackendGroup(
                key=gkey,
                endpoints=tuple(sorted(Endpoint(ip, TARGET_PORT) for ip in svc.endpoints)),
                verdict=Verdict.FORWARD,
            )
            frontends[frontend_key(svc, proto)] = FrontendState(
                namespace=NAMESPACE,
                service=svc.name,
                port_name=PORT_NAME,
                split=(WeightedGroup(1, gkey),),
            )
    return DesiredState(frontends=frontends, groups=groups)
