"""SEMANTICS B1-B14 and the route limits: routes attached to Services, one or more tests per rule."""

import pytest

from agent.model import MAX_BACKEND_REFS, RouteId, render_state
from agent.resolve import Resolver
from resolve_builders import (
    GATEWAY,
    NODE,
    NS,
    REJECT,
    accepted,
    backend,
    conditions,
    echo_scene,
    ep,
    group,
    http_route,
    parent,
    port,
    route,
    rule,
    run,
    service,
    slice_,
    split,
    via,
)

FE = "10.96.0.10:80/tcp"
ECHO = "mesh/echo:http/tcp/v4"
V1 = "mesh/echo-v1:http/tcp/v4"
V2 = "mesh/echo-v2:http/tcp/v4"
T0, T1, T2 = "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z"


def to_v1(name="to-v1", kind="HTTPRoute", ns=NS, parents=None, **kw):
    return route(kind, name, parents or [parent("echo", ns="mesh")], [rule(backend("echo-v1", ns="mesh"))], ns=ns, **kw)


def to_v2(name="to-v2", kind="HTTPRoute", ns=NS, parents=None, **kw):
    return route(kind, name, parents or [parent("echo", ns="mesh")], [rule(backend("echo-v2", ns="mesh"))], ns=ns, **kw)


# --- B1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,ref,ours", [
    ("core group empty", {"group": "", "kind": "Service", "name": "echo"}, True),
    ("core group spelled core", {"group": "core", "kind": "Service", "name": "echo"}, True),
    ("group omitted is the Gateway API group", {"kind": "Service", "name": "echo"}, False),
    ("kind omitted is Gateway", {"group": "", "name": "echo"}, False),
    ("a Gateway parent", {"group": GATEWAY, "kind": "Gateway", "name": "echo"}, False),
])
def test_b1_only_service_parent_refs_are_ours(case, ref, ours):
    res = run([*echo_scene(), http_route("r", [ref], [rule(backend("echo-v1"))])])
    assert (split(res, FE) == [(1, V1)]) is ours, case
    assert (RouteId("HTTPRoute", NS, "r") in res.statuses) is ours, case


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha2", "v1alpha3"])
@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute"])
def test_b1_every_route_kind_in_every_served_version(kind, version):
    res = run([*echo_scene(), route(kind, "r", [parent("echo")], [rule(backend("echo-v1"))], version=version)])
    assert split(res, FE) == [(1, V1)]


def test_b1_omitted_parent_namespace_is_the_routes():
    other = service("echo", ip="10.96.1.10", ns="client")
    res = run([*echo_scene(), other, http_route("r", [parent("echo")], [rule(backend("echo-v1", ns="mesh"))],
                                                ns="client")])
    assert split(res, "10.96.1.10:80/tcp") == [(1, V1)]
    assert split(res, FE) == [(1, ECHO)]


# --- B2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,parent_obj,message", [
    ("missing", None, "Service mesh/echo not found"),
    ("headless", service("echo", ip="None"), "Service mesh/echo is headless"),
    ("ExternalName", service("echo", ip=None, type="ExternalName"), "Service mesh/echo is of type ExternalName"),
])
def test_b2_parent_must_exist_with_a_frontend(case, parent_obj, message):
    objects = [o for o in echo_scene() if o["metadata"]["name"] != "echo"]
    if parent_obj is not None:
        objects.append(parent_obj)
    res = run([*objects, to_v1()])
    (cond,) = conditions(res, "HTTPRoute", "to-v1")
    assert cond["Accepted"][:2] == ("False", "NoMatchingParent"), case
    assert message in cond["Accepted"][2], case


# --- B3 ---------------------------------------------------------------------------------------


MULTI = service("echo", ports=[port(80, "http"), port(8080, "admin"), port(53, "dns", "UDP")])


