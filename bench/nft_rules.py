"""kube-proxy's nftables-mode layout for the synthetic Services, as `nft -f` input text.

Pure: Services in, one transaction's text out. Written from BASELINES.md (the base ruleset, 8.3):
a `service-ips` verdict map dispatches ClusterIP . proto . port to a per-Service chain, which
picks an endpoint with `numgen random mod k` and jumps to a per-endpoint chain that DNATs.

Invariants: every chain is declared before a rule names it (nft resolves names in file order);
elements are added in batches of ELEMENT_BATCH so 50k Services stay one reasonable transaction.
"""

from __future__ import annotations

from bench.naming import nft_chain, nft_endpoint_name, nft_service_name
from bench.synth import NAMESPACE, PORT_NAME, POD_CIDR, SERVICE_CIDR, SERVICE_PORT, TARGET_PORT, Service

ELEMENT_BATCH = 1000
TABLE = "ip kube-proxy"

_BASE = """\
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { {SERVICE_CIDR} } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element ip kube-proxy nodeport-ips { {NODE_IP} }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"""


def base_ruleset(node_ip: str) -> str:
    return _BASE.replace("{SERVICE_CIDR}", SERVICE_CIDR).replace("{NODE_IP}", node_ip)


def service_name(service: Service, proto: str) -> str:
    return nft_service_name(NAMESPACE, service.name, proto, PORT_NAME)


def service_chain(service: Service, proto: str) -> str:
    return nft_chain("service-", service_name(service, proto))


def endpoint_chain(service: Service, proto: str, ip: str) -> str:
    return nft_chain("endpoint-", nft_endpoint_name(service_name(service, proto), ip, TARGET_PORT))


def _service_rules(service: Service, proto: str) -> list[str]:
    """The rules of one Service port's chain; the chain and its endpoint chains already exist."""
    svc = service_chain(service, proto)
    vmap = " , ".join(
        f"{j} : goto {endpoint_chain(service, proto, ip)}" for j, ip in enumerate(service.endpoints)
    )
    return [
        f"add rule {TABLE} {svc} ip daddr {service.vip} {proto} dport {SERVICE_PORT} "
        f"ip saddr != {POD_CIDR} jump mark-for-masquerade",
        f"add rule {TABLE} {svc} numgen random mod {len(service.endpoints)} vmap {{ {vmap} }}",
    ]


def _endpoint_rules(service: Service, proto: str, ip: str) -> list[str]:
    chain = endpoint_chain(service, proto, ip)
    return [
        f"add rule {TABLE} {chain} ip saddr {ip} jump mark-for-masquerade",
        f"add rule {TABLE} {chain} meta l4proto {proto} dnat to {ip}:{TARGET_PORT}",
    ]


def _batched(prefix: str, items: list[str]) -> list[str]:
    return [
        f"{prefix} {{ {' , '.join(items[i : i + ELEMENT_BATCH])} }}"
        for i in range(0, len(items), ELEMENT_BATCH)
    ]


def full_ruleset(services, node_ip: str) -> str:
    """Base ruleset plus every Service: one `nft -f` transaction, like kube-proxy's full sync."""
    lines = [base_ruleset(node_ip).rstrip("\n")]
    cluster_ips, service_ips = [], []
    for service in services:
        for proto in service.protocols:
            lines.append(f"add chain {TABLE} {service_chain(service, proto)}")
            lines += [f"add chain {TABLE} {endpoint_chain(service, proto, ip)}" for ip in service.endpoints]
            lines += _service_rules(service, proto)
            for ip in service.endpoints:
                lines += _endpoint_rules(service, proto, ip)
            service_ips.append(f"{service.vip} . {proto} . {SERVICE_PORT} : goto {service_chain(service, proto)}")
        cluster_ips.append(service.vip)
    lines += _batched(f"add element {TABLE} cluster-ips", cluster_ips)
    lines += _batched(f"add element {TABLE} service-ips", service_ips)
    return "\n".join(lines) + "\n"


def partial_ruleset(old: Service, new: Service) -> str:
    """kube-proxy's partial sync after `old` became `new`: new endpoint chains, the Service chain
    rewritten (flush + add), stale endpoint chains flushed and deleted; no element changes because
    the ClusterIP did not move."""
    lines = []
    for proto in new.protocols:
        added = [ip for ip in new.endpoints if ip not in old.endpoints]
        gone = [ip for ip in old.endpoints if ip not in new.endpoints]
        lines += [f"add chain {TABLE} {endpoint_chain(new, proto, ip)}" for ip in added]
        for ip in added:
            lines += _endpoint_rules(new, proto, ip)
        lines.append(f"flush chain {TABLE} {service_chain(new, proto)}")
        lines += _service_rules(new, proto)
        for ip in gone:
            lines.append(f"flush chain {TABLE} {endpoint_chain(old, proto, ip)}")
            lines.append(f"delete chain {TABLE} {endpoint_chain(old, proto, ip)}")
    return "\n".join(lines) + "\n"
