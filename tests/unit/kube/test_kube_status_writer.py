"""Route status (SEMANTICS B14): the merge rules, and the writer against the stand-in API server.

What a user checks with `kubectl get httproute -o yaml`: other controllers' entries untouched, one
entry of ours per Service parentRef, ours for vanished parentRefs removed, lastTransitionTime
moving only when a condition's status changes; and the writer survives conflicting writers.
"""

from __future__ import annotations

import copy

import pytest

from agent.errors import TransientError
from agent.model import CONTROLLER_NAME, Condition, ParentStatus, RouteId, RouteStatus
from agent.runtime.status_writer import StatusWriter, merge_parents
from standin_apiserver import make

T0 = "2024-01-01T00:00:00Z"
T1 = "2024-06-01T12:00:00Z"

SVC_A = {"group": "", "kind": "Service", "name": "a", "port": 80}
SVC_B = {"group": "", "kind": "Service", "name": "b"}
GATEWAY = {"name": "edge", "sectionName": "https"}


def parent(ref: dict, accepted: str = "True", resolved: str = "True", generation: int = 1) -> ParentStatus:
    return ParentStatus(
        parent_ref=tuple(sorted(ref.items())),
        conditions=(
            Condition("Accepted", accepted, "Accepted" if accepted == "True" else "NoMatchingParent", "", generation),
            Condition("ResolvedRefs", resolved, "ResolvedRefs" if resolved == "True" else "BackendNotFound",
                      "" if resolved == "True" else "backendRef default/missing: no such Service", generation),
        ),
    )


def route_status(*parents: ParentStatus, name="split", generation=1) -> RouteStatus:
    return RouteStatus(RouteId("HTTPRoute", "default", name), generation, tuple(parents))


