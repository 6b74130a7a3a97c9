"""Fuzzing (hypothesis): objects whose fields hold any JSON type at any path, with fields missing
or added, huge numbers and huge strings, fed through every entry point a real object takes:

- the Kubernetes source (a watch event, as the API server's JSON decodes) into the runtime's
  Store, then the Resolver;
- the manifests source (the same objects written as JSON and as YAML files) into the Store;
- the Resolver directly.

What must hold for every input: no exception escapes (a bad object is a problem line, never a
crash); the desired state keeps its invariants (every frontend's shares name groups that exist,
of the frontend's address family; a group forwards iff it has endpoints, sorted and unique); and
every rejection names the object (its kind and name when it has them; the manifests source adds
the file and the document index).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.kinds import identify
from agent.model import Verdict, render_state
from agent.resolve import Resolver, render_statuses, resolve
from agent.runtime.store import Store
from agent.sources.kube import KindWatcher, KubeSettings, core_kinds
from agent.sources.manifests import SOURCE, ManifestsSource, parse_manifest

NODE = "node-a"
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HUGE_NUMBERS = st.sampled_from([2**31, 2**32, 2**63, -(2**63) - 1, 2**64, 10**30, -1, 0, 65536, 1e308, -0.0])
SPECIAL_TEXT = st.sampled_from(["", " ", "x" * 70_000, "10.96.0.1", "::ffff:10.96.0.1", "fd00::1", "TCP",
                                "UDP", "SCTP", "Service", "None", "null", "ClientIP", "Local", "\x00", "é" * 300])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_NUMBERS,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), SPECIAL_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=10)

ROUTE_META = {"name": "r", "namespace": "mesh", "generation": 1}
TEMPLATES = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "mesh"},
     "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"], "ipFamilies": ["IPv4", "IPv6"],
              "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
              "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
              "internalTrafficPolicy": "Cluster", "externalIPs": ["192.0.2.1"]},
     "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-1", "namespace": "mesh", "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
     "endpoints": [{"addresses": ["10.244.0.1"], "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": NODE, "zone": "z1", "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": NODE}]}},
                   {"addresses": ["10.244.0.2"], "conditions": {"ready": False}}]},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": dict(ROUTE_META),
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
              "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                         "backendRefs": [{"name": "web", "port": 80, "weight": 3}, {"name": "other", "port": 80}]}]}},
    {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "UDPRoute",
     "metadata": {**ROUTE_META, "namespace": "team", "creationTimestamp": "2024-01-01T00:00:00Z"},
     "spec": {"parentRefs": [{"kind": "Service", "group": "core", "name": "web", "namespace": "mesh"}],
              "rules": [{"backendRefs": [{"name": "web", "namespace": "mesh", "port": 53}]}]}},
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "p", "namespace": "team", "uid": "0b7c-1", "annotations": {"meshlet.io/skip": "false"}},
     "spec": {"nodeName": NODE}, "status": {"podIPs": [{"ip": "10.244.0.9"}]}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team", "labels": {"meshlet.io/skip": "true"}}},
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}}},
]


def _places(value, path=()):
    """Every (path to a container, key in it) of a JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield path, key
            yield from _places(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield path, index
            yield from _places(child, path + (index,))


def _at(value, path):
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw):
    """A template with 1-4 mutations: a value replaced by any JSON, a field removed, a field added."""
    obj = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(1, 4))):
        places = list(_places(obj))
        if not places:
            break
        path, key = draw(st.sampled_from(places))
        container = _at(obj, path)
        action = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if action == "replace":
            container[key] = draw(JSON)
        elif action == "remove" and isinstance(container, dict):
            del container[key]
        elif action == "remove":
            container.pop(key)
        elif isinstance(container, dict):
            container[draw(st.text(max_size=10))] = draw(JSON)
        else:
            container.append(draw(JSON))
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)  # not even a mapping
    return obj


OBJECTS = st.lists(mutated(), max_size=6).map(lambda objs: objs + [copy.deepcopy(t) for t in TEMPLATES[:2]])


