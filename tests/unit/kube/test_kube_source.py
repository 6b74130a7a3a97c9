"""The Kubernetes source against the stand-in API server: list, watch, resume, relist, discovery.

What a user relies on: the sink holds exactly what the API server holds; a kind reports synced
only after its first full list; a dropped connection resumes from the last resourceVersion
(bookmarks included) without a new list; 410 Gone relists; a route CRD that is not installed is
no error, and one installed later is picked up.
"""

from __future__ import annotations

import threading

import pytest

from agent.sources.kube import API_ERROR_REASONS, CORE_KINDS, ROUTE_KINDS, KubeSource
from agent.sources.kubeapi import Backoff
from kube_testing import wait_until
from standin_apiserver import make

FAST = dict(page_size=2, watch_timeout=30, backoff_initial=0.05, backoff_max=0.2,
            discovery_interval=0.3, request_timeout=5)


@pytest.fixture
def start_source(api_client, sink):
    sources = []

    def start(**settings) -> KubeSource:
        source = KubeSource(api_client, "node-a", sink, **{**FAST, **settings})
        sources.append(source)
        source.start()
        return source

    yield start
    for source in sources:
        source.stop()


def wait_synced(sink, source, timeout=5.0):
    sink.wait_for(lambda: set(sink.synced_sources) >= set(source.kinds), timeout, "every kind synced")


def last_watch_version(apiserver, kind) -> str:
    return apiserver.requests_for(kind, watch=True)[-1].query["resourceVersion"]


def test_lists_in_pages_and_hands_over_typed_objects_with_unknown_fields(apiserver, sink, start_source):
    for i in range(5):
        apiserver.create(make("Service", "default", f"svc-{i}",
                              spec={"clusterIP": f"10.96.0.{i}", "futureField": {"kept": [1, 2]}}))
    apiserver.create(make("Pod", "default", "here", spec={"nodeName": "node-a"}))
    apiserver.create(make("Pod", "default", "elsewhere", spec={"nodeName": "node-b"}))
    apiserver.create(make("Node", "", "node-a"))
    apiserver.create(make("Node", "", "node-b"))

    source = start_source()
    wait_synced(sink, source)

    assert sink.names("Service") == [f"svc-{i}" for i in range(5)]
    assert sink.names("Pod") == ["here"]  # fieldSelector spec.nodeName
    assert sink.names("Node") == ["node-a"]  # fieldSelector metadata.name
    svc = sink.objects[("Service", "default", "svc-0")]
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service")  # filled in: list items lack them
    assert svc["spec"]["futureField"] == {"kept": [1, 2]}
    lists = apiserver.requests_for("Service", watch=False)
    assert len(lists) == 3 and all(r.query["limit"] == "2" for r in lists)
    assert "continue" not in lists[0].query and all(r.query.get("continue") for r in lists[1:])


def test_a_list_reaches_the_sink_page_by_page_as_it_arrives(apiserver, sink, start_source):
    for i in range(5):
        apiserver.create(make("Service", "default", f"svc-{i}"))
    release = threading.Event()
    continued = []

    def hold_the_last_page(method, path, query, body):
        if path == "/api/v1/services" and query.get("continue"):
            continued.append(query["continue"])
            if len(continued) == 2:
                release.wait(10)
        return None

    apiserver.add_hook(hold_the_last_page)
    try:
        source = start_source()  # pages of 2: [svc-0, svc-1], [svc-2, svc-3], then the held [svc-4]
        sink.wait_for(lambda: sink.names("Service") == ["svc-0", "svc-1", "svc-2", "svc-3"],
                      what="the first two pages before the list ends")
        wait_until(lambda: len(continued) == 2, 30, "the source asking for the held last page")
        assert "Service" not in sink.synced_sources and sink.calls_of("list", "Service") == []
    finally:
        release.set()
    wait_synced(sink, source)
    assert sink.calls_of("page", "Service") == [("page", "Service", ["svc-0", "svc-1"]),
                                               ("page", "Service", ["svc-2", "svc-3"]),
                                               ("page", "Service", ["svc-4"])]
    assert sink.calls_of("list", "Service") == [("list", "Service", [f"svc-{i}" for i in range(5)])]


