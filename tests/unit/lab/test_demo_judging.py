"""The demo's verdicts: expected shares against observed counts, with the stated tolerance."""

import os
import shutil

import yaml

from agent.lab.demo import (BEFORE_EDIT, NEW_WEIGHTS, PRODUCER_ROUTE_FILE, Probe, edit_producer_route,
                            judge, tolerance)
from agent.lab.manifests import backing_services, default_manifests_dir, pod_specs, read_objects

OBJECTS = read_objects(default_manifests_dir())
BACKS = backing_services(OBJECTS)
POD_REFS = {spec.name: f"{spec.namespace}/{spec.name}" for spec in pod_specs(OBJECTS)}
SPLIT = BEFORE_EDIT[0]  # batch -> checkout, 80/20
AFFINITY = BEFORE_EDIT[2]


def answer(peers, errors=None):
    return {"peers": peers, "errors": errors or {}, "getpeername": [], "reply_from": []}


def test_tolerance_is_binomial_and_exact_at_the_ends():
    assert tolerance(0.0, 100) == 0.0 and tolerance(1.0, 100) == 0.0
    assert abs(tolerance(0.5, 100) - 4.5 * 0.05) < 1e-9


def test_a_split_near_80_20_passes_and_counts_pods_by_backend_service():
    rows = judge(SPLIT, answer({"checkout-v1-a": 85, "checkout-v1-b": 77, "checkout-v2-b": 38}), 200,
                 BACKS, POD_REFS)
    assert [(r.bucket, r.count, r.ok) for r in rows] == [
        ("shop/checkout-v1", 162, True), ("shop/checkout-v2", 38, True)]


def test_a_50_50_split_fails_the_80_20_expectation():
    rows = judge(SPLIT, answer({"checkout-v1-a": 50, "checkout-v2-a": 50}), 100, BACKS, POD_REFS)
    assert not all(r.ok for r in rows)


def test_errors_and_strangers_fail_the_check():
    rows = judge(SPLIT, answer({"checkout-v1-a": 80, "cart-a": 1}, {"ECONNREFUSED": 19}), 100,
                 BACKS, POD_REFS)
    failing = {r.bucket for r in rows if not r.ok}
    assert "shop/cart-a (not a backend)" in failing and "error ECONNREFUSED" in failing


def test_affinity_needs_one_pod_of_the_service_for_every_connection():
    assert all(r.ok for r in judge(AFFINITY, answer({"cart-b": 40}), 40, BACKS, POD_REFS))
    assert not all(r.ok for r in judge(AFFINITY, answer({"cart-b": 39, "cart-c": 1}), 40, BACKS, POD_REFS))
    assert not all(r.ok for r in judge(AFFINITY, answer({"stats-a": 40}), 40, BACKS, POD_REFS))
    assert not judge(AFFINITY, answer({}, {"ETIMEDOUT": 40}), 40, BACKS, POD_REFS)[0].ok


def test_consumer_override_must_be_exact():
    probe = Probe("web/web-client", "shop/checkout", 80, "tcp", "", {"shop/checkout-v1": 0.0,
                                                                     "shop/checkout-v2": 1.0})
    assert all(r.ok for r in judge(probe, answer({"checkout-v2-a": 99, "checkout-v2-b": 101}), 200,
                                   BACKS, POD_REFS))
    assert not all(r.ok for r in judge(probe, answer({"checkout-v2-a": 199, "checkout-v1-a": 1}), 200,
                                       BACKS, POD_REFS))


def test_the_live_edit_changes_only_the_weights(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(default_manifests_dir(), copy)
    edit_producer_route(str(copy), NEW_WEIGHTS)
    with open(os.path.join(copy, PRODUCER_ROUTE_FILE)) as f:
        route = yaml.safe_load(f)
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert [(r["name"], r["weight"]) for r in refs] == [("checkout-v1", 50), ("checkout-v2", 50)]
    assert route["spec"]["parentRefs"][0]["name"] == "checkout"


def test_refusals_can_be_what_is_expected():
    probe = Probe("batch/batch-client", "shop/legacy", 80, "tcp", "", {"error ECONNREFUSED": 1.0}, by="pod")
    assert all(r.ok for r in judge(probe, answer({}, {"ECONNREFUSED": 20}), 20, BACKS, POD_REFS))
    assert not all(r.ok for r in judge(probe, answer({"cart-a": 1}, {"ECONNREFUSED": 19}), 20,
                                       BACKS, POD_REFS))