@pytest.mark.parametrize("case,ref_kw,kind,attached", [
    ("no port, no sectionName: every TCP port", {}, "HTTPRoute", ["10.96.0.10:80/tcp", "10.96.0.10:8080/tcp"]),
    ("port", {"port": 8080}, "HTTPRoute", ["10.96.0.10:8080/tcp"]),
    ("sectionName", {"section": "http"}, "HTTPRoute", ["10.96.0.10:80/tcp"]),
    ("port and sectionName agree", {"port": 80, "section": "http"}, "HTTPRoute", ["10.96.0.10:80/tcp"]),
    ("port and sectionName disagree", {"port": 80, "section": "admin"}, "HTTPRoute", []),
    ("no such port", {"port": 81}, "HTTPRoute", []),
    ("UDPRoute takes UDP ports only", {}, "UDPRoute", ["10.96.0.10:53/udp"]),
    ("UDPRoute on a TCP port", {"port": 80}, "UDPRoute", []),
    ("TCPRoute on a UDP port", {"port": 53}, "TCPRoute", []),
])
def test_b3_attached_ports(case, ref_kw, kind, attached):
    res = run([*echo_scene()[1:], MULTI, route(kind, "r", [parent("echo", **ref_kw)], [rule(backend("echo-v1"))])])
    routed = sorted(str(k) for k, fe in res.state.frontends.items() if fe.route is not None)
    assert routed == attached, case
    expected = ("True", "Accepted") if attached else ("False", "NoMatchingParent")
    assert accepted(res, kind, "r") == expected, case


def test_b3_a_parent_ref_attaches_only_to_the_service_it_names():
    other = service("other", ip="10.96.0.20", ports=[port(8080, "admin")])
    r = http_route("r", [parent("echo", port=8080), parent("other")], [rule(backend("echo-v1"))])
    res = run([*echo_scene(), other, r])
    assert split(res, FE) == [(1, ECHO)]  # echo has no port 8080; the ref to "other" is not echo's
    assert split(res, "10.96.0.20:8080/tcp") == [(1, V1)]
    assert [c["Accepted"][1] for c in conditions(res, "HTTPRoute", "r")] == ["NoMatchingParent", "Accepted"]


def test_b3_no_matching_port_says_what_the_parent_has():
    res = run([*echo_scene(), http_route("r", [parent("echo", port=81)], [rule(backend("echo-v1"))])])
    message = conditions(res, "HTTPRoute", "r")[0]["Accepted"][2]
    assert "port 81" in message and "80/TCP (http)" in message


# --- B4 ---------------------------------------------------------------------------------------


def test_b4_a_route_changes_only_its_port_and_ignores_hostnames():
    two_ports = service("echo", ports=[port(80, "http"), port(8080, "admin")])
    r = http_route("r", [parent("echo", port=80)], [rule(backend("echo-v1"))])
    r["spec"]["hostnames"] = ["echo.example.com"]
    res = run([*echo_scene()[1:], two_ports, r])
    assert split(res, FE) == [(1, V1)]
    assert split(res, "10.96.0.10:8080/tcp") == [(1, "mesh/echo:admin/tcp/v4")]
    # pod IPs are never frontends: the endpoint groups stay plain
    assert all(fe.address.startswith("10.96.") for fe in res.state.frontends)


# --- B5 ---------------------------------------------------------------------------------------


def test_b5_producer_route_shapes_the_default_view():
    res = run([*echo_scene(), to_v1()])
    assert split(res, FE) == [(1, V1)] and via(res, FE) == "HTTPRoute mesh/to-v1 rule 0"
    assert [k.scope for k in res.state.frontends if str(k).startswith(FE)] == [""]


def test_b5_consumer_replaces_producer():
    res = run([*echo_scene(), to_v1(), to_v2(ns="client")])
    assert split(res, FE) == [(1, V1)]  # everyone else: the producer route
    assert split(res, FE, scope="client") == [(1, V2)]  # clients in "client": theirs, not layered


def test_b5_consumer_route_without_producer_route():
    res = run([*echo_scene(), to_v2(ns="client")])
    assert split(res, FE) == [(1, ECHO)]
    assert split(res, FE, scope="client") == [(1, V2)]