def theirs(ref: dict) -> dict:
    return {"parentRef": ref, "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                            "observedGeneration": 1, "lastTransitionTime": T0}]}


def ours_conditions(entry: dict) -> dict:
    return {c["type"]: (c["status"], c["lastTransitionTime"]) for c in entry["conditions"]}


# --- merge rules (pure) -------------------------------------------------------------------------


def test_merge_adds_ours_after_other_controllers_entries_untouched():
    existing = [theirs(GATEWAY)]
    merged = merge_parents(copy.deepcopy(existing), route_status(parent(SVC_A)), T1)
    assert merged[0] == existing[0]
    assert len(merged) == 2
    ours = merged[1]
    assert ours["controllerName"] == CONTROLLER_NAME
    assert ours["parentRef"] == SVC_A  # verbatim
    assert ours_conditions(ours) == {"Accepted": ("True", T1), "ResolvedRefs": ("True", T1)}
    assert all(c["observedGeneration"] == 1 for c in ours["conditions"])


def test_merge_keeps_last_transition_time_while_the_status_holds():
    first = merge_parents([], route_status(parent(SVC_A, generation=1)), T0)
    # generation 2: same statuses, so the times stay; ResolvedRefs flips later and moves.
    second = merge_parents(first, route_status(parent(SVC_A, generation=2), generation=2), T1)
    assert ours_conditions(second[0]) == {"Accepted": ("True", T0), "ResolvedRefs": ("True", T0)}
    assert {c["observedGeneration"] for c in second[0]["conditions"]} == {2}
    third = merge_parents(second, route_status(parent(SVC_A, resolved="False")), T1)
    assert ours_conditions(third[0]) == {"Accepted": ("True", T0), "ResolvedRefs": ("False", T1)}
    assert third[0]["conditions"][1]["reason"] == "BackendNotFound"


def test_merge_removes_ours_for_vanished_parents_and_never_theirs():
    existing = merge_parents([theirs(GATEWAY)], route_status(parent(SVC_A), parent(SVC_B)), T0)
    existing.insert(1, theirs(SVC_A))  # another mesh controller on the same Service
    merged = merge_parents(existing, route_status(parent(SVC_B)), T1)
    assert merged == [existing[0], existing[1], existing[3]]  # ours for SVC_A removed, in place
    assert merge_parents(merged, route_status(), T1) == [existing[0], existing[1]]


def test_merge_matches_a_parent_ref_whatever_defaults_it_spells_out():
    written = merge_parents([], route_status(parent(SVC_B)), T0)
    written[0]["parentRef"] = {**SVC_B, "namespace": "default"}  # as another tool may have stored it
    merged = merge_parents(written, route_status(parent(SVC_B)), T1)
    assert len(merged) == 1 and ours_conditions(merged[0])["Accepted"] == ("True", T0)


# --- the writer against the stand-in API server -------------------------------------------------


@pytest.fixture
def route(apiserver):
    apiserver.serve_crd("HTTPRoute", ("v1",))
    apiserver.create(make("HTTPRoute", "default", "split", spec={"parentRefs": [GATEWAY, SVC_A, SVC_B]}))
    apiserver.update_status("HTTPRoute", "default", "split", {"parents": [theirs(GATEWAY)], "extra": "kept"})
    return ("HTTPRoute", "default", "split")


def status_puts(apiserver) -> list:
    return [r for r in apiserver.requests if r.method == "PUT" and r.path.endswith("/status")]


def test_writer_writes_ours_through_the_status_subresource(apiserver, api_client, route):
    writer = StatusWriter(api_client)
    status = route_status(parent(SVC_A), parent(SVC_B, resolved="False"))
    writer.write({status.route: status})

    obj = apiserver.get(*route)
    parents = obj["status"]["parents"]
    assert parents[0] == theirs(GATEWAY)
    assert [p["parentRef"] for p in parents[1:]] == [SVC_A, SVC_B]
    assert all(p["controllerName"] == CONTROLLER_NAME for p in parents[1:])
    assert obj["status"]["extra"] == "kept"  # fields we do not know survive the read-modify-write
    assert obj["metadata"]["generation"] == 1  # a status write is no spec change
    assert len(status_puts(apiserver)) == 1
    assert status_puts(apiserver)[0].path == "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/split/status"


def test_writer_skips_what_did_not_change(apiserver, api_client, route):
    writer = StatusWriter(api_client)
    status = route_status(parent(SVC_A))
    writer.write({status.route: status})
    version = apiserver.get(*route)["metadata"]["resourceVersion"]
    writer.write({status.route: status})  # known to stand: not even read
    writer.forget()
    writer.write({status.route: status})  # read again: equal after the merge, so no write
    assert len(status_puts(apiserver)) == 1
    assert apiserver.get(*route)["metadata"]["resourceVersion"] == version


def test_writer_retries_a_conflict_on_what_is_there_now(apiserver, api_client, route):
    other_entry = theirs({"name": "other-gateway"})
    conflicts = []

    def another_controller_writes_first(method, path, query, body):
        if method == "PUT" and path.endswith("/httproutes/split/status") and not conflicts:
            conflicts.append(path)
            current = apiserver.get(*route)["status"]
            apiserver.update_status(*route, {**current, "parents": current["parents"] + [other_entry]})
        return None

    apiserver.add_hook(another_controller_writes_first)
    writer = StatusWriter(api_client)
    status = route_status(parent(SVC_A))
    writer.write({status.route: status})

    parents = apiserver.get(*route)["status"]["parents"]
    assert conflicts and len(status_puts(apiserver)) == 2  # the first PUT got 409 Conflict
    assert parents[:2] == [theirs(GATEWAY), other_entry]
    assert [p["controllerName"] for p in parents[2:]] == [CONTROLLER_NAME]


def test_writer_removes_ours_when_a_route_is_no_longer_reported(apiserver, api_client, route):
    writer = StatusWriter(api_client)
    status = route_status(parent(SVC_A))
    writer.write({status.route: status})
    writer.write({})
    assert apiserver.get(*route)["status"]["parents"] == [theirs(GATEWAY)]


def test_writer_waits_for_the_status_of_the_current_generation(apiserver, api_client, route):
    apiserver.update(make("HTTPRoute", "default", "split", spec={"parentRefs": [SVC_A]}))  # generation 2
    writer = StatusWriter(api_client)
    old = route_status(parent(SVC_A), parent(SVC_B), generation=1)
    writer.write({old.route: old})
    assert status_puts(apiserver) == []
    new = route_status(parent(SVC_A, generation=2), generation=2)
    writer.write({new.route: new})
    assert len(status_puts(apiserver)) == 1


def test_writer_tries_every_route_then_reports_failures(apiserver, api_client, route):
    apiserver.create(make("HTTPRoute", "default", "other", spec={"parentRefs": [SVC_A]}))

    def broken_for_split(method, path, query, body):
        if method == "PUT" and "/httproutes/split/" in path:
            return 500, {"kind": "Status", "code": 500, "message": "stand-in: etcd is unhappy"}
        return None

    apiserver.add_hook(broken_for_split)
    writer = StatusWriter(api_client)
    split, other = route_status(parent(SVC_A)), route_status(parent(SVC_A), name="other")
    with pytest.raises(TransientError):
        writer.write({split.route: split, other.route: other})
    assert apiserver.get("HTTPRoute", "default", "other")["status"]["parents"][0]["controllerName"] == CONTROLLER_NAME

    apiserver.remove_hook(broken_for_split)
    writer.write({split.route: split, other.route: other})  # the failed one is tried again
    assert apiserver.get(*route)["status"]["parents"][-1]["controllerName"] == CONTROLLER_NAME


def test_writer_ignores_routes_that_do_not_exist(apiserver, api_client):
    writer = StatusWriter(api_client)
    status = route_status(parent(SVC_A))
    writer.write({status.route: status})  # no CRD at all
    apiserver.serve_crd("HTTPRoute", ("v1",))
    writer.forget()
    writer.write({status.route: status})  # CRD, but no such Route
    assert status_puts(apiserver) == []