def test_each_kind_is_synced_once_and_only_after_its_first_list(apiserver, sink, start_source):
    apiserver.create(make("Service", "default", "web"))
    release = threading.Event()
    asked = threading.Event()

    def hold_service_list(method, path, query, body):
        if path == "/api/v1/services" and query.get("watch") != "true":
            asked.set()
            release.wait(10)
        return None

    apiserver.add_hook(hold_service_list)
    source = start_source()
    sink.wait_for(lambda: set(sink.synced_sources) >= set(source.kinds) - {"Service"}, what="all but Service")
    assert asked.wait(30), "the Service list was never asked for"
    assert "Service" not in sink.synced_sources
    assert sink.names("Service") == []

    release.set()
    wait_synced(sink, source)
    calls = [c for c in sink.calls if c[1] == "Service" and c[0] in ("list", "synced")]
    assert calls == [("list", "Service", ["web"]), ("synced", "Service")]
    assert sorted(sink.synced_sources) == sorted(CORE_KINDS + ROUTE_KINDS)  # once each


def test_watch_events_reach_the_sink(apiserver, sink, start_source):
    source = start_source()
    wait_synced(sink, source)
    apiserver.wait_for_watches("Service")

    apiserver.create(make("Service", "default", "web", spec={"clusterIP": "10.96.0.10"}))
    sink.wait_for(lambda: sink.names("Service") == ["web"], what="ADDED")
    apiserver.update(make("Service", "default", "web", spec={"clusterIP": "10.96.0.11"}))
    sink.wait_for(lambda: sink.objects[("Service", "default", "web")]["spec"]["clusterIP"] == "10.96.0.11",
                  what="MODIFIED")
    apiserver.delete("Service", "default", "web")
    sink.wait_for(lambda: sink.names("Service") == [], what="DELETED")
    # A pod moving onto this node arrives through the field-selected watch.
    apiserver.create(make("Pod", "default", "p", spec={"nodeName": "node-b"}))
    apiserver.update(make("Pod", "default", "p", spec={"nodeName": "node-a"}))
    sink.wait_for(lambda: sink.names("Pod") == ["p"], what="pod arriving on this node")


def test_dropped_connection_resumes_from_the_last_version_without_relisting(apiserver, sink, start_source):
    source = start_source()
    wait_synced(sink, source)
    apiserver.wait_for_watches("Service")
    apiserver.create(make("Service", "default", "first"))
    sink.wait_for(lambda: sink.names("Service") == ["first"])
    seen_version = apiserver.get("Service", "default", "first")["metadata"]["resourceVersion"]
    lists_before = len(apiserver.requests_for("Service", watch=False))

    apiserver.drop_watches("Service")
    apiserver.create(make("Service", "default", "during-the-outage"))

    sink.wait_for(lambda: sink.names("Service") == ["during-the-outage", "first"], what="missed event")
    assert last_watch_version(apiserver, "Service") == seen_version
    assert len(apiserver.requests_for("Service", watch=False)) == lists_before  # no relist
    assert sink.calls_of("list", "Service") == [("list", "Service", [])]


def test_a_server_ended_watch_is_resumed_at_once(apiserver, sink, start_source):
    # An hour of backoff: waited for, it would fail the generous deadline below; resumed at
    # once, the new watch comes within it whatever the machine's load.
    source = start_source(backoff_initial=3600.0, backoff_max=3600.0)
    wait_synced(sink, source)
    apiserver.wait_for_watches("Service")
    apiserver.create(make("Service", "default", "a"))
    sink.wait_for(lambda: sink.names("Service") == ["a"])
    seen_version = apiserver.get("Service", "default", "a")["metadata"]["resourceVersion"]

    apiserver.end_watches("Service")  # what the server does when timeoutSeconds runs out
    wait_until(lambda: len(apiserver.requests_for("Service", watch=True)) == 2, 30.0, "a new watch at once")
    assert last_watch_version(apiserver, "Service") == seen_version
    assert len(apiserver.requests_for("Service", watch=False)) == 1