def test_b5_routes_from_a_third_namespace_never_apply_to_others():
    res = run([*echo_scene(), to_v1(ns="team-a"), to_v2(ns="team-b")])
    assert split(res, FE) == [(1, ECHO)]
    assert split(res, FE, scope="team-a") == [(1, V1)]
    assert split(res, FE, scope="team-b") == [(1, V2)]
    assert sorted(k.scope for k in res.state.frontends if str(k).startswith(FE)) == ["", "team-a", "team-b"]


def test_b5_the_choice_is_made_per_service_port():
    two_ports = service("echo", ports=[port(80, "http"), port(8080, "admin")])
    res = run([*echo_scene()[1:], two_ports,
               to_v1(parents=[parent("echo", ns="mesh")]),
               to_v2(ns="client", parents=[parent("echo", ns="mesh", port=8080)])])
    assert split(res, FE) == [(1, V1)]
    assert split(res, FE, scope="client") is None  # port 80: no consumer route, default view applies
    assert split(res, "10.96.0.10:8080/tcp", scope="client") == [(1, V2)]


def test_b5_rejected_consumer_routes_make_no_scoped_frontend():
    bad = to_v2(ns="client", parents=[parent("echo", ns="mesh", port=81)])
    res = run([*echo_scene(), to_v1(), bad])
    assert [k.scope for k in res.state.frontends if str(k).startswith(FE)] == [""]


# --- B6 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strong,weak", [
    ("GRPCRoute", "HTTPRoute"), ("GRPCRoute", "TLSRoute"), ("GRPCRoute", "TCPRoute"),
    ("HTTPRoute", "TLSRoute"), ("HTTPRoute", "TCPRoute"), ("TLSRoute", "TCPRoute"),
])
def test_b6_kind_precedence(strong, weak):
    # the weaker kind is older, so B7 alone would pick it
    res = run([*echo_scene(), to_v1("weak", kind=weak, created=T0), to_v2("strong", kind=strong, created=T1)])
    assert split(res, FE) == [(1, V2)]
    assert accepted(res, strong, "strong") == ("True", "Accepted")
    status, reason = accepted(res, weak, "weak")
    assert (status, reason) == ("False", "RouteReasonConflicted")
    assert f"{strong} mesh/strong" in conditions(res, weak, "weak")[0]["Accepted"][2]


def test_b6_a_route_that_wins_somewhere_stays_accepted():
    two_ports = service("echo", ports=[port(80, "http"), port(8080, "admin")])
    tcp = to_v1("tcp", kind="TCPRoute", parents=[parent("echo")])
    http = to_v2("http", parents=[parent("echo", port=80)])
    res = run([*echo_scene()[1:], two_ports, tcp, http])
    assert accepted(res, "TCPRoute", "tcp") == ("True", "Accepted")
    assert split(res, FE) == [(1, V2)]
    assert split(res, "10.96.0.10:8080/tcp") == [(1, V1)]


def test_b6_precedence_only_within_one_candidate_set():
    res = run([*echo_scene(), to_v1("producer", kind="TCPRoute"), to_v2("consumer", kind="GRPCRoute", ns="client")])
    assert accepted(res, "TCPRoute", "producer") == ("True", "Accepted")
    assert split(res, FE) == [(1, V1)]
    assert split(res, FE, scope="client") == [(1, V2)]


def test_b6_conflicted_per_parent_ref():
    other = service("other", ip="10.96.0.20")
    weak = to_v1("weak", kind="TCPRoute", parents=[parent("echo"), parent("other")])
    res = run([*echo_scene(), other, weak, to_v2("strong", kind="HTTPRoute", parents=[parent("echo")])])
    assert accepted(res, "TCPRoute", "weak", index=0) == ("False", "RouteReasonConflicted")
    assert accepted(res, "TCPRoute", "weak", index=1) == ("True", "Accepted")


