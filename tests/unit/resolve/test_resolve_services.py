"""SEMANTICS A1-A15: Services and endpoints, one or more tests per rule, named after it."""

import pytest

from agent.model import render_state
from agent.resolve import Resolver
from resolve_builders import (
    FORWARD,
    NODE,
    REJECT,
    UNREACHABLE,
    ep,
    group,
    node,
    port,
    run,
    service,
    slice_,
    split,
    verdict,
    endpoints,
)

G4 = "mesh/echo:http/tcp/v4"


def one_service(*endpoint_list, svc=None, **slice_kw):
    return [svc or service("echo"), slice_("echo-a", "echo", list(endpoint_list), **slice_kw)]


# --- A1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,svc,balanced", [
    ("plain ClusterIP", service("echo"), True),
    ("headless", service("echo", ip="None"), False),
    ("ExternalName", service("echo", ip=None, type="ExternalName", externalName="example.com"), False),
    ("no clusterIP", service("echo", ip=None), False),
    ("another proxy's", service("echo", labels={"service.kubernetes.io/service-proxy-name": "other"}), False),
    ("our proxy name", service("echo", labels={"service.kubernetes.io/service-proxy-name": "meshlet"}), True),
    ("headless label", service("echo", labels={"service.kubernetes.io/headless": ""}), False),
])
def test_a1_only_load_balanced_services_get_frontends(case, svc, balanced):
    res = run(one_service(ep("10.244.0.1"), svc=svc))
    assert bool(res.state.frontends) is balanced, case


# --- A2 ---------------------------------------------------------------------------------------


def test_a2_every_address_is_a_frontend():
    svc = service("echo", ip="10.96.0.10", ips=["10.96.0.10", "fd00::10"], externalIPs=["192.0.2.7"],
                  status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"},
                                                       {"ip": "198.51.100.2", "ipMode": "VIP"},
                                                       {"ip": "198.51.100.3", "ipMode": "Proxy"},
                                                       {"hostname": "lb.example.com"}]}})
    res = run(one_service(ep("10.244.0.1"), svc=svc))
    assert sorted(str(k) for k in res.state.frontends) == [
        "10.96.0.10:80/tcp", "192.0.2.7:80/tcp", "198.51.100.1:80/tcp", "198.51.100.2:80/tcp",
        "[fd00::10]:80/tcp",
    ]
    assert split(res, "[fd00::10]:80/tcp") == [(1, "mesh/echo:http/tcp/v6")]
    assert split(res, "192.0.2.7:80/tcp") == [(1, G4)]


def test_a2_tcp_and_udp_frontends_are_distinct():
    svc = service("dns", ports=[port(53, "dns", "UDP"), port(53, "dns-tcp", "TCP")])
    res = run([svc, slice_("dns-a", "dns", [ep("10.244.0.53")],
                           ports=[{"name": "dns", "port": 5353, "protocol": "UDP"},
                                  {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}])])
    assert split(res, "10.96.0.10:53/udp") == [(1, "mesh/dns:dns/udp/v4")]
    assert split(res, "10.96.0.10:53/tcp") == [(1, "mesh/dns:dns-tcp/tcp/v4")]
    assert endpoints(res, "mesh/dns:dns/udp/v4") == ["10.244.0.53:5353"]
    assert endpoints(res, "mesh/dns:dns-tcp/tcp/v4") == ["10.244.0.53:5354"]


def test_a2_node_ports_make_no_frontend():
    svc = service("echo", type="NodePort", ports=[{**port(80, "http"), "nodePort": 30080}])
    res = run(one_service(ep("10.244.0.1"), svc=svc))
    assert [str(k) for k in res.state.frontends] == ["10.96.0.10:80/tcp"]


# --- A3 ---------------------------------------------------------------------------------------


def test_a3_slices_merge_and_the_same_endpoint_counts_once():
    res = run([service("echo"),
               slice_("echo-a", "echo", [ep("10.244.0.1"), ep("10.244.0.2")]),
               slice_("echo-b", "echo", [ep("10.244.0.2"), ep("10.244.0.3")])])
    assert endpoints(res, G4) == ["10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080"]


@pytest.mark.parametrize("order", ["terminating first", "ready first"])
def test_a3_a_non_terminating_copy_wins(order):
    terminating = slice_("echo-a", "echo", [ep("10.244.0.1", ready=False, serving=True, terminating=True),
                                            ep("10.244.0.9")])
    ready = slice_("echo-b", "echo", [ep("10.244.0.1")])
    slices = [terminating, ready] if order == "terminating first" else [ready, terminating]
    res = run([service("echo"), *slices])
    # Were the terminating copy kept, 10.244.0.1 would not be in the ready set.
    assert endpoints(res, G4) == ["10.244.0.1:8080", "10.244.0.9:8080"]


