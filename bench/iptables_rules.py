"""kube-proxy's iptables-mode rule layout for the synthetic Services, as iptables-restore text.

Pure: Services and an order in, restore text out. Written from the facts in BASELINES.md 8.2
(KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with the statistic-probability cascade, masquerade
marking, the nodeports rule last). The caller decides the order of Services in KUBE-SERVICES
(kube-proxy emits Go-map order, i.e. shuffled) and records each target's position.

Large-cluster mode, as kube-proxy does it: above LARGE_CLUSTER_ENDPOINTS endpoints in total, the
`-m comment` is dropped from the KUBE-SVC -> KUBE-SEP jumps and the KUBE-SEP rules.

The jumps from the built-in chains (`-I OUTPUT 1 ...`) are only in the full restore: kube-proxy
installs them once, outside its restore input, so a partial sync must not insert them again.
"""

from __future__ import annotations

from bench.naming import (
    iptables_endpoint_chain,
    iptables_service_chain,
    service_port_name,
    statistic_probability,
)
from bench.synth import NAMESPACE, PORT_NAME, POD_CIDR, SERVICE_PORT, TARGET_PORT, Service

#: kube-proxy's largeClusterEndpointsThreshold.
LARGE_CLUSTER_ENDPOINTS = 1000

_FILTER_CHAINS = (
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
)
_FILTER_JUMPS = (
    '-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-I INPUT 1 -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
    '-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    '-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
)
_FILTER_RULES = (
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
)
_NAT_TOP_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
_NAT_JUMPS = (
    '-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
)
_NAT_TOP_RULES = (
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
)
_NODEPORTS_LAST = (
    '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
    'last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS'
)


def spn(service: Service) -> str:
    return service_port_name(NAMESPACE, service.name, PORT_NAME)


def service_chain(service: Service, proto: str) -> str:
    return iptables_service_chain(spn(service), proto)


def endpoint_chains(service: Service, proto: str) -> list[str]:
    return [iptables_endpoint_chain(spn(service), proto, ep) for ep in service.endpoint_strings()]


def is_large_cluster(services) -> bool:
    return sum(len(s.endpoints) * len(s.protocols) for s in services) > LARGE_CLUSTER_ENDPOINTS


def _kube_services_rule(service: Service, proto: str) -> str:
    return (
        f'-A KUBE-SERVICES -m comment --comment "{spn(service)} cluster IP" -m {proto} -p {proto} '
        f"-d {service.vip} --dport {SERVICE_PORT} -j {service_chain(service, proto)}"
    )


def _service_chains(service: Service, proto: str, large: bool) -> tuple[list[str], list[str]]:
    """The chain declarations and rules of one Service port: its KUBE-SVC and its KUBE-SEPs."""
    name = spn(service)
    svc = service_chain(service, proto)
    seps = endpoint_chains(service, proto)
    endpoints = service.endpoint_strings()
    k = len(seps)
    chains = [f":{svc} - [0:0]"] + [f":{sep} - [0:0]" for sep in seps]
    rules = [
        f'-A {svc} -m comment --comment "{name} cluster IP" -m {proto} -p {proto} -d {service.vip} '
        f"--dport {SERVICE_PORT} ! -s {POD_CIDR} -j KUBE-MARK-MASQ"
    ]
    for j, (sep, ep) in enumerate(zip(seps, endpoints)):
        comment = "" if large else f'-m comment --comment "{name} -> {ep}" '
        if j < k - 1:
            rules.append(
                f"-A {svc} {comment}-m statistic --mode random --probability "
                f"{statistic_probability(j, k)} -j {sep}"
            )
        else:
            rules.append(f"-A {svc} {comment}-j {sep}")
    sep_comment = "" if large else f"-m comment --comment {name} "
    for sep, ip in zip(seps, service.endpoints):
        rules.append(f"-A {sep} {sep_comment}-s {ip} -j KUBE-MARK-MASQ")
        rules.append(
            f"-A {sep} {sep_comment}-m {proto} -p {proto} -j DNAT --to-destination {ip}:{TARGET_PORT}"
        )
    return chains, rules


def _filter_section(with_jumps: bool) -> list[str]:
    lines = ["*filter"] + [f":{c} - [0:0]" for c in _FILTER_CHAINS]
    if with_jumps:
        lines += _FILTER_JUMPS
    return lines + list(_FILTER_RULES) + ["COMMIT"]


def full_restore(order: list[Service], large: bool | None = None) -> str:
    """The whole rule set, Services in KUBE-SERVICES in `order` (each one's ports side by side)."""
    if large is None:
        large = is_large_cluster(order)
    chain_lines = [f":{c} - [0:0]" for c in _NAT_TOP_CHAINS]
    rule_lines = list(_NAT_JUMPS) + list(_NAT_TOP_RULES)
    for service in order:
        for proto in service.protocols:
            rule_lines.append(_kube_services_rule(service, proto))
            chains, rules = _service_chains(service, proto, large)
            chain_lines += chains
            rule_lines += rules
    rule_lines.append(_NODEPORTS_LAST)
    lines = _filter_section(True) + ["*nat"] + chain_lines + rule_lines + ["COMMIT"]
    return "\n".join(lines) + "\n"


def partial_restore(order: list[Service], old: Service, new: Service, large: bool) -> str:
    """kube-proxy's partial sync after `old` became `new` (same index, other endpoints).

    As kube-proxy writes it: the top-level chains again, the whole KUBE-SERVICES chain, the
    filter rules, only the changed Service's KUBE-SVC/KUBE-SEP chains, and `-X` for the endpoint
    chains that went away. `order` is the current KUBE-SERVICES order (it already holds `new`).
    """
    chain_lines = [f":{c} - [0:0]" for c in _NAT_TOP_CHAINS]
    rule_lines = list(_NAT_TOP_RULES)
    deleted = []
    for service in order:
        for proto in service.protocols:
            rule_lines.append(_kube_services_rule(service, proto))
    for proto in new.protocols:
        chains, rules = _service_chains(new, proto, large)
        chain_lines += chains
        rule_lines += rules
        deleted += sorted(set(endpoint_chains(old, proto)) - set(endpoint_chains(new, proto)))
    rule_lines.append(_NODEPORTS_LAST)
    # A chain must be empty to be deleted: declaring it again flushes it, as kube-proxy does.
    chain_lines += [f":{chain} - [0:0]" for chain in deleted]
    rule_lines += [f"-X {chain}" for chain in deleted]
    lines = _filter_section(False) + ["*nat"] + chain_lines + rule_lines + ["COMMIT"]
    return "\n".join(lines) + "\n"
