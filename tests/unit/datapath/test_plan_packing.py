"""plan packs map entries with struct formats for speed; layout's ctypes classes are the mirror of
bpf/meshlet.h. These tests build the same entries both ways and compare the bytes, so the two
can never drift apart (the kernel tests check layout against what bcc compiled). A plan's compact
forms (set blobs, short values) are expanded with plan's own functions before comparing."""

import socket

from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.model import (
    BackendGroup,
    ClientPod,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteRef,
    Verdict,
    WeightedGroup,
)

GROUP = GroupKey("shop", "web", "http", "TCP", 4)
GROUP6 = GroupKey("shop", "web", "http", "TCP", 6)


def test_group_entries_match_the_ctypes_layout():
    group = BackendGroup(GROUP, (Endpoint("10.244.0.5", 8080), Endpoint("10.244.1.7", 65535)),
                         Verdict.FORWARD, affinity_timeout=10800)
    entries = P.plan_group(group)
    gid = P.group_id(GROUP)
    sid = P.set_id(gid, group.endpoints)
    assert entries.key == bytes(L.U64(gid))
    assert entries.value == bytes(L.GroupValue(set_id=sid, count=2, affinity_timeout_s=10800,
                                               verdict=Verdict.FORWARD, flags=L.GROUP_PASSIVE_HEALTH))
    expected_eps, expected_members = {}, {}
    for index, ep in enumerate(group.endpoints):
        value = L.EpValue(port=socket.htons(ep.port), family=4)
        value.addr[:] = E.addr16(ep.address)
        expected_eps[bytes(L.EpKey(set_id=sid, index=index))] = bytes(value)
        member = L.MemberKey(set_id=sid, port=socket.htons(ep.port))
        member.addr[:] = E.addr16(ep.address)
        expected_members[bytes(member)] = bytes(L.U32(index))
        assert E.member_key_bytes(sid, value) == bytes(member) == E.member_key_bytes(sid, bytes(value))
    assert dict(E.ENDPOINT_SETS.entries(sid, entries.endpoints)) == expected_eps
    assert dict(E.MEMBER_SETS.entries(sid, entries.members)) == expected_members
    assert E.full_value("names", entries.name) == bytes(L.NameValue(str(GROUP).encode()))


def test_ipv6_endpoint_and_rejecting_group_match_the_ctypes_layout():
    v6 = P.plan_group(BackendGroup(GROUP6, (Endpoint("fd00::5", 80),), Verdict.FORWARD))
    (key, value), = E.ENDPOINT_SETS.entries(v6.set_id, v6.endpoints)
    decoded = L.EpValue.from_buffer_copy(value)
    assert bytes(decoded.addr) == socket.inet_pton(socket.AF_INET6, "fd00::5")
    assert (decoded.port, decoded.family) == (socket.htons(80), 6)
    assert v6.members == b""
    reject = P.plan_group(BackendGroup(GROUP, (), Verdict.UNREACHABLE, passive_health=False))
    assert reject.value == bytes(L.GroupValue(verdict=Verdict.UNREACHABLE))
    assert (reject.set_id, reject.endpoints) == (0, b"")


def test_frontend_entries_match_the_ctypes_layout():
    route = RouteRef("HTTPRoute", "shop", "canary", 0)
    fe = FrontendState("shop", "web", "http", (WeightedGroup(90, GROUP), WeightedGroup(10, None)), route)
    group = P.plan_group(BackendGroup(GROUP, (Endpoint("10.244.0.5", 8080),), Verdict.FORWARD, affinity_timeout=30))
    values = {P.group_id(GROUP): group.value}
    key, value, names = P.plan_frontend(FrontendKey("10.96.0.10", 80, "TCP", "consumer-ns"), fe, has_scopes=True,
                                        group_values=values)
    expected_key = L.FeKey(port=socket.htons(80), proto=6, scope=P.scope_id("consumer-ns"))
    expected_key.addr[:] = E.addr16("10.96.0.10")
    assert key == bytes(expected_key)
    expected = L.FeValue(verdict=L.VERDICT_FORWARD, nslots=2, flags=0, route_id=P.route_id(route))
    copy = L.GroupValue.from_buffer_copy(group.value)
    for i, (threshold, gid) in enumerate(P.split_slots(fe.split)):
        expected.slots[i].threshold = threshold
        expected.slots[i].group_id = gid
        if gid:  # the group's value copied into its slot; the rejected share copies nothing
            for name in ("set_id", "count", "affinity_timeout_s", "verdict", "flags"):
                setattr(expected.slots[i], name, getattr(copy, name))
    assert expected.slots[0].set_id == group.set_id != 0 and expected.slots[0].affinity_timeout_s == 30
    assert E.full_value("frontends", value) == bytes(expected)
    # A group with no value to copy is marked so (the connect counts a miss, never picks from set 0).
    _key, value, _names = P.plan_frontend(FrontendKey("10.96.0.10", 80, "TCP"), fe, has_scopes=False, group_values={})
    assert L.FeValue.from_buffer_copy(E.full_value("frontends", value)).slots[0].verdict == L.VERDICT_NO_GROUP
    assert E.full_value("names", names[bytes(L.U64(P.route_id(route)))]) == bytes(L.NameValue(str(route).encode()))

    empty = FrontendState("shop", "web", "http", ())
    _key, value, _names = P.plan_frontend(FrontendKey("10.96.0.10", 80, "TCP"), empty, has_scopes=True, group_values={})
    assert E.full_value("frontends", value) == bytes(L.FeValue(verdict=L.VERDICT_REJECT, flags=L.FE_HAS_SCOPES))


def test_client_and_long_name_match_the_ctypes_layout():
    key, value, names = P.plan_client(ClientPod("uid-1", "n" * 200, "pod", skip=True), 4242)
    assert key == bytes(L.U64(4242))
    scope = P.scope_id("n" * 200)
    assert value == bytes(L.ClientValue(scope=scope, flags=L.CLIENT_SKIP))
    # A name longer than the field is cut, and the field still ends with a NUL.
    assert {k: E.full_value("names", v) for k, v in names.items()} == {
        bytes(L.U64(scope)): bytes(L.NameValue(b"n" * (L.NAME_LEN - 1))),
        bytes(L.U64(4242 | L.POD_NAME_TAG)): bytes(L.NameValue(b"n" * (L.NAME_LEN - 1)))}  # "nnn.../pod", cut


def test_passive_health_is_the_group_flag():
    on = P.plan_group(BackendGroup(GROUP, (Endpoint("10.244.0.5", 80),), Verdict.FORWARD))
    off = P.plan_group(BackendGroup(GROUP, (Endpoint("10.244.0.5", 80),), Verdict.FORWARD, passive_health=False))
    assert L.GroupValue.from_buffer_copy(on.value).flags == L.GROUP_PASSIVE_HEALTH
    assert L.GroupValue.from_buffer_copy(off.value).flags == 0
    assert E.group_value_fields(off.value)[4] == 0
