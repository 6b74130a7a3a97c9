"""Incremental resolve (B15's share: one change recomputes only what it reaches), the reference
count of groups, deltas, and determinism (same objects in any order -> the same bytes)."""

import random

import pytest

import agent.resolve as resolve_module
from agent.model import RouteId, render_state
from agent.resolve import Resolver, render_statuses, resolve
from resolve_builders import (
    NODE,
    NS,
    backend,
    echo_scene,
    ep,
    http_route,
    namespace,
    node,
    parent,
    pod,
    port,
    route,
    rule,
    service,
    slice_,
)


def many_services(n):
    objects = []
    for i in range(n):
        objects.append(service(f"s{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}"))
        objects.append(slice_(f"s{i}-a", f"s{i}", [ep(f"10.244.{i // 250}.{i % 250 + 1}")]))
    return objects


def committed(objects):
    resolver = Resolver(NODE)
    for obj in objects:
        resolver.upsert(obj)
    resolver.commit()
    return resolver


@pytest.fixture
def calls(monkeypatch):
    """Spy on the rule functions the Resolver calls, to count recomputations (they still run)."""
    counts = {"groups": [], "frontends": [], "statuses": []}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            counts[name].append(args[0])
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(resolve_module, "backend_group", spy("groups", resolve_module.backend_group))
    monkeypatch.setattr(resolve_module, "service_frontends", spy("frontends", resolve_module.service_frontends))
    monkeypatch.setattr(resolve_module, "route_status", spy("statuses", resolve_module.route_status))
    return counts


def test_b15_an_endpoint_slice_change_recomputes_only_its_services_groups(calls):
    resolver = committed(many_services(300))
    for c in calls.values():
        c.clear()
    resolver.upsert(slice_("s7-a", "s7", [ep("10.244.0.8"), ep("10.244.50.1")]))
    delta = resolver.commit()
    assert [str(g) for g in calls["groups"]] == ["mesh/s7:http/tcp/v4"]
    assert calls["frontends"] == [] and calls["statuses"] == []
    assert [str(g) for g in delta.groups] == ["mesh/s7:http/tcp/v4"] and not delta.frontends


def test_b15_a_route_change_recomputes_its_parents_and_their_routes(calls):
    objects = many_services(200)
    objects += [http_route("r", [parent("s1")], [rule(backend("s2"))]),
                http_route("other", [parent("s3")], [rule(backend("s4"))])]
    resolver = committed(objects)
    for c in calls.values():
        c.clear()
    resolver.upsert(http_route("r", [parent("s1")], [rule(backend("s2", weight=3), backend("s5"))], generation=2))
    delta = resolver.commit()
    assert [s.name for s in calls["frontends"]] == ["s1"]
    assert [r.id.name for r in calls["statuses"]] == ["r"]
    assert calls["groups"] == []  # s5's group was already in use (its own frontend)
    assert [str(k) for k in delta.frontends] == ["10.96.0.2:80/tcp"]
    assert delta.routes == {RouteId("HTTPRoute", NS, "r")}


def test_b15_a_backend_service_change_reaches_the_routes_that_name_it(calls):
    resolver = committed([*many_services(50), http_route("r", [parent("s1")], [rule(backend("s2"))])])
    for c in calls.values():
        c.clear()
    resolver.delete(service("s2"))
    delta = resolver.commit()
    assert sorted(s.name if s else "(deleted)" for s in calls["frontends"]) == ["(deleted)", "s1"]
    assert [r.id.name for r in calls["statuses"]] == ["r"]
    assert resolver.state.frontends[next(k for k in delta.frontends if k.address == "10.96.0.2")].split[0].group is None
    assert resolver.statuses[RouteId("HTTPRoute", NS, "r")].parents[0].conditions[1].reason == "BackendNotFound"


def test_groups_nobody_references_disappear():
    resolver = committed([*echo_scene(), http_route("r", [parent("echo")], [rule(backend("echo-v1"))])])
    assert "mesh/echo:http/tcp/v4" not in {str(g) for g in resolver.state.groups}  # echo's own: unused
    resolver.delete(http_route("r", [], []))
    delta = resolver.commit()
    assert {str(g) for g in delta.groups} == {"mesh/echo:http/tcp/v4"}  # echo-v1 still has its own frontend
    assert render_state(resolver.state) == render_state(resolve(echo_scene(), NODE).state)
    for obj in echo_scene():
        resolver.delete(obj)
    resolver.commit()
    assert render_state(resolver.state) == ""


