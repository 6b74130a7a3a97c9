"""plan without the kernel: golden map dumps, the weighted split's arithmetic, ids, header constants.

Golden files (testdata/*.txt) hold the canonical dump (agent.datapath.dump.render) of the maps
after each step of a scenario, written through the reconciler into in-memory maps; the same dump
of the expanded plan (Plan.expand) must match it. After a
deliberate change, regenerate them with MESHLET_UPDATE_GOLDEN=1 and review the diff.
"""

import ctypes as ct
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest

from agent.datapath import dump as D
from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.datapath.reconcile import DictMap, Reconciler, dict_maps
from agent.model import (
    BackendGroup,
    ClientPod,
    DesiredState,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteRef,
    Verdict,
    WeightedGroup,
)

TESTDATA = Path(__file__).parent / "testdata"
HEADER = Path(__file__).resolve().parents[3] / "bpf" / "meshlet.h"


# --- golden dumps ------------------------------------------------------------------------------

WEB4 = GroupKey("shop", "web", "http", "TCP", 4)
WEB6 = GroupKey("shop", "web", "http", "TCP", 6)
CANARY4 = GroupKey("shop", "web-canary", "http", "TCP", 4)
DNS4 = GroupKey("kube-system", "dns", "dns", "UDP", 4)
LOCAL4 = GroupKey("shop", "local", "", "TCP", 4)


def eps(*addresses, port=8080):
    return tuple(sorted(Endpoint(a, port) for a in addresses))


def split(*shares, route=None, service="web"):
    return FrontendState("shop", service, "http", tuple(WeightedGroup(w, g) for w, g in shares), route)


ROUTE = RouteRef("HTTPRoute", "team-a", "canary", 0)


def scenario() -> list[tuple[str, DesiredState, dict[str, int]]]:
    clients = {"uid-a": ClientPod("uid-a", "team-a", "app"), "uid-q": ClientPod("uid-q", "quiet", "q", skip=True)}
    cgroups = {"uid-a": 4101, "uid-q": 4102}
    groups = {
        WEB4: BackendGroup(WEB4, eps("10.244.0.5", "10.244.0.6"), Verdict.FORWARD),
        WEB6: BackendGroup(WEB6, eps("fd00:244::5"), Verdict.FORWARD),
        CANARY4: BackendGroup(CANARY4, eps("10.244.0.9"), Verdict.FORWARD, affinity_timeout=10800),
        DNS4: BackendGroup(DNS4, eps("10.244.0.2", port=53), Verdict.FORWARD),
        LOCAL4: BackendGroup(LOCAL4, (), Verdict.UNREACHABLE),
    }
    frontends = {
        FrontendKey("10.96.0.10", 80, "TCP"): split((1, WEB4)),
        FrontendKey("fd00:96::10", 80, "TCP"): split((1, WEB6)),
        FrontendKey("10.96.0.53", 53, "UDP"): split((1, DNS4), service="dns"),
        FrontendKey("10.96.0.20", 80, "TCP"): split((1, LOCAL4), service="local"),
        FrontendKey("10.96.0.30", 80, "TCP"): split(service="empty"),
    }
    add = DesiredState(frontends=dict(frontends), groups=dict(groups), clients=clients)

    scaled_groups = dict(groups)
    scaled_groups[WEB4] = BackendGroup(WEB4, eps("10.244.0.6", "10.244.0.7", "10.244.0.8"), Verdict.FORWARD)
    scale = DesiredState(frontends=dict(frontends), groups=scaled_groups, clients=clients)

    consumer_frontends = dict(frontends)
    consumer_frontends[FrontendKey("10.96.0.10", 80, "TCP", "team-a")] = split(
        (1, WEB4), (999, CANARY4), (0, WEB4), (3, None), route=ROUTE)
    consumer = DesiredState(frontends=consumer_frontends, groups=scaled_groups, clients=clients)

    return [("01-add", add, cgroups), ("02-scale", scale, cgroups), ("03-consumer-route", consumer, cgroups),
            ("04-delete-all", DesiredState(), {})]