def test_bookmarks_advance_the_version_a_watch_resumes_from(apiserver, sink, start_source):
    source = start_source()
    wait_synced(sink, source)
    apiserver.wait_for_watches("Service")
    first_watch = last_watch_version(apiserver, "Service")
    assert apiserver.requests_for("Service", watch=True)[-1].query["allowWatchBookmarks"] == "true"

    apiserver.touch_other()  # the cluster moves on; nothing a Service watch sees
    bookmark_version = str(apiserver.send_bookmarks("Service"))
    assert int(bookmark_version) > int(first_watch)
    wait_until(lambda: source._watchers["Service"].resource_version == bookmark_version, 30,
               "the bookmark reaching the watcher")

    apiserver.drop_watches("Service")
    wait_until(lambda: len(apiserver.requests_for("Service", watch=True)) == 2, what="the resumed watch")
    assert last_watch_version(apiserver, "Service") == bookmark_version
    assert sink.calls_of("upsert", "Service") == []  # a bookmark is no object


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_410_gone_relists_and_the_sink_matches_the_server(apiserver, sink, start_source, gone_as_http):
    apiserver.gone_as_http = gone_as_http
    apiserver.create(make("Service", "default", "stays"))
    apiserver.create(make("Service", "default", "goes"))
    source = start_source()
    wait_synced(sink, source)
    apiserver.wait_for_watches("Service")

    # The agent is cut off while the cluster changes and compacts its history.
    cut_off = threading.Event()
    cut_off.set()
    refused = []

    def unreachable(method, path, query, body):
        if cut_off.is_set() and path == "/api/v1/services":
            refused.append(query.get("watch"))
            return 503, {"kind": "Status", "code": 503, "message": "stand-in: unavailable"}
        return None

    apiserver.add_hook(unreachable)
    apiserver.drop_watches("Service")
    apiserver.delete("Service", "default", "goes")
    apiserver.create(make("Service", "default", "new"))
    apiserver.compact()
    wait_until(lambda: refused, 30, "the source trying again while cut off")
    cut_off.clear()

    sink.wait_for(lambda: sink.names("Service") == ["new", "stays"], what="relist after 410")
    assert len(apiserver.requests_for("Service", watch=False)) == 2
    assert sink.calls_of("list", "Service")[-1] == ("list", "Service", ["new", "stays"])
    assert sink.synced_sources.count("Service") == 1


def test_410_in_an_open_watch_relists(apiserver, sink, start_source):
    source = start_source()
    wait_synced(sink, source)
    apiserver.wait_for_watches("EndpointSlice")
    apiserver.create(make("EndpointSlice", "default", "web-abc", endpoints=[]))
    sink.wait_for(lambda: sink.names("EndpointSlice") == ["web-abc"])

    apiserver.expire_watches("EndpointSlice")
    sink.wait_for(lambda: len(sink.calls_of("list", "EndpointSlice")) == 2, what="relist")
    assert sink.calls_of("list", "EndpointSlice")[-1] == ("list", "EndpointSlice", ["web-abc"])
    apiserver.wait_for_watches("EndpointSlice")


def test_a_missing_route_crd_is_no_error_and_is_picked_up_once_installed(apiserver, sink, start_source):
    source = start_source()
    wait_synced(sink, source)
    assert set(source.served_kinds) == set(CORE_KINDS)
    for kind in ROUTE_KINDS:
        assert sink.calls_of("list", kind) == [("list", kind, [])]
        assert apiserver.requests_for(kind) == []

    apiserver.serve_crd("HTTPRoute", ("v1",))
    apiserver.create(make("HTTPRoute", "default", "split", spec={"parentRefs": []}))
    sink.wait_for(lambda: sink.names("HTTPRoute") == ["split"], what="HTTPRoute after install")
    route = sink.objects[("HTTPRoute", "default", "split")]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert sink.synced_sources.count("HTTPRoute") == 1

    apiserver.remove_crd("HTTPRoute")
    sink.wait_for(lambda: sink.names("HTTPRoute") == [], what="HTTPRoute gone with its CRD")
    wait_until(lambda: "HTTPRoute" not in source.served_kinds, 30, "HTTPRoute no longer served")


def test_one_bad_discovery_answer_does_not_drop_a_route_kind(apiserver, sink, start_source):
    apiserver.serve_crd("HTTPRoute", ("v1",))
    apiserver.create(make("HTTPRoute", "default", "split", spec={}))
    source = start_source()
    wait_synced(sink, source)
    sink.wait_for(lambda: sink.names("HTTPRoute") == ["split"])
    hiccups = []

    def one_404(method, path, query, body):
        if path == "/apis/gateway.networking.k8s.io" and not hiccups:
            hiccups.append(path)
            return 404, {"kind": "Status", "code": 404, "message": "stand-in: not found (once)"}
        return None

    apiserver.add_hook(one_404)
    group_reads = lambda: len(apiserver.requests_for_path("/apis/gateway.networking.k8s.io"))  # noqa: E731
    wait_until(lambda: hiccups, what="the bad discovery answer")
    after_hiccup = group_reads()
    wait_until(lambda: group_reads() >= after_hiccup + 2, what="two more discovery rounds")
    assert sink.names("HTTPRoute") == ["split"]
    assert sink.calls_of("list", "HTTPRoute") == [("list", "HTTPRoute", ["split"])]
    assert "HTTPRoute" in source.served_kinds


