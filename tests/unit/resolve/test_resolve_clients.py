"""SEMANTICS C1-C3 (clients, namespaces, opting out) and bad input that must never raise."""

import pytest

from agent.model import ClientPod
from agent.resolve import Resolver
from resolve_builders import (
    NODE,
    backend,
    echo_scene,
    http_route,
    namespace,
    parent,
    pod,
    rule,
    run,
    service,
)


def test_c1_pods_on_this_node_are_clients_by_uid():
    res = run([pod("a", ns="shop", uid="u-a"), pod("b", ns="shop", uid="u-b", on="node-b"),
               pod("c", ns="mesh", uid="u-c"), {**pod("d", uid="u-d"), "spec": {}}])
    assert dict(res.state.clients) == {"u-a": ClientPod("u-a", "shop", "a"), "u-c": ClientPod("u-c", "mesh", "c")}


def test_c1_a_pod_without_uid_is_a_problem_not_a_client():
    broken = pod("a")
    del broken["metadata"]["uid"]
    res = run([broken])
    assert not res.state.clients
    assert any("Pod mesh/a" in line and "uid" in line for line in res.problems)


@pytest.mark.parametrize("case,objects,skip", [
    ("plain", [namespace("shop"), pod("a", ns="shop", uid="u")], False),
    ("namespace label", [namespace("shop", skip=True), pod("a", ns="shop", uid="u")], True),
    ("pod annotation", [namespace("shop"), pod("a", ns="shop", uid="u", skip=True)], True),
    ("label value must be true", [{**namespace("shop"), "metadata": {"name": "shop", "labels": {"meshlet.io/skip": "no"}}},
                                  pod("a", ns="shop", uid="u")], False),
])
def test_c2_skip_label_and_annotation(case, objects, skip):
    assert run(objects).state.clients["u"].skip is skip, case


def test_c2_a_namespace_label_change_reaches_its_pods():
    resolver = Resolver(NODE)
    for obj in [namespace("shop"), pod("a", ns="shop", uid="u-a"), pod("b", ns="other", uid="u-b")]:
        resolver.upsert(obj)
    resolver.commit()
    resolver.upsert(namespace("shop", skip=True))
    delta = resolver.commit()
    assert delta.clients == {"u-a"}
    assert resolver.state.clients["u-a"].skip
    resolver.delete(namespace("shop"))
    assert resolver.commit().clients == {"u-a"} and not resolver.state.clients["u-a"].skip


def test_c3_a_consumer_route_never_changes_a_client_outside_its_namespace():
    plain = run(echo_scene())
    with_consumer = run([*echo_scene(), http_route("mine", [parent("echo", ns="mesh")],
                                                   [rule(backend("echo-v1", ns="mesh"))], ns="shop")])
    outside = {k: v for k, v in with_consumer.state.frontends.items() if k.scope != "shop"}
    assert outside == dict(plain.state.frontends)
    assert {k.scope for k in with_consumer.state.frontends} == {"", "shop"}


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("obj,fragment", [
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, "v1 ConfigMap is not a kind"),
    ({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "g"}}, "Gateway"),
    ({"apiVersion": "gateway.networking.k8s.io/v9", "kind": "HTTPRoute", "metadata": {"name": "g"}}, "v9"),
    ({"kind": "Service", "metadata": {"name": "x"}}, "apiVersion and kind"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {}}, "without metadata.name"),
    ("not an object", "not a mapping"),
    (None, "not a mapping"),
])
def test_unknown_or_broken_objects_are_problems_not_exceptions(obj, fragment):
    res = run([*echo_scene(), obj])
    assert any(fragment in line for line in res.problems), res.problems
    assert res.state.frontends == run(echo_scene()).state.frontends


def test_a_deleted_bad_object_takes_its_problem_along():
    resolver = Resolver(NODE)
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "mesh"}}
    broken_service = service("echo", ports="80")
    resolver.upsert(bad)
    resolver.upsert(broken_service)
    resolver.commit()
    assert len(resolver.problems) == 2
    resolver.delete(bad)
    resolver.delete(broken_service)
    resolver.commit()
    assert resolver.problems == []


def test_two_services_claiming_one_frontend_do_not_share_it():
    res = run([service("b", ip="10.96.0.10"), service("a", ip="10.96.0.10")])
    assert [fe.service for fe in res.state.frontends.values()] == ["a"]
    assert any("mesh/a, mesh/b all claim 10.96.0.10:80/tcp" in line for line in res.problems)
