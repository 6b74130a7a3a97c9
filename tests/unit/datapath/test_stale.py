"""Which live sockets lost their endpoint (SEMANTICS A16): agent/datapath/stale.py, table-driven.

Translations are built the way the programs store them (layout.SockXlat / SockState bytes, ports in
network order, IPv4 mapped), so the decoding is tested together with the rule.
"""

import socket

import pytest

from agent.datapath import layout as L
from agent.datapath import stale as S
from agent.datapath.plan import addr16, scope_id
from agent.datapath.sockdiag import DiagSocket
from agent.model import (BackendGroup, ClientPod, DesiredState, Endpoint, FrontendKey, FrontendState, GroupKey,
                         Verdict, WeightedGroup)

DNS = GroupKey("kube-system", "dns", "dns", "UDP", 4)
CANARY = GroupKey("kube-system", "dns-canary", "dns", "UDP", 4)
E1, E2, E3 = Endpoint("10.244.0.11", 53), Endpoint("10.244.0.12", 53), Endpoint("10.244.0.13", 53)


def state(default=(E1, E2), scoped=None, canary_weight=0, frontend=True, verdict=Verdict.FORWARD):
    groups = {DNS: BackendGroup(DNS, tuple(default) if verdict == Verdict.FORWARD else (), verdict),
              CANARY: BackendGroup(CANARY, (E3,), Verdict.FORWARD)}
    frontends = {}
    if frontend:
        frontends[FrontendKey("10.96.0.10", 53, "UDP")] = FrontendState(
            "kube-system", "dns", "dns", (WeightedGroup(1, DNS), WeightedGroup(canary_weight, CANARY)))
    if scoped is not None:
        frontends[FrontendKey("10.96.0.10", 53, "UDP", "team-a")] = FrontendState(
            "kube-system", "dns", "dns", tuple(WeightedGroup(1, g) for g in scoped))
    return DesiredState(frontends=frontends, groups=groups,
                        clients={"u": ClientPod("u", "team-a", "client")})


def xlat_bytes(endpoint: Endpoint, scope: str = "") -> bytes:
    x = L.SockXlat(frontend_port=socket.htons(53), endpoint_port=socket.htons(endpoint.port), used=1,
                   scope=scope_id(scope))
    x.frontend[:] = addr16("10.96.0.10")
    x.endpoint[:] = addr16(endpoint.address)
    return bytes(x)


def udp_socket(peer: Endpoint) -> DiagSocket:
    return DiagSocket(socket.AF_INET, socket.IPPROTO_UDP, 1, addr16("10.244.0.2"), 40000,
                      addr16(peer.address), peer.port, None, bytes(48))


CASES = [
    # (what, the state now, the socket's endpoint, the view it was picked in, expected)
    ("endpoint still offered", state(), E1, "", None),
    ("endpoint removed", state(default=(E2,)), E1, "", S.ENDPOINT_REMOVED),
    ("group has no endpoints left", state(verdict=Verdict.REJECT), E1, "", S.ENDPOINT_REMOVED),
    ("frontend deleted", state(frontend=False), E1, "", S.FRONTEND_REMOVED),
    ("weight 0 offers nothing", state(), E3, "", S.ENDPOINT_REMOVED),
    ("weighted group offers its endpoints", state(canary_weight=1), E3, "", None),
    ("consumer view still offers it", state(scoped=(CANARY,)), E3, "team-a", None),
    ("consumer view no longer offers it", state(scoped=(DNS,)), E3, "team-a", S.ENDPOINT_REMOVED),
    ("consumer route gone: the default view decides", state(), E1, "team-a", None),
]


@pytest.mark.parametrize("what,now,endpoint,scope,expected", CASES, ids=[c[0] for c in CASES])
def test_a_translated_connected_udp_socket_is_judged_by_the_current_view(what, now, endpoint, scope, expected):
    xlat = S.translation_of(udp_socket(endpoint), xlat_bytes(endpoint, scope))
    assert xlat is not None
    assert S.Judge(now).verdict(socket.IPPROTO_UDP, xlat) == expected


def test_a_socket_meshlet_did_not_translate_is_never_judged():
    direct = udp_socket(E1)
    assert S.translation_of(direct, None) is None, "no udp_flows entry: not ours"
    assert S.translation_of(direct, xlat_bytes(E2)) is None, "an entry for another peer (a reconnect elsewhere)"
    tcp = DiagSocket(socket.AF_INET, socket.IPPROTO_TCP, 1, addr16("10.244.0.2"), 40000,
                     addr16(E1.address), E1.port, None, bytes(48))
    assert S.translation_of(tcp, None) is None, "a TCP socket without our socket storage"


def test_a_tcp_socket_is_found_by_its_socket_storage():
    st = L.SockState()
    st.xlat[3] = L.SockXlat.from_buffer_copy(xlat_bytes(E2))
    tcp = DiagSocket(socket.AF_INET6, socket.IPPROTO_TCP, 1, addr16("10.244.0.2"), 40000,
                     addr16(E2.address), E2.port, bytes(st), bytes(48))
    xlat = S.translation_of(tcp, None)
    assert (xlat.frontend, xlat.frontend_port, xlat.endpoint, xlat.endpoint_port) == ("10.96.0.10", 53, E2.address, 53)
    tcp_state = DesiredState(frontends={FrontendKey("10.96.0.10", 53, "TCP"): FrontendState(
        "kube-system", "dns", "dns", (WeightedGroup(1, DNS),))}, groups=state().groups)
    assert S.Judge(tcp_state).verdict(socket.IPPROTO_TCP, xlat) is None
    assert S.Judge(DesiredState()).verdict(socket.IPPROTO_TCP, xlat) == S.FRONTEND_REMOVED