# --- B7 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,first,second,winner", [
    ("oldest first", dict(name="b", created=T0), dict(name="a", created=T1), "b"),
    ("same time: namespace/name", dict(name="b", created=T0), dict(name="a", created=T0), "a"),
    ("missing timestamp sorts last", dict(name="a"), dict(name="b", created=T2), "b"),
    ("both missing: by name", dict(name="b"), dict(name="a"), "a"),
])
def test_b7_the_first_rule_of_the_first_route(case, first, second, winner):
    res = run([*echo_scene(), to_v1(**first), to_v2(**second)])
    assert via(res, FE) == f"HTTPRoute mesh/{winner} rule 0", case
    for name in (first["name"], second["name"]):
        assert accepted(res, "HTTPRoute", name) == ("True", "Accepted"), case


def test_b7_only_the_first_rule_counts():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1")), rule(backend("echo-v2"))])
    assert split(run([*echo_scene(), r]), FE) == [(1, V1)]


def test_b7_namespace_orders_before_name():
    res = run([*echo_scene(), to_v1("a", ns="zz", created=T0), to_v2("z", ns="client", created=T0),
               to_v1("z", ns="client2", created=T0)])
    assert via(res, FE, scope="client") == "HTTPRoute client/z rule 0"


# --- B8 ---------------------------------------------------------------------------------------


def test_b8_without_an_effective_rule_behaviour_is_exactly_a():
    plain = render_state(run(echo_scene()).state)
    rejected = [
        http_route("no-parent", [parent("missing")], [rule(backend("echo-v1"))]),
        http_route("no-port", [parent("echo", port=81)], [rule(backend("echo-v1"))]),
        http_route("unsupported", [parent("echo")], [rule(backend("echo-v1"), filters=[{"type": "RequestMirror"}])]),
    ]
    assert render_state(run([*echo_scene(), *rejected]).state) == plain


# --- B9 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,rule_fields,problem", [
    ("HTTPRoute", {}, None),
    ("HTTPRoute", {"matches": []}, None),
    ("HTTPRoute", {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}, None),
    ("HTTPRoute", {"matches": [{}]}, None),
    ("HTTPRoute", {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}, "rule 0: matches[0].path"),
    ("HTTPRoute", {"matches": [{"path": {"type": "Exact", "value": "/"}}]}, "rule 0: matches[0].path"),
    ("HTTPRoute", {"matches": [{"headers": [{"name": "x", "value": "y"}]}]}, "rule 0: matches[0].headers"),
    ("HTTPRoute", {"matches": [{"method": "GET"}]}, "rule 0: matches[0].method"),
    ("HTTPRoute", {"matches": [{"queryParams": [{"name": "q", "value": "1"}]}]}, "rule 0: matches[0].queryParams"),
    ("HTTPRoute", {"filters": [{"type": "RequestHeaderModifier"}]}, "rule 0: filters"),
    ("HTTPRoute", {"timeouts": {"request": "1s"}}, "rule 0: timeouts"),
    ("HTTPRoute", {"retry": {"attempts": 2}}, "rule 0: retry"),
    ("HTTPRoute", {"sessionPersistence": {"type": "Cookie"}}, "rule 0: sessionPersistence"),
    ("GRPCRoute", {}, None),
    ("GRPCRoute", {"matches": [{"method": {"service": "echo.Echo"}}]}, "rule 0: matches[0].method"),
    ("GRPCRoute", {"matches": [{"headers": [{"name": "x", "value": "y"}]}]}, "rule 0: matches[0].headers"),
    ("GRPCRoute", {"filters": [{"type": "RequestMirror"}]}, "rule 0: filters"),
    ("GRPCRoute", {"sessionPersistence": {"type": "Header"}}, "rule 0: sessionPersistence"),
    ("TCPRoute", {}, None),
    ("TLSRoute", {}, None),
])
def test_b9_l4_expressible_rules(kind, rule_fields, problem):
    res = run([*echo_scene(), route(kind, "r", [parent("echo")], [rule(backend("echo-v1"), **rule_fields)])])
    if problem is None:
        assert accepted(res, kind, "r") == ("True", "Accepted")
        assert split(res, FE) == [(1, V1)]
    else:
        status, reason, message = conditions(res, kind, "r")[0]["Accepted"]
        assert (status, reason) == ("False", "UnsupportedValue")
        assert problem in message
        assert split(res, FE) == [(1, ECHO)]


