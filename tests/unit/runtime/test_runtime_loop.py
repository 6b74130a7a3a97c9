"""The sync loop: no write before sync, full then incremental, coalescing, rate limit, retries."""

import gc
import threading

import pytest

from runtime_fakes import Rig, service

from agent.model import FrontendKey


def test_nothing_is_written_until_every_source_has_synced(rig):
    rig.store.replace("manifests", [service("a", "10.96.0.1")])
    rig.loop.begin()
    for _ in range(3):
        delay, for_changes = rig.loop.tick()
        assert for_changes
        rig.clock.advance(delay)
    rig.store.synced("manifests")
    rig.loop.tick()
    assert rig.datapath.calls == [] and not rig.resolver.state.frontends and rig.statuses == []
    rig.store.pod_cgroups({"uid-1": 4242})
    rig.loop.tick()
    (write,) = rig.datapath.writes()
    _, mode, state, pod_cgroups, _ = write
    assert mode == "full"
    assert FrontendKey("10.96.0.1", 80, "TCP") in state.frontends
    assert pod_cgroups == {"uid-1": 4242}
    assert len(rig.statuses) == 1, "statuses are published once everything is listed"


def test_new_maps_attach_after_the_first_full_write():
    rig = Rig(adopted=False)
    rig.loop.begin()
    assert rig.datapath.calls == []
    rig.sync_all()
    rig.loop.tick()
    assert [c[0] for c in rig.datapath.calls] == ["reconcile", "attach"]
    assert rig.health.readyz().ok


def test_adopted_maps_attach_at_once_and_wait_for_sync_to_write():
    rig = Rig(adopted=True)
    rig.loop.begin()
    assert rig.datapath.calls == [("attach",)]
    assert not rig.health.readyz().ok, "attached but the first sync is not written"
    rig.loop.tick()
    assert rig.datapath.writes() == []
    rig.sync_all()
    rig.loop.tick()
    assert [c[1] for c in rig.datapath.writes()] == ["full"]
    assert rig.health.readyz().ok


