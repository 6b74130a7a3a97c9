"""Health and readiness transitions, and the HTTP listener that serves them."""

import json
import urllib.error
import urllib.request

import pytest
from runtime_fakes import Rig, service

from agent.errors import UserError
from agent.model import Condition, ParentStatus, RouteId, RouteStatus
from agent.runtime.http import Listener, PodBoard, RouteStatusBoard


def test_readiness_waits_for_sources_first_write_and_attach():
    rig = Rig(adopted=False)
    verdict = rig.health.readyz()
    assert not verdict.ok
    assert "waiting for the first list of: manifests, pod-cgroups" in verdict.reasons
    rig.sync_all()
    rig.datapath.fail_attach = 1
    rig.loop.tick()
    verdict = rig.health.readyz()
    assert not verdict.ok and verdict.reasons == ("programs not attached yet",)
    rig.clock.advance(0.2)
    rig.loop.tick()
    assert rig.health.readyz().ok


def test_health_fails_after_repeated_write_failures_and_recovers():
    rig = Rig()
    rig.sync_all()
    rig.loop.tick()
    assert rig.health.healthz().ok
    rig.clock.advance(1)
    rig.datapath.fail_next = 3
    rig.store.upsert(service("a", "10.96.0.1"))
    for _ in range(2):
        rig.loop.tick()
        rig.clock.advance(rig.loop.tick()[0])
    assert rig.health.healthz().ok, "two failures are under the threshold of three"
    rig.loop.tick()
    verdict = rig.health.healthz()
    assert not verdict.ok and "3 map writes in a row failed" in verdict.reasons[0]
    assert rig.health.readyz().ok, "readiness stays: the first sync was written and programs serve"
    rig.clock.advance(rig.loop.tick()[0])
    rig.loop.tick()
    assert rig.health.healthz().ok


def test_health_fails_when_a_change_waits_longer_than_the_threshold():
    rig = Rig()
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    rig.datapath.fail_next = 1
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.loop.tick()
    rig.clock.advance(31)
    verdict = rig.health.healthz()
    assert not verdict.ok and "waited 31.0s" in verdict.reasons[0]
    rig.loop.tick()  # the retry succeeds
    assert rig.health.healthz().ok


def test_waiting_for_the_first_list_is_not_unhealthy():
    rig = Rig()
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.clock.advance(3600)
    assert rig.health.healthz().ok
    assert not rig.health.readyz().ok


def _status(name: str, accepted: str) -> RouteStatus:
    cond = Condition("Accepted", accepted, "Accepted" if accepted == "True" else "NoMatchingParent", "", 1)
    resolved = Condition("ResolvedRefs", "True", "ResolvedRefs", "", 1)
    parent = ParentStatus((("group", ""), ("kind", "Service"), ("name", "echo")), (cond, resolved))
    return RouteStatus(RouteId("HTTPRoute", "mesh", name), 1, (parent,))


def test_last_transition_time_changes_only_when_the_status_changes():
    now = [1_700_000_000.0]
    board = RouteStatusBoard(clock=lambda: now[0])
    board.publish({RouteId("HTTPRoute", "mesh", "r"): _status("r", "True")})
    first = board.as_json()[0]["parents"][0]["conditions"]
    now[0] += 60
    board.publish({RouteId("HTTPRoute", "mesh", "r"): _status("r", "True")})
    assert board.as_json()[0]["parents"][0]["conditions"] == first
    now[0] += 60
    board.publish({RouteId("HTTPRoute", "mesh", "r"): _status("r", "False")})
    accepted, resolved = board.as_json()[0]["parents"][0]["conditions"]
    assert accepted["lastTransitionTime"] != first[0]["lastTransitionTime"]
    assert resolved["lastTransitionTime"] == first[1]["lastTransitionTime"]


def _get(address, path):
    host, port = address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def served():
    rig = Rig()
    board = RouteStatusBoard()
    listener = Listener(("127.0.0.1", 0), rig.health, rig.metrics, board)
    listener.start()
    try:
        yield rig, board, listener.address
    finally:
        listener.stop()


def test_endpoints_follow_the_agent(served):
    rig, board, address = served
    code, body = _get(address, "/readyz")
    assert code == 503 and "waiting for the first list" in body
    assert _get(address, "/healthz")[0] == 200
    rig.sync_all()
    rig.store.replace("manifests", [service("a", "10.96.0.1")])
    rig.loop.tick()
    assert _get(address, "/readyz")[0] == 200
    code, text = _get(address, "/metrics")
    assert code == 200
    assert "meshlet_sync_duration_seconds_bucket" in text and 'meshlet_objects{kind="Service"} 1.0' in text
    board.publish({RouteId("HTTPRoute", "mesh", "r"): _status("r", "True")})
    code, body = _get(address, "/status/routes")
    (route,) = json.loads(body)
    assert code == 200 and route["name"] == "r" and route["parents"][0]["controllerName"] == "meshlet.io/mesh"
    assert route["parents"][0]["conditions"][0]["lastTransitionTime"].endswith("Z")
    assert _get(address, "/nope")[0] == 404


def test_status_pods_serves_what_the_loop_published():
    rig = Rig()
    pods = PodBoard()
    listener = Listener(("127.0.0.1", 0), rig.health, rig.metrics, RouteStatusBoard(), pods)
    listener.start()
    try:
        assert json.loads(_get(listener.address, "/status/pods")[1]) == []
        pods.publish([{"namespace": "web", "name": "web-1", "uid": "u1", "cgroup_id": 77}])
        code, body = _get(listener.address, "/status/pods")
        assert code == 200 and json.loads(body) == [{"namespace": "web", "name": "web-1", "uid": "u1", "cgroup_id": 77}]
    finally:
        listener.stop()


def test_metrics_have_no_per_object_labels(served):
    rig, _, address = served
    rig.sync_all()
    rig.store.replace("manifests", [service(f"s{i}", f"10.96.0.{i}") for i in range(5)])
    rig.loop.tick()
    allowed = {"kind", "mode", "outcome", "map", "op", "reason", "source", "le", "event"}
    build_labels = {"version", "revision", "kernel", "layout_version"}  # one series, meshlet_build_info
    for family in rig.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "meshlet_build_info":
                assert set(sample.labels) == build_labels and sample.value == 1
                continue
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
            values = [v for k, v in sample.labels.items() if k != "le"]
            assert not any(v.startswith("10.") or v.startswith("mesh") or v.startswith("s") and v[1:].isdigit()
                           for v in values), (sample.name, sample.labels)


def test_a_busy_port_is_a_user_error(served):
    rig, board, address = served
    with pytest.raises(UserError, match="cannot listen on 127.0.0.1:.*--listen"):
        Listener(address, rig.health, rig.metrics, board)