def test_b9_a_later_unsupported_rule_rejects_the_whole_route():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1")),
                                           rule(backend("echo-v2"), matches=[{"path": {"value": "/x"}}])])
    res = run([*echo_scene(), r])
    assert "rule 1: matches[0].path" in conditions(res, "HTTPRoute", "r")[0]["Accepted"][2]
    assert split(res, FE) == [(1, ECHO)]


def test_b9_backend_ref_filters_are_unsupported():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1", filters=[{"type": "RequestMirror"}]))])
    res = run([*echo_scene(), r])
    assert "rule 0: backendRefs[0].filters" in conditions(res, "HTTPRoute", "r")[0]["Accepted"][2]


def test_b9_an_unsupported_consumer_route_does_not_hide_producer_routes():
    bad = http_route("bad", [parent("echo", ns="mesh")], [rule(backend("echo-v2", ns="mesh"), timeouts={"request": "1s"})],
                     ns="client")
    res = run([*echo_scene(), to_v1(), bad])
    assert split(res, FE, scope="client") is None  # so clients in "client" get the producer view
    assert split(res, FE) == [(1, V1)]


# --- B10 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,ref,reason,message", [
    ("other kind", backend("echo-v1", kind="ServiceImport", group="multicluster.x-k8s.io"), "InvalidKind",
     "kind ServiceImport"),
    ("core group spelled core", backend("echo-v1", group="core"), None, None),
    ("missing Service", backend("echo-v3"), "BackendNotFound", "backendRef 0: Service mesh/echo-v3 not found"),
    ("missing port", backend("echo-v1", port=81), "BackendNotFound", "Service mesh/echo-v1 has no port 81/TCP"),
    ("ExternalName", backend("ext"), "InvalidKind", "Service mesh/ext is of type ExternalName"),
    ("no port given", {"name": "echo-v1"}, "BackendNotFound", "port is required"),
    ("cross-namespace needs no ReferenceGrant", backend("far", ns="elsewhere"), None, None),
])
def test_b10_backend_refs(case, ref, reason, message):
    objects = [*echo_scene(), service("ext", ip=None, type="ExternalName", externalName="example.com"),
               service("far", ip="10.96.9.9", ns="elsewhere"), slice_("far-a", "far", [ep("10.244.9.9")], ns="elsewhere")]
    res = run([*objects, http_route("r", [parent("echo")], [rule(ref)])])
    cond = conditions(res, "HTTPRoute", "r")[0]["ResolvedRefs"]
    if reason is None:
        assert cond[:2] == ("True", "ResolvedRefs"), case
        assert split(res, FE)[0][1] != "reject", case
    else:
        assert cond[:2] == ("False", reason), case
        assert message in cond[2], case
        assert split(res, FE) == [(1, "reject")], case


# --- B11 --------------------------------------------------------------------------------------


def test_b11_the_backend_port_is_resolved_by_its_name():
    v1 = service("echo-v1", ip="10.96.0.11", ports=[port(80, "web")])
    objects = [o for o in echo_scene() if o["metadata"]["name"] not in ("echo-v1", "echo-v1-a")]
    res = run([*objects, v1, slice_("echo-v1-a", "echo-v1", [ep("10.244.0.11")],
                                    ports=[{"name": "web", "port": 9000, "protocol": "TCP"}]), to_v1()])
    assert split(res, FE) == [(1, "mesh/echo-v1:web/tcp/v4")]
    assert group(res, "mesh/echo-v1:web/tcp/v4")[1] == ["10.244.0.11:9000"]


def test_b11_routes_of_the_backend_are_never_applied():
    res = run([*echo_scene(), to_v1(),
               http_route("v1-to-v2", [parent("echo-v1")], [rule(backend("echo-v2"))]),
               http_route("self", [parent("echo-v2")], [rule(backend("echo-v2"), backend("echo-v1"))])])
    assert split(res, FE) == [(1, V1)]  # one level only: not on to echo-v2
    assert split(res, "10.96.0.12:80/tcp") == [(1, V2), (1, V1)]  # a route to its own parent uses endpoints
    assert group(res, V2)[1] == ["10.244.0.12:8080"]