def test_after_the_first_write_changes_go_as_deltas_and_coalesce(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    for i in range(20):  # a burst
        rig.store.upsert(service(f"s{i}", f"10.96.1.{i}"))
    rig.loop.tick()
    writes = rig.datapath.writes()
    assert [w[1] for w in writes] == ["full", "delta"]
    delta = writes[1][4]
    assert len(delta.frontends) == 20


def test_rate_limit_holds_a_second_change_until_the_interval_passed(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.loop.tick()
    assert len(rig.datapath.writes()) == 2
    rig.clock.advance(0.01)
    rig.store.upsert(service("b", "10.96.0.2"))
    delay, for_changes = rig.loop.tick()
    assert len(rig.datapath.writes()) == 2, "a sync started less than min_sync_interval ago"
    assert not for_changes and abs(delay - 0.07) < 1e-6
    rig.clock.advance(0.03)
    rig.store.upsert(service("c", "10.96.0.3"))
    rig.loop.tick()
    assert len(rig.datapath.writes()) == 2
    rig.clock.advance(0.041)
    rig.loop.tick()
    writes = rig.datapath.writes()
    assert len(writes) == 3, "b and c coalesce into one sync"
    assert {k.address for k in writes[2][4].frontends} == {"10.96.0.2", "10.96.0.3"}


def run_for(rig, seconds):
    """Drive the loop as run() does, the clock jumping over each wait it asks for."""
    end = rig.clock.now + seconds
    while rig.clock.now < end:
        delay, _ = rig.loop.tick()
        rig.clock.advance(min(delay, end - rig.clock.now))


def test_idle_loop_writes_nothing_and_checks_the_maps_a_step_at_a_time_over_the_period(rig):
    rig.sync_all()
    rig.loop.tick()
    start = rig.clock.now
    run_for(rig, 150)
    assert [w[1] for w in rig.datapath.writes()] == ["full"], "no periodic full reconcile any more"
    # The stand-in check's cycle is 10 steps of a tenth of its work each: one step every 6 s,
    # a cycle per 60 s period.
    times = [round(t - start, 6) for t in rig.datapath.check_times]
    assert times[:21] == [6.0 * i for i in range(21)]
    assert rig.metric("meshlet_map_check_cycles_total") == 2
    assert rig.metric("meshlet_map_check_step_seconds_count") == len(times)


def test_a_pending_change_goes_before_a_due_check_step(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.loop.tick()  # the first step is due at once
    assert len(rig.datapath.check_times) == 1
    rig.clock.advance(6)
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.loop.tick()
    assert rig.datapath.writes()[-1][1] == "delta" and len(rig.datapath.check_times) == 1
    rig.loop.tick()
    assert len(rig.datapath.check_times) == 2, "then the step that was due"


def test_a_loop_kept_busy_catches_up_on_the_check_when_changes_stop(rig):
    rig.sync_all()
    rig.loop.tick()
    for i in range(30):  # a change every second for 30 s: nothing else runs while one is pending
        rig.store.upsert(service(f"s{i}", f"10.96.1.{i + 1}"))
        rig.loop.tick()
        rig.clock.advance(1)
    assert rig.datapath.check_times == [], "no step while a change was pending"
    run_for(rig, 0.5)
    # 30 s behind at one step per 6 s: the 5 steps due and the one due now, back to back.
    assert len(rig.datapath.check_times) == 6 and len(set(rig.datapath.check_times)) == 1


def test_drift_the_check_finds_is_logged_counted_and_repaired_by_a_full_reconcile(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.datapath.drift_next = {"frontends": 2, "endpoints": 1}
    rig.loop.tick()  # the check step that finds it
    assert rig.metric("meshlet_map_drift_total", map="frontends") == 2
    assert rig.metric("meshlet_map_drift_total", map="endpoints") == 1
    rig.clock.advance(1)
    rig.loop.tick()
    assert [w[1] for w in rig.datapath.writes()] == ["full", "full"]
    rig.datapath.fail_check = 1  # a check that cannot read the maps: the same repair
    rig.loop.tick()
    rig.clock.advance(1)
    rig.loop.tick()
    assert [w[1] for w in rig.datapath.writes()] == ["full", "full", "full"]


def test_failed_write_is_retried_with_capped_backoff_as_a_full_reconcile(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    rig.datapath.fail_next = 6
    rig.store.upsert(service("a", "10.96.0.1"))
    delays = []
    for _ in range(6):
        rig.loop.tick()
        delay, for_changes = rig.loop.tick()  # nothing happens before the backoff ends
        assert not for_changes
        delays.append(round(delay, 6))
        rig.clock.advance(delay)
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert [c[:2] for c in rig.datapath.calls[2:]] == [("failed", "delta")] + [("failed", "full")] * 5
    assert "map frontends is full" in rig.health.healthz().reasons[0]
    rig.loop.tick()
    assert rig.datapath.calls[-1][:2] == ("reconcile", "full")
    assert FrontendKey("10.96.0.1", 80, "TCP") in rig.datapath.calls[-1][2].frontends
    assert rig.metric("meshlet_write_failures_total") == 6
    assert rig.metric("meshlet_map_failures_total", map="frontends", reason="full") == 6
    assert rig.loop.failures == 0


def test_a_resolver_exception_is_a_failed_sync_not_a_crash(rig, monkeypatch):
    rig.sync_all()
    commit = rig.resolver.commit

    def fail_once():
        monkeypatch.setattr(rig.resolver, "commit", commit)
        raise RuntimeError("a resolve bug (stand-in)")

    monkeypatch.setattr(rig.resolver, "commit", fail_once)
    rig.loop.tick()
    assert rig.loop.failures == 1 and rig.datapath.writes() == []
    rig.clock.advance(0.2)
    rig.loop.tick()
    assert [w[1] for w in rig.datapath.writes()] == ["full"]


def test_a_pod_cgroup_change_alone_is_written_with_the_pod_in_the_delta(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    rig.store.pod_cgroups({"uid-1": 77})
    rig.loop.tick()
    _, mode, _, pod_cgroups, delta = rig.datapath.writes()[-1]
    assert mode == "delta" and pod_cgroups == {"uid-1": 77} and delta.clients == {"uid-1"}


def test_each_written_sync_publishes_the_pods_with_a_cgroup_for_status_pods(rig):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "web", "uid": "uid-1"},
           "spec": {"nodeName": "node-1"}, "status": {"podIPs": [{"ip": "10.244.0.5"}]}}
    rig.store.upsert(pod)
    rig.sync_all()
    rig.loop.tick()
    assert rig.pods[-1] == []  # the pod has no cgroup here yet
    rig.clock.advance(1)
    rig.store.pod_cgroups({"uid-1": 77})
    rig.loop.tick()
    assert rig.pods[-1] == [{"namespace": "web", "name": "web-1", "uid": "uid-1", "cgroup_id": 77}]


def test_event_to_map_is_one_observation_per_changed_object_and_stats_are_recorded(rig):
    rig.store.replace("manifests", [service("b", "10.96.0.2")])
    rig.clock.advance(0.25)
    rig.sync_all()
    rig.loop.tick()
    assert rig.metric("meshlet_event_to_map_seconds_count") == 0, "the start-up list is not an event"
    rig.clock.advance(5)
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.clock.advance(0.125)
    rig.store.upsert(service("c", "10.96.0.3"))
    rig.store.upsert(service("c", "10.96.0.4"))  # coalesced with c's first change
    rig.clock.advance(0.1875)
    rig.loop.tick()
    assert rig.metric("meshlet_event_to_map_seconds_count") == 2, "one per object: a and c"
    assert rig.metric("meshlet_event_to_map_seconds_bucket", le="0.1") == 0
    assert rig.metric("meshlet_event_to_map_seconds_bucket", le="0.2") == 1  # c: 0.1875 s
    assert rig.metric("meshlet_event_to_map_seconds_bucket", le="0.3") == 1
    assert rig.metric("meshlet_event_to_map_seconds_bucket", le="0.5") == 2  # a: 0.3125 s
    assert rig.metric("meshlet_event_to_map_seconds_sum") == 0.5
    assert rig.metric("meshlet_frontends_programmed") == 3
    assert rig.metric("meshlet_objects", kind="Service") == 3
    assert rig.metric("meshlet_datapath_connections_total", outcome="translated") == 7
    assert rig.metric("meshlet_passive_health_events_total", event="ejections") == 2
    assert rig.metric("meshlet_passive_health_ejected_endpoints") == 1
    assert rig.metric("meshlet_map_fill_ratio", map="frontends") == 0.25
    assert rig.metric("meshlet_syncs_total", mode="incremental", outcome="ok") == 1
    assert rig.metric("meshlet_source_synced", source="manifests") == 1


def test_event_to_map_of_a_failed_write_runs_until_the_retry_applies_it(rig):
    rig.sync_all()
    rig.loop.tick()
    rig.clock.advance(1)
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.store.pod_cgroups({"uid-1": 5})
    rig.datapath.fail_next = 1
    rig.clock.advance(0.0625)
    rig.loop.tick()
    assert rig.metric("meshlet_event_to_map_seconds_count") == 0, "not applied yet"
    rig.clock.advance(0.25)  # past the backoff (0.2 s)
    rig.loop.tick()
    assert rig.datapath.writes()[-1][1] == "full"
    assert rig.metric("meshlet_event_to_map_seconds_count") == 2, "the Service and the pod's cgroup"
    assert rig.metric("meshlet_event_to_map_seconds_sum") == 2 * 0.3125


def test_objects_are_resolved_while_sources_list_but_nothing_is_written_before_all_synced(rig):
    rig.loop.begin()
    rig.store.list_begin("manifests")
    rig.store.list_page("manifests", [service("a", "10.96.0.1")])
    rig.loop.tick()
    assert not rig.store.has_pending(), "the first page went to the resolver while the list goes on"
    rig.store.list_page("manifests", [service("b", "10.96.0.2")])
    rig.loop.tick()
    assert not rig.store.has_pending()
    rig.store.list_end("manifests")
    rig.store.synced("manifests")
    rig.loop.tick()
    assert rig.datapath.calls == [], "pod cgroups have not synced: nothing is written"
    assert not rig.resolver.state.frontends and rig.statuses == [], "nothing committed or published"
    rig.store.pod_cgroups({})
    rig.loop.tick()
    (write,) = rig.datapath.writes()
    _, mode, state, _, _ = write
    assert mode == "full"
    assert {k.address for k in state.frontends} == {"10.96.0.1", "10.96.0.2"}, \
        "the first write holds what the resolver took while the sources listed"
    assert rig.health.readyz().ok


@pytest.mark.parametrize("adopted", [False, True])
def test_a_datapath_handed_over_later_gets_what_was_fed_while_it_opened(adopted):
    """The runtime starts the loop and the sources before the programs are compiled: the lists
    go to the resolver meanwhile, nothing is written (nor attached) before the datapath arrives,
    and then the first write is full and holds everything listed."""
    rig = Rig(adopted=adopted)
    datapath, rig.loop.datapath = rig.loop.datapath, None
    rig.loop.begin()
    rig.store.list_begin("manifests")
    rig.store.list_page("manifests", [service("a", "10.96.0.1")])
    rig.store.list_end("manifests")
    rig.sync_all()
    rig.loop.tick()
    assert not rig.store.has_pending(), "the list went to the resolver while the datapath opened"
    assert rig.store.waiting_for() == [] and not rig.health.readyz().ok
    assert datapath.calls == [] and rig.statuses == [], "nothing written, attached or published"
    swept = []
    rig.loop.datapath_opened(datapath, stale_sockets=lambda state: swept.append(state) or {})
    rig.loop.tick()
    assert [c[0] for c in datapath.calls] == (["attach", "reconcile"] if adopted else ["reconcile", "attach"])
    (write,) = datapath.writes()
    assert write[1] == "full" and {k.address for k in write[2].frontends} == {"10.96.0.1"}
    assert swept, "the stale-socket sweeper handed over with the datapath runs after the write"
    assert rig.health.readyz().ok


def test_a_delete_while_listing_reaches_the_resolver_too(rig):
    rig.store.upsert(service("gone", "10.96.0.9"))
    rig.loop.tick()
    assert not rig.store.has_pending()
    rig.store.delete(service("gone", "10.96.0.9"))
    rig.loop.tick()
    rig.sync_all()
    rig.loop.tick()
    (write,) = rig.datapath.writes()
    assert write[2].frontends == {}


def test_run_stops_on_the_stop_event():
    rig = Rig()
    stop = threading.Event()
    thread = threading.Thread(target=rig.loop.run, args=(stop,))
    thread.start()
    stop.set()
    rig.store.poke()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_the_collector_pauses_through_start_up_and_the_first_write_freezes_what_it_built(rig):
    gc.enable()
    rig.loop.begin()
    rig.store.replace("manifests", [service("a", "10.96.0.1")])
    rig.loop.tick()
    assert not gc.isenabled(), "paused while the sources list"
    frozen_before = gc.get_freeze_count()
    rig.sync_all()
    rig.loop.tick()
    assert rig.datapath.writes()
    assert gc.isenabled(), "running again after the first write"
    assert gc.get_freeze_count() > frozen_before, "what the first sync built was frozen"


def test_a_loop_stopped_before_its_first_write_gives_the_collector_back():
    gc.enable()
    rig = Rig()
    stop = threading.Event()
    stop.set()
    rig.loop.run(stop)
    assert gc.isenabled() and rig.datapath.writes() == []


def test_stale_sockets_are_swept_after_each_write_that_changed_frontends_or_groups(rig):
    swept = []

    def sweep(state):
        swept.append(sorted(state.frontends))
        if len(swept) == 3:
            raise OSError(1, "a sweep that fails")
        return {}

    rig.loop.stale_sockets = sweep
    rig.sync_all()
    rig.loop.tick()
    assert len(swept) == 1, "the first (full) write is followed by a sweep"
    rig.clock.advance(1)
    rig.store.pod_cgroups({"uid-1": 77})  # only a client changed: no endpoint went away
    rig.loop.tick()
    assert len(swept) == 1
    rig.clock.advance(1)
    rig.store.upsert(service("a", "10.96.0.1"))
    rig.loop.tick()
    assert swept[-1] == [FrontendKey("10.96.0.1", 80, "TCP")], "swept against the state just written"
    rig.clock.advance(1)
    rig.store.upsert(service("b", "10.96.0.2"))
    rig.loop.tick()
    assert len(swept) == 3 and rig.loop.failures == 0, "a failed sweep never fails the sync"


def test_udp_repicks_and_terminated_sockets_have_their_own_metrics(rig):
    rig.metrics.datapath_outcomes.update({"translated": 7, "repicked": 2})
    rig.metrics.sockets_terminated.labels(protocol="udp", reason="endpoint_removed").inc()
    assert rig.metric("meshlet_udp_repicks_total") == 2
    assert rig.metric("meshlet_datapath_connections_total", outcome="translated") == 7
    assert rig.metric("meshlet_datapath_connections_total", outcome="repicked") is None, "not an outcome"
    assert rig.metric("meshlet_sockets_terminated_total", protocol="udp", reason="endpoint_removed") == 1
