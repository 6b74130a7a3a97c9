"""The store: ownership by source, coalescing, sync tracking, the oldest unapplied change."""

from runtime_fakes import FakeClock, service

from agent.runtime.store import Store
from agent.sources import POD_CGROUPS


def names(objs):
    return sorted(o["metadata"]["name"] for o in objs)


def test_replace_deletes_what_the_source_no_longer_lists():
    store = Store()
    store.replace("manifests", [service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    assert names(store.take().upserts) == ["a", "b"]
    store.replace("manifests", [service("b", "10.96.0.2")])
    batch = store.take()
    assert batch.upserts == [] and names(batch.deletes) == ["a"]


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


def test_changes_coalesce_to_the_last_state_and_cancel_out():
    clock = FakeClock()
    store = Store(clock=clock)
    store.upsert(service("a", "10.96.0.1"))
    store.upsert(service("a", "10.96.0.2"))
    batch = store.take()
    assert [o["spec"]["clusterIP"] for o in batch.upserts] == ["10.96.0.2"]
    store.applied()
    # a change and its undo before the next take: nothing to do, nothing unapplied
    store.upsert(service("a", "10.96.0.3"))
    assert store.has_pending()
    store.upsert(service("a", "10.96.0.2"))
    assert not store.has_pending() and store.unapplied_since() is None
    assert not store.take()
    # created and deleted between two takes: never reaches the resolver
    store.upsert(service("b", "10.96.0.4"))
    store.delete(service("b", "10.96.0.4"))
    assert not store.take()


def test_identical_upsert_is_not_a_change():
    store = Store()
    store.upsert(service("a", "10.96.0.1"))
    store.take()
    store.upsert(service("a", "10.96.0.1"))
    assert not store.has_pending()


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