def test_b11_backend_affinity_and_local_policy_apply_inside_the_route():
    v1 = service("echo-v1", ip="10.96.0.11", sessionAffinity="ClientIP", internalTrafficPolicy="Local")
    objects = [o for o in echo_scene() if o["metadata"]["name"] != "echo-v1"]
    res = run([*objects, v1, to_v1()])
    assert group(res, V1) == ("UNREACHABLE", [], 10800)


# --- B12 --------------------------------------------------------------------------------------


def test_b12_shares_are_the_weights_invalid_refs_included():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1", weight=90), backend("echo-v2"),
                                                backend("echo-v3", weight=9), backend("echo", weight=0))])
    res = run([*echo_scene(), r])
    assert split(res, FE) == [(90, V1), (1, V2), (9, "reject"), (0, ECHO)]


@pytest.mark.parametrize("weight", [-1, 1_000_001, "5", 1.5, True])
def test_b12_weights_outside_the_api_range_reject_the_route(weight):
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1", weight=weight), backend("echo-v2"))])
    res = run([*echo_scene(), r])
    status, reason, message = conditions(res, "HTTPRoute", "r")[0]["Accepted"]
    assert (status, reason) == ("False", "UnsupportedValue")
    assert "rule 0: backendRefs[0].weight" in message
    assert split(res, FE) == [(1, ECHO)]


def test_b12_the_api_maximum_weight_is_fine():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1", weight=1_000_000), backend("echo-v2", weight=0))])
    assert split(run([*echo_scene(), r]), FE) == [(1_000_000, V1), (0, V2)]


def test_b12_at_most_max_backend_refs_per_rule():
    refs = [backend("echo-v1") for _ in range(MAX_BACKEND_REFS)]
    fits = run([*echo_scene(), http_route("r", [parent("echo")], [rule(*refs)])])
    assert len(split(fits, FE)) == MAX_BACKEND_REFS
    too_many = run([*echo_scene(), http_route("r", [parent("echo")], [rule(*refs, backend("echo-v2"))])])
    status, reason, message = conditions(too_many, "HTTPRoute", "r")[0]["Accepted"]
    assert (status, reason) == ("False", "UnsupportedValue") and f"at most {MAX_BACKEND_REFS}" in message


# --- B13 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,rules,expected", [
    ("no backendRefs", [rule()], []),
    ("no rules at all (the API default rule has no backendRefs)", [], []),
    ("all weights 0", [rule(backend("echo-v1", weight=0), backend("echo-v2", weight=0))], [(0, V1), (0, V2)]),
    ("the invalid share rejects", [rule(backend("echo-v1", weight=3), backend("nope", weight=1))],
     [(3, V1), (1, "reject")]),
])
def test_b13_rejected_shares(case, rules, expected):
    res = run([*echo_scene(), http_route("r", [parent("echo")], rules)])
    assert split(res, FE) == expected, case
    assert accepted(res, "HTTPRoute", "r") == ("True", "Accepted"), case


def test_b13_a_backend_without_endpoints_rejects_its_share():
    res = run([*echo_scene(), service("empty", ip="10.96.0.30"),
               http_route("r", [parent("echo")], [rule(backend("echo-v1"), backend("empty"))])])
    assert split(res, FE) == [(1, V1), (1, "mesh/empty:http/tcp/v4")]
    assert group(res, "mesh/empty:http/tcp/v4") == (REJECT, [], 0)


def test_b13_a_backend_without_the_frontends_family_rejects_its_share():
    dual = service("echo", ips=["10.96.0.10", "fd00::10"])
    objects = [o for o in echo_scene() if o["metadata"]["name"] != "echo"]
    res = run([*objects, dual, to_v1()])
    assert split(res, "[fd00::10]:80/tcp") == [(1, "mesh/echo-v1:http/tcp/v6")]
    assert group(res, "mesh/echo-v1:http/tcp/v6") == (REJECT, [], 0)
    assert accepted(res, "HTTPRoute", "to-v1") == ("True", "Accepted")


