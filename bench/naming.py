"""How kube-proxy names its chains and words its probabilities, reproduced for the generators.

Pure: strings in, strings out. The rules (BASELINES.md section 8.4):
- b32(x) is RFC 4648 base32 (upper case) of sha256(x as UTF-8);
- iptables: "KUBE-SVC-" + b32(SPN + proto)[:16], "KUBE-SEP-" + b32(SPN + proto + "IP:port")[:16],
  with SPN = "ns/name:portname" (or "ns/name" for an unnamed port);
- nftables: prefix + b32(name)[:8] + "-" + name, cut to 237 chars + "..." beyond 240, with
  name = "ns/svc/proto/portname" (endpoint: name + "__IP/port");
- the statistic probability on rule j of k (all but the last) is 1/(k-j) with 10 decimals.
"""

from __future__ import annotations

import base64
import hashlib

#: kube-proxy cuts nftables chain names longer than this (nft's limit is 256 with the prefix).
NFT_CHAIN_MAX = 240


def b32_sha256(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def service_port_name(namespace: str, name: str, port_name: str) -> str:
    """The iptables "SPN": ns/name:port, or ns/name when the port is unnamed."""
    return f"{namespace}/{name}:{port_name}" if port_name else f"{namespace}/{name}"


def iptables_service_chain(spn: str, proto: str) -> str:
    return "KUBE-SVC-" + b32_sha256(spn + proto)[:16]


def iptables_endpoint_chain(spn: str, proto: str, endpoint: str) -> str:
    """`endpoint` is "IP:port" exactly as kube-proxy formats it."""
    return "KUBE-SEP-" + b32_sha256(spn + proto + endpoint)[:16]


def nft_service_name(namespace: str, name: str, proto: str, port_name: str) -> str:
    return f"{namespace}/{name}/{proto}/{port_name}"


def nft_endpoint_name(service_name: str, ip: str, port: int) -> str:
    return f"{service_name}__{ip}/{port}"


def nft_chain(prefix: str, name: str) -> str:
    """prefix is "service-", "endpoint-" or "affinity-"."""
    chain = prefix + b32_sha256(name)[:8] + "-" + name
    if len(chain) > NFT_CHAIN_MAX:
        chain = chain[: NFT_CHAIN_MAX - 3] + "..."
    return chain


def statistic_probability(j: int, k: int) -> str:
    """The --probability of rule j (0-based) in a cascade of k endpoints: 1/(k-j), 10 decimals."""
    return "%0.10f" % (1.0 / (k - j))