def test_a3_only_slices_of_the_service_and_family_count():
    res = run([service("echo"),
               slice_("echo-a", "echo", [ep("10.244.0.1")]),
               slice_("echo-v6", "echo", [ep("fd00:244::1")], family="IPv6"),
               slice_("other-a", "other", [ep("10.244.0.2")]),
               slice_("elsewhere", "echo", [ep("10.244.0.3")], ns="other-ns")])
    assert endpoints(res, G4) == ["10.244.0.1:8080"]


# --- A4 ---------------------------------------------------------------------------------------


def test_a4_named_target_port_resolves_through_the_slice_port_name():
    svc = service("echo", ports=[port(80, "http", target="web"), port(9000, "metrics", target=9100)])
    res = run([svc, slice_("echo-a", "echo", [ep("10.244.0.1")],
                           ports=[{"name": "http", "port": 8081, "protocol": "TCP"},
                                  {"name": "metrics", "port": 9100, "protocol": "TCP"}])])
    assert endpoints(res, G4) == ["10.244.0.1:8081"]
    assert endpoints(res, "mesh/echo:metrics/tcp/v4") == ["10.244.0.1:9100"]


@pytest.mark.parametrize("slice_port,usable", [
    ({"name": "http", "port": 8080, "protocol": "TCP"}, True),
    ({"name": "http", "port": 8080}, True),  # protocol defaults to TCP
    ({"name": "http", "port": 8080, "protocol": "UDP"}, False),
    ({"name": "web", "port": 8080, "protocol": "TCP"}, False),
    ({"port": 8080, "protocol": "TCP"}, False),  # unnamed slice port only matches an unnamed Service port
])
def test_a4_slice_port_must_match_name_and_protocol(slice_port, usable):
    res = run([service("echo"), slice_("echo-a", "echo", [ep("10.244.0.1")], ports=[slice_port])])
    assert (endpoints(res, G4) == ["10.244.0.1:8080"]) is usable


def test_a4_unnamed_service_port_matches_unnamed_slice_port():
    res = run([service("echo", ports=[port(80)]),
               slice_("echo-a", "echo", [ep("10.244.0.1")], ports=[{"port": 8080, "protocol": "TCP"}])])
    assert endpoints(res, "mesh/echo/tcp/v4") == ["10.244.0.1:8080"]


# --- A5 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditions,in_ready_set,in_fallback", [
    ({}, True, False),  # unset ready = ready
    ({"ready": True}, True, False),
    ({"ready": False}, False, False),  # not ready, not terminating: starting, never used
    ({"ready": False, "terminating": True}, False, True),  # serving unset = serving
    ({"ready": False, "serving": False, "terminating": True}, False, False),
])
def test_a5_conditions_and_their_defaults(conditions, in_ready_set, in_fallback):
    probe = ep("10.244.0.1", **conditions)
    with_ready = run(one_service(probe, ep("10.244.0.2")))
    assert ("10.244.0.1:8080" in endpoints(with_ready, G4)) is in_ready_set
    alone = run(one_service(probe))
    assert (endpoints(alone, G4) == ["10.244.0.1:8080"]) is (in_ready_set or in_fallback)


# --- A6 ---------------------------------------------------------------------------------------


def test_a6_ready_endpoints_exclude_terminating_ones():
    res = run(one_service(ep("10.244.0.1"), ep("10.244.0.2", ready=False, serving=True, terminating=True)))
    assert endpoints(res, G4) == ["10.244.0.1:8080"]


def test_a6_terminating_fallback():
    res = run(one_service(ep("10.244.0.1", ready=False, serving=True, terminating=True),
                          ep("10.244.0.2", ready=False, serving=False, terminating=True),
                          ep("10.244.0.3", ready=False)))
    assert endpoints(res, G4) == ["10.244.0.1:8080"]
    assert verdict(res, G4) == FORWARD


def test_a6_terminating_fallback_ignores_hints():
    res = run([node(zone="z1"), *one_service(
        ep("10.244.0.1", ready=False, terminating=True, for_zones=["z2"]),
        ep("10.244.0.2", ready=False, terminating=True, for_zones=["z1"]))])
    assert endpoints(res, G4) == ["10.244.0.1:8080", "10.244.0.2:8080"]


# --- A7 ---------------------------------------------------------------------------------------


LOCAL = {"internalTrafficPolicy": "Local"}