# --- B14 --------------------------------------------------------------------------------------


def test_b14_one_entry_per_parent_ref_verbatim_with_observed_generation():
    refs = [parent("echo", port=80), {"kind": "Service", "group": "", "name": "echo", "port": 80},
            {"group": GATEWAY, "kind": "Gateway", "name": "gw"}, parent("echo-v2")]
    res = run([*echo_scene(), http_route("r", refs, [rule(backend("echo-v1"))], generation=7)])
    status = res.statuses[RouteId("HTTPRoute", NS, "r")]
    assert [p.parent_ref_dict() for p in status.parents] == [
        {"group": "", "kind": "Service", "name": "echo", "port": 80}, {"group": "", "kind": "Service", "name": "echo-v2"}]
    for p in status.parents:
        assert [c.type for c in p.conditions] == ["Accepted", "ResolvedRefs"]
        assert {c.observed_generation for c in p.conditions} == {7}
    json = status.as_json()
    assert json["parents"][0]["controllerName"] == "meshlet.io/mesh"


@pytest.mark.parametrize("case,parents,fields,expected", [
    ("NoMatchingParent before UnsupportedValue", [parent("nope")], {"timeouts": {"request": "1s"}},
     ("False", "NoMatchingParent")),
    ("UnsupportedValue before Conflicted", [parent("echo")], {"timeouts": {"request": "1s"}},
     ("False", "UnsupportedValue")),
])
def test_b14_accepted_reasons_are_checked_in_order(case, parents, fields, expected):
    strong = route("GRPCRoute", "strong", [parent("echo")], [rule(backend("echo-v2"))])
    res = run([*echo_scene(), strong, route("HTTPRoute", "r", parents, [rule(backend("echo-v1"), **fields)])])
    assert accepted(res, "HTTPRoute", "r") == expected, case


def test_b14_resolved_refs_names_the_first_reason_and_lists_every_invalid_ref():
    r = http_route("r", [parent("echo")], [rule(backend("echo-v1"), backend("echo-v3"), backend("x", kind="Foo")),
                                           rule(backend("echo-v2", port=99))])
    res = run([*echo_scene(), r])
    status, reason, message = conditions(res, "HTTPRoute", "r")[0]["ResolvedRefs"]
    assert (status, reason) == ("False", "BackendNotFound")
    assert message == ("rule 0 backendRef 1: Service mesh/echo-v3 not found; "
                       "rule 0 backendRef 2: kind Foo of group core is not supported (only a core Service can be a "
                       "backend); rule 1 backendRef 0: Service mesh/echo-v2 has no port 99/TCP")


def test_b14_routes_without_a_service_parent_have_no_status_and_vanished_parents_leave():
    resolver = Resolver(NODE)
    for obj in [*echo_scene(), http_route("r", [parent("echo"), parent("echo-v1")], [rule(backend("echo-v2"))])]:
        resolver.upsert(obj)
    resolver.commit()
    rid = RouteId("HTTPRoute", NS, "r")
    assert len(resolver.statuses[rid].parents) == 2
    resolver.upsert(http_route("r", [parent("echo")], [rule(backend("echo-v2"))], generation=2))
    assert rid in resolver.commit().routes
    assert [p.parent_ref_dict()["name"] for p in resolver.statuses[rid].parents] == ["echo"]
    resolver.upsert(http_route("r", [{"name": "gw"}], [rule(backend("echo-v2"))], generation=3))
    assert rid in resolver.commit().routes
    assert rid not in resolver.statuses


def test_b14_a_parent_change_updates_the_status():
    resolver = Resolver(NODE)
    for obj in [*echo_scene()[1:], to_v1()]:
        resolver.upsert(obj)
    resolver.commit()
    rid = RouteId("HTTPRoute", NS, "to-v1")
    assert resolver.statuses[rid].parents[0].conditions[0].reason == "NoMatchingParent"
    resolver.upsert(service("echo"))
    assert rid in resolver.commit().routes
    assert resolver.statuses[rid].parents[0].conditions[0].reason == "Accepted"