def test_golden_map_dumps_step_by_step():
    maps = dict_maps(1000)
    rec = Reconciler(maps)
    for step, state, cgroups in scenario():
        planned = P.plan(state, cgroups)
        rec.full(planned)
        text = D.render(D.decode({name: dict(m.data) for name, m in maps.items()}))
        path = TESTDATA / f"{step}.txt"
        if os.environ.get("MESHLET_UPDATE_GOLDEN") == "1":
            path.write_text(text)
        assert text == path.read_text(), f"{step}: maps differ from {path} (see the module docstring)"
        assert D.render(D.decode(planned.expand())) == text, f"{step}: the expanded plan differs from the maps"


def test_the_same_state_always_plans_the_same_bytes():
    (_, state, cgroups), *_ = scenario()
    assert P.plan(state, cgroups).expand() == P.plan(state, dict(reversed(list(cgroups.items())))).expand()


# --- the weighted split ------------------------------------------------------------------------


def probabilities(slots):
    previous, out = 0, {}
    for threshold, gid in slots:
        out[gid] = out.get(gid, 0) + Fraction(threshold - previous, L.THRESHOLD_SCALE)
        previous = threshold
    return out


G = [GroupKey("ns", f"s{i}", "", "TCP", 4) for i in range(4)]


@pytest.mark.parametrize("weights", [
    (1, 999), (999, 1), (3, 3, 3), (1, 1, 1), (7, 0, 7), (0, 5), (1, 2, 3, 4), (2**31 - 1, 1),
    (1_000_000, 3, 1),
])
def test_each_share_is_its_weight_over_the_total_within_1e_minus_6(weights):
    shares = [WeightedGroup(w, G[i]) for i, w in enumerate(weights)]
    slots = P.split_slots(shares)
    assert slots[-1][0] == L.THRESHOLD_SCALE, "the last threshold closes the interval"
    assert all(a[0] <= b[0] for a, b in zip(slots, slots[1:])), "thresholds are cumulative"
    got = probabilities(slots)
    total = sum(weights)
    for i, w in enumerate(weights):
        p = got.get(P.group_id(G[i]), 0)
        assert abs(float(p) - w / total) < 1e-6, (i, w)
        if w == 0:
            assert p == 0, "a zero weight is never chosen (SEMANTICS B12)"


def test_rejected_shares_become_one_slot_with_group_id_0_and_all_zero_is_an_empty_split():
    slots = P.split_slots([WeightedGroup(1, G[0]), WeightedGroup(2, None), WeightedGroup(1, None)])
    assert probabilities(slots) == {P.group_id(G[0]): Fraction(1, 4), 0: Fraction(3, 4)}
    assert P.split_slots([WeightedGroup(0, G[0]), WeightedGroup(0, None)]) == []
    key, value, _ = P.plan_frontend(FrontendKey("10.0.0.1", 80, "TCP"), split(), has_scopes=False, group_values={})
    assert L.FeValue.from_buffer_copy(E.full_value("frontends", value)).verdict == L.VERDICT_REJECT


def test_a_split_wider_than_the_slots_is_refused_with_the_limit():
    many = tuple(WeightedGroup(1, GroupKey("ns", f"s{i}", "", "TCP", 4)) for i in range(L.MAX_SLOTS + 1))
    state = FrontendState("ns", "s", "", many)
    with pytest.raises(P.PlanError, match=f"at most {L.MAX_SLOTS}"):
        P.plan_frontend(FrontendKey("10.0.0.1", 80, "TCP"), state, has_scopes=False, group_values={})


# --- ids and addresses -------------------------------------------------------------------------


def test_ipv4_is_keyed_as_ipv4_mapped_so_both_socket_families_hit_the_same_entry():
    assert E.addr16("10.96.0.10") == bytes(10) + b"\xff\xff" + bytes([10, 96, 0, 10])
    assert P.frontend_key_bytes("10.96.0.10", 80, "TCP", "") == P.frontend_key_bytes(
        "10.96.0.10", 80, "TCP", "")
    key = L.FeKey.from_buffer_copy(P.frontend_key_bytes("fd00::1", 443, "UDP", ""))
    assert bytes(key)[16:18] == (443).to_bytes(2, "big") and key.proto == 17


