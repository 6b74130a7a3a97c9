"""Property tests (hypothesis): random clusters, malformed ones included, never make resolve raise,
and the invariants a user relies on hold for every one of them.

The universe is small on purpose (3 namespaces, 4 Service names, a handful of addresses and
ports) so that random objects collide: shared addresses, slices of the same Service, routes on
the same parent, duplicate parentRefs. A corruption step then replaces random parts of random
objects with garbage (wrong types, missing fields, negative or huge numbers).
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import render_state
from agent.resolve import Resolver, render_statuses, resolve
from agent.resolve.objects import ROUTE_KINDS, canonical_ip, identify

NODE = "node-a"
NAMESPACES = ["mesh", "shop", "other"]
NAMES = ["a", "b", "c"]
#: draws lean towards one namespace, so that Services, slices and routes meet
_NS = st.sampled_from(["mesh", "mesh", "mesh", "shop", "other"])
PORTS = [(80, "http", "TCP"), (8080, "", "TCP"), (53, "dns", "UDP")]
GARBAGE = st.one_of(st.none(), st.integers(-5, 3_000_000), st.text(max_size=3), st.just([]), st.just({}),
                    st.just([None]), st.booleans())

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _service(draw):
    ns, name = draw(_NS), draw(st.sampled_from(NAMES))
    ips = draw(st.sampled_from([["10.96.0.1"], ["10.96.0.2"], ["10.96.0.3", "fd00::3"], ["fd00::1"],
                                ["10.96.0.4"], ["10.96.0.5"], ["None"], []]))
    spec = {"clusterIP": ips[0] if ips else None, "clusterIPs": ips,
            "ports": [{"port": p, "name": n, "protocol": pr} for p, n, pr in
                      draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))]}
    if draw(st.integers(0, 3)) == 0:
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    if draw(st.integers(0, 9)) == 0:
        spec["type"] = "ExternalName"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _endpoint(draw, family):
    pool = ["10.244.0.1", "10.244.0.2", "10.244.0.3"] if family == "IPv4" else ["fd00:244::1", "fd00:244::2"]
    entry = {"addresses": [draw(st.sampled_from(pool))]}
    conditions = {}
    for cond in ("ready", "serving", "terminating"):
        value = draw(st.sampled_from([None, None, None, True, False]))
        if value is not None:
            conditions[cond] = value
    entry["conditions"] = conditions
    entry["nodeName"] = draw(st.sampled_from([NODE, "node-b", None]))
    if draw(st.booleans()):
        entry["hints"] = {"forZones": [{"name": draw(st.sampled_from(["z1", "z2"]))}]}
    if draw(st.integers(0, 3)) == 0:
        entry.setdefault("hints", {})["forNodes"] = [{"name": draw(st.sampled_from([NODE, "node-b"]))}]
    return entry


def _slice(draw):
    ns, svc = draw(_NS), draw(st.sampled_from(NAMES))
    family = draw(st.sampled_from(["IPv4", "IPv4", "IPv6"]))
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-{draw(st.integers(0, 2))}", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family,
            "ports": [{"port": 9000 + p, "name": n, "protocol": pr}
                      for p, n, pr in draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))],
            "endpoints": [_endpoint(draw, family) for _ in range(draw(st.integers(0, 3)))]}


def _ref(draw, parent: bool):
    ref = {"name": draw(st.sampled_from(NAMES))}
    if draw(st.booleans()):
        ref["namespace"] = draw(_NS)
    if parent:
        ref["group"], ref["kind"] = draw(st.sampled_from([("", "Service"), ("", "Service"), ("core", "Service"),
                                                          (None, "Service"), ("gateway.networking.k8s.io", "Gateway")]))
        if ref["group"] is None:
            del ref["group"]
        if draw(st.booleans()):
            ref["port"] = draw(st.sampled_from([80, 8080, 53, 1]))
    else:
        ref["port"] = draw(st.sampled_from([80, 8080, 53]))
        weight = draw(st.sampled_from([None, None, None, 0, 1, 3, 1_000_000, -1, 1_000_001]))
        if weight is not None:
            ref["weight"] = weight
    return ref


def _route(draw):
    kind = draw(st.sampled_from(ROUTE_KINDS))
    meta = {"name": draw(st.sampled_from(["r1", "r2", "r3"])), "namespace": draw(_NS),
            "generation": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        meta["creationTimestamp"] = draw(st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"]))
    parents = [_ref(draw, True) for _ in range(draw(st.integers(1, 3)))]
    if parents and draw(st.booleans()):
        parents.append(dict(parents[0]))  # a duplicate parentRef
    rules = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        rule = {"backendRefs": [_ref(draw, False) for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3])))]}
        if kind == "HTTPRoute" and draw(st.integers(0, 4)) == 0:
            rule["matches"] = [{"path": {"type": "PathPrefix", "value": draw(st.sampled_from(["/", "/x"]))}}]
        rules.append(rule)
    return {"apiVersion": f"gateway.networking.k8s.io/{draw(st.sampled_from(['v1', 'v1alpha2']))}", "kind": kind,
            "metadata": meta, "spec": {"parentRefs": parents, "rules": rules}}


def _other(draw):
    kind = draw(st.sampled_from(["Namespace", "Node", "Pod", "ConfigMap"]))
    name = draw(st.sampled_from(NAMESPACES if kind == "Namespace" else [NODE, "node-b", "p1", "p2"]))
    meta = {"name": name}
    if kind == "Namespace" and draw(st.booleans()):
        meta["labels"] = {"meshlet.io/skip": "true"}
    if kind == "Node":
        meta["labels"] = {"topology.kubernetes.io/zone": draw(st.sampled_from(["z1", "z2"]))}
    obj = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind in ("Pod", "ConfigMap"):
        meta["namespace"] = draw(_NS)
        meta["uid"] = f"uid-{draw(st.integers(0, 3))}"
        obj["spec"] = {"nodeName": draw(st.sampled_from([NODE, "node-b"]))}
    return obj


def _corrupt(draw, obj):
    """Replace one random part of `obj` (a copy) with garbage."""
    path, node = [], obj
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    if not path:
        return draw(GARBAGE) if draw(st.integers(0, 4)) == 0 else obj
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(GARBAGE)
    return obj


@st.composite
def clusters(draw, corrupt=False):
    objects = []
    for maker, most in ((_service, 6), (_slice, 8), (_route, 5), (_other, 4)):
        objects += [maker(draw) for _ in range(draw(st.integers(0, most)))]
    if corrupt:
        for i in draw(st.lists(st.integers(0, max(len(objects) - 1, 0)), max_size=4)):
            if objects:
                objects[i] = _corrupt(draw, objects[i])
    return _last_of_each(objects)


def _last_of_each(objects):
    """The set the cluster holds: one object per (kind, namespace, name), the last given."""
    by_key = {}
    for i, obj in enumerate(objects):
        key, _ = identify(obj)
        by_key[key if key is not None else ("unidentified", i)] = obj
    return list(by_key.values())


def _is_route(obj):
    key, _ = identify(obj)
    return key is not None and key.kind in ROUTE_KINDS


# --- properties -------------------------------------------------------------------------------


@SETTINGS
@given(clusters(corrupt=True))
def test_random_and_malformed_objects_never_raise(objects):
    res = resolve(objects, NODE)
    render_state(res.state)
    render_statuses(res.statuses)
    for key, fe in res.state.frontends.items():
        for share in fe.split:
            assert share.group is None or share.group in res.state.groups  # model invariant
            assert share.group is None or share.group.family == ipaddress.ip_address(key.address).version
    for g in res.state.groups.values():
        assert list(g.endpoints) == sorted(set(g.endpoints))
        assert bool(g.endpoints) == (g.verdict.name == "FORWARD")


@SETTINGS
@given(clusters())
def test_every_endpoint_belongs_to_its_services_slices_and_port(objects):
    offered = set()
    for obj in objects:
        if obj["kind"] != "EndpointSlice":
            continue
        family = 4 if obj["addressType"] == "IPv4" else 6
        svc = obj["metadata"]["labels"]["kubernetes.io/service-name"]
        for p in obj["ports"]:
            for e in obj["endpoints"]:
                address = str(ipaddress.ip_address(e["addresses"][0]))
                offered.add((obj["metadata"]["namespace"], svc, p["name"], p["protocol"], family, address, p["port"]))
    res = resolve(objects, NODE)
    for key, g in res.state.groups.items():
        for e in g.endpoints:
            fact = (key.namespace, key.service, key.port_name, key.protocol, key.family, e.address, e.port)
            assert fact in offered


@SETTINGS
@given(clusters())
def test_shares_equal_the_weights_of_the_effective_rule(objects):
    routes = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects if _is_route(o)}
    res = resolve(objects, NODE)
    for fe in res.state.frontends.values():
        if fe.route is None:
            assert [s.weight for s in fe.split] == [1]
            continue
        rules = routes[(fe.route.kind, fe.route.namespace, fe.route.name)]["spec"]["rules"]
        refs = rules[0]["backendRefs"] if rules else []
        assert [s.weight for s in fe.split] == [r.get("weight", 1) for r in refs]


@SETTINGS
@given(clusters(), st.sampled_from(NAMESPACES))
def test_c3_consumer_routes_from_a_namespace_never_change_other_scopes(objects, ns):
    without = [o for o in objects if not (_is_route(o) and o["metadata"]["namespace"] == ns)]
    full, reduced = resolve(objects, NODE), resolve(without, NODE)

    def outside(res):
        # frontends of Services in other namespaces, seen from any scope but `ns`
        return {k: v for k, v in res.state.frontends.items() if v.namespace != ns and k.scope != ns}

    assert outside(full) == outside(reduced)


@SETTINGS
@given(clusters(corrupt=True))
def test_removing_all_routes_gives_exactly_the_route_less_state(objects):
    resolver = Resolver(NODE)
    for obj in objects:
        resolver.upsert(obj)
    resolver.commit()
    for obj in objects:
        if _is_route(obj):
            resolver.delete(obj)
    resolver.commit()
    route_less = resolve([o for o in objects if not _is_route(o)], NODE)
    assert render_state(resolver.state) == render_state(route_less.state)
    assert not resolver.statuses
    assert all(k.scope == "" and v.route is None for k, v in resolver.state.frontends.items())


@SETTINGS
@given(clusters(corrupt=True), clusters(corrupt=True), st.data())
def test_incremental_equals_one_shot(first, second, data):
    """Upserts and deletes drawn from two versions of a cluster (so replacements and deletes hit
    objects the Resolver holds), committing now and then: at the end the Resolver holds the same
    state, statuses and problems as a one-shot resolve of what is left."""
    pool = [o for o in first + second if identify(o)[0] is not None]
    resolver = Resolver(NODE)
    held = {}
    for obj in first:
        resolver.upsert(obj)
        key, _ = identify(obj)
        held[key if key is not None else ("unidentified", id(obj))] = obj
    resolver.commit()
    if pool:
        steps = data.draw(st.lists(st.tuples(st.sampled_from(range(len(pool))), st.integers(0, 1), st.booleans()),
                                   max_size=25))
        for index, op, commit in steps:
            obj = pool[index]
            key, _ = identify(obj)
            if op == 0 and key in held:
                resolver.delete(held.pop(key))
            else:
                resolver.upsert(obj)
                held[key] = obj
            if commit:
                resolver.commit()
                _assert_same(resolver, resolve(list(held.values()), NODE))
    resolver.commit()
    _assert_same(resolver, resolve(list(held.values()), NODE))


def _assert_same(resolver, one_shot):
    assert render_state(resolver.state) == render_state(one_shot.state)
    assert render_statuses(resolver.statuses) == render_statuses(one_shot.statuses)
    assert tuple(resolver.problems) == one_shot.problems


@SETTINGS
@given(clusters(corrupt=True), st.randoms(use_true_random=False))
def test_same_objects_any_order(objects, rnd):
    shuffled = list(objects)
    rnd.shuffle(shuffled)
    a, b = resolve(objects, NODE), resolve(shuffled, NODE)
    assert render_state(a.state) == render_state(b.state)
    assert render_statuses(a.statuses) == render_statuses(b.statuses)
    assert a.problems == b.problems



@settings(max_examples=300, deadline=None)
@given(st.one_of(st.ip_addresses().map(str), st.text(alphabet="0123456789.:abcdef ", max_size=20)))
def test_canonical_ip_fast_path_agrees_with_ipaddress(text):
    try:
        addr = ipaddress.ip_address(text.strip())
        expected = (str(addr), addr.version)
    except ValueError:
        expected = None
    assert canonical_ip(text) == expected