@pytest.mark.parametrize("case,eps,expected,expected_verdict", [
    ("local ready only", [ep("10.244.0.1", on=NODE), ep("10.244.0.2", on="node-b")], ["10.244.0.1:8080"], FORWARD),
    ("local terminating fallback",
     [ep("10.244.0.1", ready=False, terminating=True, on=NODE), ep("10.244.0.2", on="node-b")],
     ["10.244.0.1:8080"], FORWARD),
    ("local ready beats local terminating",
     [ep("10.244.0.1", on=NODE), ep("10.244.0.3", ready=False, terminating=True, on=NODE)],
     ["10.244.0.1:8080"], FORWARD),
    ("none local: unreachable", [ep("10.244.0.2", on="node-b")], [], UNREACHABLE),
    ("only a starting pod elsewhere: reject", [ep("10.244.0.2", ready=False, on="node-b")], [], REJECT),
    ("no endpoints: reject", [], [], REJECT),
])
def test_a7_internal_traffic_policy_local(case, eps, expected, expected_verdict):
    res = run(one_service(*eps, svc=service("echo", **LOCAL)))
    assert endpoints(res, G4) == expected, case
    assert verdict(res, G4) == expected_verdict, case


# --- A8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,eps,zone,expected", [
    ("PreferSameNode", [ep("10.244.0.1", for_nodes=[NODE], for_zones=["z2"]),
                        ep("10.244.0.2", for_nodes=["node-b"], for_zones=["z1"])], "z1", ["10.244.0.1"]),
    ("PreferSameNode needs a hint on every ready endpoint",
     [ep("10.244.0.1", for_nodes=[NODE]), ep("10.244.0.2")], "z1", ["10.244.0.1", "10.244.0.2"]),
    ("PreferSameNode needs one naming us, else zone",
     [ep("10.244.0.1", for_nodes=["node-b"], for_zones=["z1"]),
      ep("10.244.0.2", for_nodes=["node-c"], for_zones=["z2"])], "z1", ["10.244.0.1"]),
    ("PreferSameZone", [ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2", for_zones=["z2"])], "z1",
     ["10.244.0.1"]),
    ("PreferSameZone needs a hint on every ready endpoint",
     [ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2")], "z1", ["10.244.0.1", "10.244.0.2"]),
    ("no hint names our zone", [ep("10.244.0.1", for_zones=["z2"]), ep("10.244.0.2", for_zones=["z3"])], "z1",
     ["10.244.0.1", "10.244.0.2"]),
    ("node without zone label", [ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2", for_zones=["z2"])], None,
     ["10.244.0.1", "10.244.0.2"]),
    ("hints of non-ready endpoints do not count",
     [ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2", for_zones=["z2"]), ep("10.244.0.3", ready=False)],
     "z1", ["10.244.0.1"]),
])
def test_a8_topology_hints(case, eps, zone, expected):
    res = run([node(zone=zone), *one_service(*eps)])
    assert endpoints(res, G4) == [f"{a}:8080" for a in expected], case


def test_a8_hints_never_narrow_the_local_set():
    res = run([node(zone="z1"), *one_service(
        ep("10.244.0.1", on=NODE, for_zones=["z2"]), ep("10.244.0.2", on=NODE, for_zones=["z1"]),
        svc=service("echo", **LOCAL))])
    assert endpoints(res, G4) == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_a8_only_this_nodes_zone_label_counts():
    objects = [node("node-b", zone="z2"), node(NODE, zone="z1"),
               *one_service(ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2", for_zones=["z2"]))]
    assert endpoints(run(objects), G4) == ["10.244.0.1:8080"]


def test_a8_a_zone_label_change_recomputes_the_groups():
    resolver = Resolver(NODE)
    for obj in [node(zone="z1"), *one_service(ep("10.244.0.1", for_zones=["z1"]), ep("10.244.0.2", for_zones=["z2"]))]:
        resolver.upsert(obj)
    resolver.commit()
    resolver.upsert(node(zone="z2"))
    delta = resolver.commit()
    assert [str(g) for g in delta.groups] == [G4]
    assert [str(e) for e in resolver.state.groups[next(iter(delta.groups))].endpoints] == ["10.244.0.2:8080"]


# --- A9 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,objects", [
    ("no slice", [service("echo")]),
    ("empty slice", one_service()),
    ("only not-ready endpoints", one_service(ep("10.244.0.1", ready=False))),
])
def test_a9_no_endpoints_rejects(case, objects):
    res = run(objects)
    assert split(res, "10.96.0.10:80/tcp") == [(1, G4)], case
    assert group(res, G4) == (REJECT, [], 0), case


# --- A10-A15: what resolve contributes to datapath and runtime behaviour ----------------------


def test_a10_without_routes_a_frontend_is_one_share_of_its_own_usable_set():
    res = run(one_service(ep("10.244.0.2"), ep("10.244.0.1"), ep("10.244.0.3")))
    assert split(res, "10.96.0.10:80/tcp") == [(1, G4)]
    # the datapath picks uniformly from exactly this set, sorted (model invariant)
    assert endpoints(res, G4) == ["10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080"]


@pytest.mark.parametrize("spec,timeout,problem", [
    ({}, 0, False),
    ({"sessionAffinity": "None"}, 0, False),
    ({"sessionAffinity": "ClientIP"}, 10800, False),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60, False),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -5}}}, 10800, True),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "x"}}}, 10800, True),
])
def test_a11_client_ip_affinity_timeout(spec, timeout, problem):
    res = run(one_service(ep("10.244.0.1"), svc=service("echo", **spec)))
    assert group(res, G4)[2] == timeout
    assert any("timeoutSeconds" in line for line in res.problems) is problem