def test_a_scope_id_collision_between_namespaces_in_use_is_refused():
    seen = {}
    for i in range(400_000):  # a 32-bit birthday collision needs ~80k names on average
        ns = f"ns-{i}"
        sid = P.scope_id(ns)
        if sid in seen:
            break
        seen[sid] = ns
    else:
        pytest.fail("no collision found")
    a, b = seen[sid], ns
    state = DesiredState(frontends={FrontendKey("10.0.0.1", 80, "TCP", a): split((1, G[0]))},
                         groups={G[0]: BackendGroup(G[0], eps("10.1.0.1"), Verdict.FORWARD)},
                         clients={"u": ClientPod("u", b, "p")})
    with pytest.raises(P.PlanError, match="same client scope id"):
        P.plan(state, {"u": 1})


def endpoint_entries(group: BackendGroup) -> dict[bytes, bytes]:
    planned = P.plan_group(group)
    return dict(E.ENDPOINT_SETS.entries(planned.set_id, planned.endpoints))


def test_a_new_endpoint_set_gets_new_keys_and_the_same_set_the_same_keys():
    g1 = BackendGroup(WEB4, eps("10.244.0.5"), Verdict.FORWARD)
    g2 = BackendGroup(WEB4, eps("10.244.0.5", "10.244.0.6"), Verdict.FORWARD)
    assert set(endpoint_entries(g1)).isdisjoint(endpoint_entries(g2))
    assert endpoint_entries(g1) == endpoint_entries(BackendGroup(WEB4, eps("10.244.0.5"), Verdict.FORWARD))


# --- the header and its mirrors ----------------------------------------------------------------


def header_defines() -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"#define (\w+) (\d+|0x[0-9a-fA-F]+)\b", HEADER.read_text())}


def test_layout_constants_equal_the_header_defines():
    defines = header_defines()
    for name in ("MAX_SLOTS", "SOCK_XLATS", "NAME_LEN", "MAX_POD_DEPTH", "VERDICT_FORWARD", "VERDICT_REJECT",
                 "VERDICT_UNREACHABLE", "FE_HAS_SCOPES", "CLIENT_SKIP", "CONFIG_CLIENT_SKIPS", "OUT_COUNT",
                 "TRACE_RING_BYTES", "TRACE_MATCH_FRONTEND", "TRACE_MATCH_CLIENT",
                 "EJECT_SLOTS", "GROUP_PASSIVE_HEALTH", "HEALTH_FAILURES", "HEALTH_BACKOFF_NS",
                 "HEALTH_BACKOFF_MAX_NS", "HEALTH_MAX_DOUBLINGS", "HSTAT_COUNT",
                 "COUNT_REPICKED"):
        assert defines[name] == getattr(L, name), name
    stats = {v: k[len("HSTAT_"):].lower() for k, v in defines.items() if k.startswith("HSTAT_") and k != "HSTAT_COUNT"}
    assert stats == L.HEALTH_STATS
    outcomes = {v: k[len("OUT_"):].lower() for k, v in defines.items() if k.startswith("OUT_") and k != "OUT_COUNT"}
    assert outcomes == L.OUTCOMES
    kinds = {v: k[len("DECISION_"):].lower() for k, v in defines.items() if k.startswith("DECISION_")}
    assert kinds == L.DECISION_KINDS


@pytest.mark.parametrize("cls", [L.FeKey, L.FeSlot, L.FeValue, L.GroupValue, L.EpKey, L.EpValue, L.MemberKey,
                                 L.AffinityKey, L.AffinityValue, L.ClientValue, L.ConfigValue, L.NameValue, L.SockXlat,
                                 L.SockState, L.TraceControl, L.Decision, L.SockWatch, L.HealthKey, L.HealthValue,
                                 L.EjectSlot, L.SetEjections])
def test_mirrors_have_no_implicit_padding(cls):
    # A hole the compiler fills would make Python-built and BPF-built keys hash differently.
    assert sum(ct.sizeof(t) for _, t in cls._fields_) == ct.sizeof(cls)


def test_map_sizes_refuse_nonsense():
    with pytest.raises(ValueError, match="MapSizes.endpoints"):
        L.MapSizes(endpoints=0)
