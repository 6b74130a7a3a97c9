"""The store: ownership by source, paged (re)lists, coalescing, sync tracking, arrival times, and
that it lets go of every object once the loop has taken it."""

import gc
import weakref

from runtime_fakes import FakeClock, service

from agent.runtime.store import Store
from agent.sources import POD_CGROUPS


def names(objs):
    return sorted(o["metadata"]["name"] for o in objs)


def versioned(obj, resource_version):
    """The object as an API server serves it: with a resourceVersion."""
    obj["metadata"]["resourceVersion"] = str(resource_version)
    return obj


def test_replace_deletes_what_the_source_no_longer_lists():
    store = Store()
    store.replace("manifests", [service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    assert names(store.take().upserts) == ["a", "b"]
    store.replace("manifests", [service("b", "10.96.0.2")])
    batch = store.take()
    assert names(batch.upserts) == ["b"]  # no resourceVersion: the store cannot tell it is unchanged
    assert names(batch.deletes) == ["a"]


def test_a_relist_that_drops_an_object_deletes_it_and_skips_the_unchanged_ones():
    store = Store()
    store.replace("Service", [versioned(service("a", "10.96.0.1"), 7), versioned(service("b", "10.96.0.2"), 8)])
    store.take()
    store.list_begin("Service")
    store.list_page("Service", [versioned(service("b", "10.96.0.2"), 8)])  # same version: unchanged
    store.list_page("Service", [versioned(service("c", "10.96.0.3"), 9)])
    batch = store.take()
    assert names(batch.upserts) == ["c"] and batch.deletes == [], "nothing is deleted before the list ends"
    store.list_end("Service")
    batch = store.take()
    assert batch.upserts == [] and names(batch.deletes) == ["a"]
    assert store.counts() == {"Service": 2}


def test_a_page_by_page_first_list_reaches_the_loop_before_the_list_ends():
    clock = FakeClock(50.0)
    store = Store(expected_sources=["EndpointSlice"], clock=clock)
    store.list_begin("EndpointSlice")
    store.list_page("EndpointSlice", [versioned(service("a", "10.96.0.1"), 1)])
    assert names(store.take().upserts) == ["a"]
    clock.advance(1)
    store.list_page("EndpointSlice", [versioned(service("b", "10.96.0.2"), 2)])
    store.list_end("EndpointSlice")
    store.synced("EndpointSlice")
    batch = store.take()
    assert names(batch.upserts) == ["b"] and batch.deletes == [], "an earlier page is not deleted"
    assert store.all_synced()
    assert store.unapplied_since() == 50.0, "taken but not applied: still unapplied"


def test_a_list_begun_again_after_a_failure_deletes_only_what_the_complete_list_lacks():
    store = Store()
    store.replace("Service", [versioned(service("a", "10.96.0.1"), 1), versioned(service("b", "10.96.0.2"), 2)])
    store.take()
    store.list_begin("Service")
    store.list_page("Service", [versioned(service("a", "10.96.0.1"), 1)])
    # the connection dropped here: the source begins the list again
    store.list_begin("Service")
    store.list_page("Service", [versioned(service("b", "10.96.0.2"), 2)])
    store.list_end("Service")
    assert names(store.take().deletes) == ["a"]


def test_replace_of_one_source_leaves_the_other_sources_objects():
    store = Store()
    store.replace("Service", [service("a", "10.96.0.1")])
    store.upsert({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}})
    store.take()
    store.replace("Service", [])
    batch = store.take()
    assert names(batch.deletes) == ["a"]
    assert store.counts() == {"Namespace": 1}


def test_watch_upserts_belong_to_the_source_that_listed_the_kind():
    store = Store()
    store.replace("Service", [])
    store.upsert(service("a", "10.96.0.1"))
    store.take()
    store.replace("Service", [])  # a relist that no longer has "a"
    assert names(store.take().deletes) == ["a"]


def test_a_delete_hands_over_the_identity_only():
    store = Store()
    store.upsert({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "HTTPRoute",
                  "metadata": {"name": "r", "namespace": "mesh", "resourceVersion": "3"}, "spec": {"rules": []}})
    store.take()
    store.delete({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "HTTPRoute",
                  "metadata": {"name": "r", "namespace": "mesh"}})
    assert store.take().deletes == [{"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "HTTPRoute",
                                     "metadata": {"name": "r", "namespace": "mesh"}}]
    assert store.counts() == {}


def test_changes_coalesce_to_the_last_state_and_cancel_out():
    clock = FakeClock()
    store = Store(clock=clock)
    store.upsert(versioned(service("a", "10.96.0.1"), 10))
    store.upsert(versioned(service("a", "10.96.0.2"), 11))
    batch = store.take()
    assert [o["spec"]["clusterIP"] for o in batch.upserts] == ["10.96.0.2"]
    store.applied()
    # a change, then the version the loop was handed again (a relist from a lagging cache):
    # nothing to do, nothing unapplied
    store.upsert(versioned(service("a", "10.96.0.3"), 12))
    assert store.has_pending()
    store.upsert(versioned(service("a", "10.96.0.2"), 11))
    assert not store.has_pending() and store.unapplied_since() is None
    assert not store.take()
    # created and deleted between two takes: never reaches the resolver
    store.upsert(service("b", "10.96.0.4"))
    store.delete(service("b", "10.96.0.4"))
    assert not store.take()
    # deleted and created again between two takes: the newest object goes
    store.delete(service("a", "10.96.0.2"))
    store.upsert(versioned(service("a", "10.96.0.5"), 13))
    batch = store.take()
    assert batch.deletes == [] and [o["spec"]["clusterIP"] for o in batch.upserts] == ["10.96.0.5"]


def test_identical_version_is_not_a_change_but_an_object_without_one_always_is():
    store = Store()
    store.upsert(versioned(service("a", "10.96.0.1"), 5))
    store.take()
    store.upsert(versioned(service("a", "10.96.0.1"), 5))
    assert not store.has_pending()
    store.upsert(service("m", "10.96.0.9"))
    store.take()
    store.upsert(service("m", "10.96.0.9"))
    assert names(store.take().upserts) == ["m"], "without a version the resolver decides"


def test_unapplied_since_is_the_oldest_change_until_a_sync_applies_it():
    clock = FakeClock(100.0)
    store = Store(clock=clock)
    store.upsert(service("a", "10.96.0.1"))
    clock.advance(1)
    store.upsert(service("b", "10.96.0.2"))
    assert store.unapplied_since() == 100.0
    store.take()
    clock.advance(1)
    store.upsert(service("c", "10.96.0.3"))  # after the take: the next batch's
    assert store.unapplied_since() == 100.0  # taken, not yet applied (a write may fail)
    store.applied()
    assert store.unapplied_since() == 102.0
    store.take()
    store.applied()
    assert store.unapplied_since() is None


def test_each_change_carries_its_first_arrival_time():
    clock = FakeClock(10.0)
    store = Store(clock=clock)
    store.upsert(service("a", "10.96.0.1"))
    clock.advance(1)
    store.upsert(service("b", "10.96.0.2"))
    clock.advance(1)
    store.upsert(service("a", "10.96.0.3"))  # coalesced: a's change is still the one from 10.0
    store.pod_cgroups({"u1": 11, "u2": 12})
    batch = store.take()
    assert sorted(batch.arrivals) == [10.0, 11.0, 12.0, 12.0]  # a, b, and each pod whose cgroup changed


def test_the_store_keeps_no_object_once_taken():
    class Obj(dict):  # a dict that can be watched with a weak reference
        pass

    store = Store()
    obj = Obj(versioned(service("a", "10.96.0.1"), 3))
    watched = weakref.ref(obj)
    store.list_begin("Service")
    store.list_page("Service", [obj])
    store.list_end("Service")
    del obj
    batch = store.take()
    assert watched() is not None, "held until taken"
    del batch
    gc.collect()
    assert watched() is None, "the store kept the object after the loop took it"
    assert store.counts() == {"Service": 1}


def test_pod_cgroups_changes_name_the_pods():
    store = Store(expected_sources=[POD_CGROUPS])
    store.pod_cgroups({"u1": 11, "u2": 12})
    batch = store.take()
    assert batch.pod_cgroups == {"u1": 11, "u2": 12} and batch.pod_cgroups_changed == {"u1", "u2"}
    store.pod_cgroups({"u1": 11, "u2": 99, "u3": 13})
    store.pod_cgroups({"u1": 11, "u2": 99, "u3": 13})
    batch = store.take()
    assert batch.pod_cgroups_changed == {"u2", "u3"}
    store.pod_cgroups({"u1": 11, "u2": 99, "u3": 13})
    assert not store.has_pending()


def test_sync_tracking_and_wake():
    store = Store(expected_sources=["manifests"])
    store.expect(POD_CGROUPS)
    assert store.waiting_for() == ["manifests", POD_CGROUPS]
    store.synced("manifests")
    store.synced("manifests")
    assert store.waiting_for() == [POD_CGROUPS]
    assert store.wait(0.0)  # a source syncing wakes the loop even without a change
    assert not store.wait(0.0)
    store.pod_cgroups({})
    assert store.all_synced()