def test_a12_frontends_are_keyed_by_the_address_replies_must_come_from():
    res = run(one_service(ep("10.244.0.1"), svc=service("echo", ip="10.96.0.10", ips=["10.96.0.10", "FD00:0::10"],
                                                        ports=[port(53, "dns", "UDP")]),
                          ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    # canonical text (model invariant): the datapath writes these bytes back as the peer
    assert sorted(str(k) for k in res.state.frontends) == ["10.96.0.10:53/udp", "[fd00::10]:53/udp"]


def test_a13_ipv4_mapped_frontends_need_nothing_special():
    res = run(one_service(ep("10.244.0.1")))
    # one IPv4 frontend; an AF_INET6 socket aiming at ::ffff:10.96.0.10 is matched by the datapath
    assert [str(k) for k in res.state.frontends] == ["10.96.0.10:80/tcp"]
    assert all(g.family == 4 for g in res.state.groups)


def test_a14_a_removed_endpoint_leaves_the_group_at_the_next_commit():
    resolver = Resolver(NODE)
    for obj in one_service(ep("10.244.0.1"), ep("10.244.0.2")):
        resolver.upsert(obj)
    resolver.commit()
    resolver.upsert(slice_("echo-a", "echo", [ep("10.244.0.2")]))
    delta = resolver.commit()
    assert [str(g) for g in delta.groups] == [G4] and not delta.frontends
    assert [str(e) for e in resolver.state.groups[next(iter(delta.groups))].endpoints] == ["10.244.0.2:8080"]


def test_a15_nothing_changes_before_commit():
    resolver = Resolver(NODE)
    for obj in one_service(ep("10.244.0.1")):
        resolver.upsert(obj)
    assert render_state(resolver.state) == ""  # the runtime commits only after every source synced
    resolver.commit()
    assert render_state(resolver.state) != ""


# --- A17 --------------------------------------------------------------------------------------


def annotated(value):
    svc = service("echo")
    svc["metadata"]["annotations"] = {"meshlet.io/passive-health": value}
    return svc


@pytest.mark.parametrize("case,svc,on", [
    ("no annotation", service("echo"), True),
    ("off", annotated("off"), False),
    ("Off, any case", annotated("Off"), False),
    ("on", annotated("on"), True),
])
def test_a17_passive_health_is_on_unless_the_service_says_off(case, svc, on):
    res = run(one_service(ep("10.244.0.1"), svc=svc))
    (group_,) = res.state.groups.values()
    assert group_.passive_health is on, case
    assert ("passive-health=off" in render_state(res.state)) is not on


def test_a17_a_value_that_is_neither_off_nor_on_is_reported_and_leaves_it_on():
    res = run(one_service(ep("10.244.0.1"), svc=annotated("disabled")))
    assert all(g.passive_health for g in res.state.groups.values())
    assert any("meshlet.io/passive-health" in p and "'disabled'" in p for p in res.problems), res.problems


def test_a17_the_agent_switch_turns_it_off_for_every_service():
    resolver = Resolver(NODE, passive_health=False)
    resolver.upsert_many(one_service(ep("10.244.0.1")))
    resolver.commit()
    assert [g.passive_health for g in resolver.state.groups.values()] == [False]


def test_a17_changing_the_annotation_recomputes_the_group():
    resolver = Resolver(NODE)
    resolver.upsert_many(one_service(ep("10.244.0.1")))
    resolver.commit()
    resolver.upsert(annotated("off"))
    delta = resolver.commit()
    assert [str(g) for g in delta.groups] == [G4]
    assert [g.passive_health for g in resolver.state.groups.values()] == [False]