def test_changes_that_cancel_out_give_an_empty_delta():
    resolver = committed(echo_scene())
    resolver.upsert(slice_("echo-a", "echo", []))
    resolver.upsert(echo_scene()[1])
    resolver.upsert(service("echo", ip="10.96.0.99"))
    resolver.upsert(echo_scene()[0])
    assert not resolver.commit()


def test_an_unchanged_object_costs_nothing(calls):
    resolver = committed(echo_scene())
    for c in calls.values():
        c.clear()
    for obj in echo_scene():
        resolver.upsert(obj)
    assert not resolver.commit()
    assert calls == {"groups": [], "frontends": [], "statuses": []}


def scene_for_order():
    return [
        node(zone="z1"), namespace("shop", skip=True), pod("p", ns="shop", uid="u1"), pod("q", uid="u2"),
        *echo_scene(),
        service("dual", ip="10.96.0.40", ips=["10.96.0.40", "fd00::40"], ports=[port(80, "http"), port(53, "dns", "UDP")]),
        slice_("dual-a", "dual", [ep("10.244.1.1", for_zones=["z1"]), ep("10.244.1.2", for_zones=["z2"])]),
        slice_("dual-b", "dual", [ep("10.244.1.2", ready=False, terminating=True), ep("10.244.1.3", for_zones=["z1"])]),
        slice_("dual-6", "dual", [ep("fd00:244::1")], family="IPv6"),
        http_route("a", [parent("echo")], [rule(backend("echo-v1", weight=2), backend("missing"))],
                   created="2024-01-01T00:00:00Z"),
        http_route("b", [parent("echo")], [rule(backend("echo-v2"))], created="2024-01-01T00:00:00Z"),
        route("GRPCRoute", "g", [parent("echo", ns="mesh")], [rule(backend("dual", ns="mesh"))], ns="shop"),
        route("UDPRoute", "u", [parent("dual"), parent("dual")], [rule(backend("dual", port=53))]),
        service("twin", ip="10.96.0.40"),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_same_objects_in_any_order_give_the_same_bytes(seed):
    objects = scene_for_order()
    reference = resolve(objects, NODE)
    shuffled = list(objects)
    random.Random(seed).shuffle(shuffled)
    again = resolve(shuffled, NODE)
    assert render_state(again.state) == render_state(reference.state)
    assert render_statuses(again.statuses) == render_statuses(reference.statuses)
    assert again.problems == reference.problems


def test_a3_a_deleted_or_relabelled_slice_takes_its_endpoints_along():
    resolver = committed([*echo_scene(), slice_("echo-b", "echo", [ep("10.244.0.20")])])
    resolver.delete(slice_("echo-b", "echo", []))
    assert {str(g) for g in resolver.commit().groups} == {"mesh/echo:http/tcp/v4"}
    assert render_state(resolver.state) == render_state(resolve(echo_scene(), NODE).state)
    resolver.upsert(slice_("echo-a", "echo-v1", [ep("10.244.0.10")]))  # now labelled for echo-v1
    resolver.commit()
    moved = [o for o in echo_scene() if o["metadata"]["name"] != "echo-a"]
    moved.append(slice_("echo-a", "echo-v1", [ep("10.244.0.10")]))
    assert render_state(resolver.state) == render_state(resolve(moved, NODE).state)


def test_the_endpoint_count_follows_every_group_change():
    """The count the loop reports as meshlet_backends is kept per commit, never summed again."""

    def summed(resolver):
        return sum(len(g.endpoints) for g in resolver.state.groups.values())

    resolver = committed(scene_for_order())
    assert resolver.endpoint_count == summed(resolver) > 0
    resolver.upsert(slice_("echo-b", "echo", [ep("10.244.0.20"), ep("10.244.0.21")]))  # grows a group
    resolver.commit()
    assert resolver.endpoint_count == summed(resolver)
    resolver.upsert(node(zone="z2"))  # a zone change recomputes every group (A8)
    resolver.commit()
    assert resolver.endpoint_count == summed(resolver)
    resolver.delete(http_route("a", [], []))  # groups only that route used go away
    resolver.commit()
    assert resolver.endpoint_count == summed(resolver)
    for obj in scene_for_order():
        resolver.delete(obj)
    resolver.commit()
    assert resolver.endpoint_count == 0