def test_the_best_served_route_version_is_watched(apiserver, sink, start_source):
    apiserver.serve_crd("HTTPRoute", ("v1beta1", "v1"))
    apiserver.serve_crd("GRPCRoute", ("v1alpha2",))
    apiserver.serve_crd("TCPRoute", ("v1alpha3", "v1alpha2"))
    source = start_source()
    wait_synced(sink, source)
    sink.wait_for(lambda: len(source.served_kinds) == len(CORE_KINDS) + 3)
    served = source.served_kinds
    assert served["HTTPRoute"] == "gateway.networking.k8s.io/v1"
    assert served["GRPCRoute"] == "gateway.networking.k8s.io/v1alpha2"
    assert served["TCPRoute"] == "gateway.networking.k8s.io/v1alpha2"  # v1alpha2 before v1alpha3


def test_an_unavailable_server_is_retried_until_it_answers(apiserver, sink, start_source):
    failing = threading.Event()
    failing.set()
    refused = []

    def unavailable(method, path, query, body):
        if failing.is_set():
            refused.append(path)
            return 503, {"kind": "Status", "code": 503, "message": "stand-in: unavailable"}
        return None

    apiserver.add_hook(unavailable)
    apiserver.create(make("Namespace", "", "default"))
    source = start_source()
    wait_until(lambda: refused.count("/api/v1/namespaces") >= 2, 30, "the Namespace list refused and retried")
    assert sink.synced_sources == []  # nothing is synced while nothing could be listed
    failing.clear()
    wait_synced(sink, source)
    assert sink.names("Namespace") == ["default"]


def test_each_failed_request_is_reported_with_its_kind_and_reason(apiserver, api_client, sink):
    """What meshlet_api_errors counts: a refused list (403), a failing server (503)."""
    answers = {"/api/v1/namespaces": (403, "Forbidden"), "/api/v1/services": (503, "ServiceUnavailable")}
    failing = threading.Event()
    failing.set()

    def refuse(method, path, query, body):
        if failing.is_set() and path in answers:
            code, reason = answers[path]
            return code, {"kind": "Status", "code": code, "reason": reason, "message": "stand-in: refused"}
        return None

    apiserver.add_hook(refuse)
    errors = []
    source = KubeSource(api_client, "node-a", sink, on_api_error=lambda kind, reason: errors.append((kind, reason)),
                        **FAST)
    source.start()
    try:
        wait_until(lambda: {("Namespace", "forbidden"), ("Service", "server")} <= set(errors), 30,
                   "both refusals reported")
        failing.clear()
        wait_synced(sink, source, timeout=30)
        assert {reason for _, reason in errors} <= set(API_ERROR_REASONS)
        assert {kind for kind, _ in errors} == {"Namespace", "Service"}, errors
    finally:
        source.stop()


def test_requests_carry_the_clients_credentials(apiserver, api_client, sink):
    api_client.configuration.api_key = {"authorization": "Bearer stand-in-token"}
    source = KubeSource(api_client, "node-a", sink, **FAST)
    source.start()
    try:
        wait_synced(sink, source)
        apiserver.wait_for_watches("Service")
    finally:
        source.stop()
    assert apiserver.requests
    assert {r.headers.get("authorization") for r in apiserver.requests} == {"Bearer stand-in-token"}
    assert all(r.headers.get("accept") == "application/json" for r in apiserver.requests)


def test_backoff_doubles_with_jitter_up_to_the_cap():
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_into_the_store_a_relist_deletes_what_is_gone_and_skips_what_is_unchanged(apiserver, api_client):
    from agent.runtime.store import Store

    apiserver.create(make("Service", "default", "stays"))
    apiserver.create(make("Service", "default", "goes"))
    source = KubeSource(api_client, "node-a", Store(), **FAST)
    store = source._sink = Store(expected_sources=source.kinds)
    source.start()
    try:
        wait_until(store.all_synced, what="every kind synced into the store")
        listed = store.take().upserts
        assert sorted(o["metadata"]["name"] for o in listed if o["kind"] == "Service") == ["goes", "stays"]
        apiserver.wait_for_watches("Service")

        cut_off = threading.Event()
        cut_off.set()
        apiserver.add_hook(lambda method, path, query, body: (
            (503, {"kind": "Status", "code": 503, "message": "stand-in: unavailable"})
            if cut_off.is_set() and path == "/api/v1/services" else None))
        apiserver.drop_watches("Service")
        apiserver.delete("Service", "default", "goes")
        apiserver.compact()  # the watch cannot resume: 410, relist
        cut_off.clear()

        changes = []
        wait_until(lambda: changes.append(store.take()) or any(b.deletes for b in changes), what="the delete")
        assert [d["metadata"]["name"] for b in changes for d in b.deletes] == ["goes"]
        assert [o for b in changes for o in b.upserts] == [], "the unchanged Service is not handed over again"
        assert store.counts()["Service"] == 1
    finally:
        source.stop()