def assert_state_invariants(resolver: Resolver) -> None:
    state = resolver.state
    render_state(state)
    render_statuses(resolver.statuses)
    for key, fe in state.frontends.items():
        version = ipaddress.ip_address(key.address).version
        for share in fe.split:
            assert share.weight >= 0
            if share.group is not None:
                assert share.group in state.groups and share.group.family == version
    for group in state.groups.values():
        assert list(group.endpoints) == sorted(set(group.endpoints))
        assert bool(group.endpoints) == (group.verdict == Verdict.FORWARD)
        for endpoint in group.endpoints:
            assert ipaddress.ip_address(endpoint.address).version == group.key.family
            assert 0 < endpoint.port < 65536


def _name_of(obj) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


@SETTINGS
@given(OBJECTS)
def test_the_resolver_takes_any_json_anywhere(objects):
    resolver = Resolver(NODE)
    for obj in objects:
        resolver.upsert(obj)
    resolver.commit()
    assert_state_invariants(resolver)
    for obj in objects:  # and take each away again
        resolver.delete(obj) if isinstance(obj, dict) else None
    resolver.commit()
    assert_state_invariants(resolver)


@SETTINGS
@given(mutated())
def test_every_rejection_names_the_object(obj):
    for line in resolve([obj], NODE).problems:
        name = _name_of(obj)
        if name is not None and identify(obj)[0] is not None:
            assert name in line, (line, obj)
        else:
            assert any(words in line for words in ("metadata.name", "not a mapping", "must both be strings",
                                                   "not a kind meshlet reads", "metadata.namespace",
                                                   name or "\x00never")), line


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "?"]),
                          st.one_of(mutated(), JSON)), max_size=6))
def test_the_kubernetes_source_takes_any_watch_event(events):
    store = Store()
    kinds = core_kinds(NODE)
    for event_type, obj in events:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        resource = kinds[kind if isinstance(kind, str) and kind in kinds else "Service"]
        watcher = KindWatcher(None, resource, store, KubeSettings(), on_first_list=lambda *_: None,
                              on_api_error=lambda *_: None)
        try:
            watcher._handle({"type": event_type, "object": obj})
        except ValueError as err:  # a broken event: the watcher relists (its _run catches it)
            assert not isinstance(obj, dict) or event_type == "ERROR", err
        except Exception as err:
            assert event_type == "ERROR", f"{type(err).__name__}: {err}"
    resolver = Resolver(NODE)
    batch = store.take()
    for obj in batch.deletes:
        resolver.delete(obj)
    resolver.upsert_many(batch.upserts)
    resolver.commit()
    assert_state_invariants(resolver)


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=5), st.sampled_from(["yaml", "json"]))
def test_the_manifests_source_takes_any_document(objects, form):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"objects.{form}"
        if form == "json":
            path.write_text(json.dumps(objects))
        else:
            path.write_text(yaml.safe_dump_all(objects, allow_unicode=True))
        store = Store(expected_sources=[SOURCE])
        source = ManifestsSource(Path(directory), store)
        records = _capture_warnings(source.poll_once)
        assert source.poll_once()
        contents = parse_manifest(path.name, path.read_text()) if form == "json" else None
    for record in records:
        fields = record.meshlet_fields
        assert fields["file"] == path.name, fields
        if record.meshlet_event == "manifests.bad_document":
            assert fields["index"].split(".")[0].isdigit(), fields
    if contents is not None:
        assert len(contents.objects) + len(contents.bad) >= len(objects)
    resolver = Resolver(NODE)
    batch = store.take()
    resolver.upsert_many(batch.upserts)
    resolver.commit()
    assert_state_invariants(resolver)


def _capture_warnings(fn) -> list[logging.LogRecord]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if getattr(record, "meshlet_event", "").startswith(("manifests.bad", "manifests.error")):
                records.append(record)
    handler = Keep(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert fn(), "the first poll delivered nothing"
    finally:
        root.removeHandler(handler)
    return records
