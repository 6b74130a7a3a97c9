"""Which live sockets lost their endpoint: the rule of SEMANTICS A16, for sockets already connected.

Role: pure. Given one socket as sock_diag listed it (its peer address and the value it holds in
meshlet's socket storage, `struct sock_state`) and the desired state just written, say whether
it must be terminated and why. The caller (agent/runtime/stale.py) lists and destroys; nothing
here does I/O.

A socket is ours to judge only if meshlet translated it: a TCP socket's storage, or a connected UDP
socket's entry in the `udp_flows` map (by socket cookie: sock_diag returns socket storage for TCP
only), holds a translation whose endpoint is the socket's peer. A socket without storage (opened from a skipped pod, or before
meshlet), or connected straight to a pod IP (no translation names that peer), is never touched.

The remembered translation names the frontend, the view it was picked in (scope 0 = the default
view, else a consumer namespace's) and the endpoint. It must go when:
- `frontend_removed`: no view of that frontend exists any more (the Service or port is gone);
- `endpoint_removed`: the frontend still exists but no group of the client's current view
  (its scope's entry if there is one, else the default) offers that endpoint any more.
The client's current view is looked up anew: a consumer route removed since the pick means the
default view now applies, and the socket stays only if the default view still offers its endpoint.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.datapath import layout as L
from agent.datapath.plan import scope_id
from agent.model import DEFAULT_SCOPE, DesiredState, Endpoint, FrontendKey, Verdict

FRONTEND_REMOVED = "frontend_removed"
ENDPOINT_REMOVED = "endpoint_removed"
#: Every reason a socket is terminated for: the `reason` label of the metric (a closed set).
REASONS = (ENDPOINT_REMOVED, FRONTEND_REMOVED)

PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}


@dataclass(frozen=True)
class Translation:
    """One remembered translation of a socket (a used `struct sock_xlat`)."""

    frontend: str  #: address text, IPv4 dotted (mapped addresses unmapped)
    frontend_port: int
    endpoint: str
    endpoint_port: int
    scope: int  #: the view the pick used: 0 default, else scope_id(namespace)


def address_text(raw16: bytes) -> str:
    """16 stored bytes (IPv4 mapped) as the model writes addresses."""
    ip = ipaddress.IPv6Address(bytes(raw16))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def _port(network_order: int) -> int:
    return int.from_bytes(network_order.to_bytes(2, "little"), "big")


def translations(storage: bytes) -> list[Translation]:
    """The used translations in a socket's storage value (`struct sock_state`)."""
    st = L.SockState.from_buffer_copy(storage[:L.ct.sizeof(L.SockState)])
    return [Translation(address_text(bytes(x.frontend)), _port(x.frontend_port), address_text(bytes(x.endpoint)),
                        _port(x.endpoint_port), x.scope)
            for x in st.xlat if x.used]


def translation_to(storage: bytes, peer: str, peer_port: int) -> Translation | None:
    """The translation that made this socket's peer, or None: the socket is not ours."""
    for xlat in translations(storage):
        if xlat.endpoint == peer and xlat.endpoint_port == peer_port:
            return xlat
    return None


class Judge:
    """Judges sockets against one desired state (built once per sweep: it caches lookups)."""

    def __init__(self, state: DesiredState):
        self.state = state
        namespaces = {pod.namespace for pod in state.clients.values()}
        namespaces.update(key.scope for key in state.frontends if key.scope != DEFAULT_SCOPE)
        self._namespace_of_scope = {scope_id(ns): ns for ns in namespaces}
        self._offered: dict[FrontendKey, frozenset[Endpoint]] = {}

    def verdict(self, protocol: int, xlat: Translation) -> str | None:
        """A reason from REASONS when the socket must be terminated, else None."""
        proto = PROTOCOL_NAMES.get(protocol)
        if proto is None:
            return None
        default = FrontendKey(xlat.frontend, xlat.frontend_port, proto)
        namespace = self._namespace_of_scope.get(xlat.scope, DEFAULT_SCOPE) if xlat.scope else DEFAULT_SCOPE
        view = FrontendKey(xlat.frontend, xlat.frontend_port, proto, namespace)
        if view not in self.state.frontends:
            view = default
        if view not in self.state.frontends:
            return FRONTEND_REMOVED
        if Endpoint(xlat.endpoint, xlat.endpoint_port) not in self._offered_by(view):
            return ENDPOINT_REMOVED
        return None

    def _offered_by(self, key: FrontendKey) -> frozenset[Endpoint]:
        """Every endpoint some group of this frontend view may pick."""
        offered = self._offered.get(key)
        if offered is None:
            eps: set[Endpoint] = set()
            for share in self.state.frontends[key].split:
                group = self.state.groups.get(share.group) if share.group is not None else None
                if group is not None and group.verdict == Verdict.FORWARD and share.weight > 0:
                    eps.update(group.endpoints)
            offered = self._offered[key] = frozenset(eps)
        return offered


def flow_translation(value: bytes, peer: str, peer_port: int) -> Translation | None:
    """The translation in a `udp_flows` value (one `struct sock_xlat`) if it made this peer."""
    x = L.SockXlat.from_buffer_copy(value[:L.ct.sizeof(L.SockXlat)])
    xlat = Translation(address_text(bytes(x.frontend)), _port(x.frontend_port), address_text(bytes(x.endpoint)),
                       _port(x.endpoint_port), x.scope)
    return xlat if x.used and xlat.endpoint == peer and xlat.endpoint_port == peer_port else None


def translation_of(sk, flow_value: bytes | None) -> Translation | None:
    """What meshlet translated this listed socket (sockdiag.DiagSocket) to, or None if it did not:
    a UDP socket by its `udp_flows` entry (`flow_value`, looked up by its cookie), a TCP one by
    its socket storage. Either must name the socket's peer as the endpoint."""
    peer = address_text(sk.peer)
    if sk.protocol == 17:
        return flow_translation(flow_value, peer, sk.peer_port) if flow_value else None
    return translation_to(sk.storage, peer, sk.peer_port) if sk.storage else None
