"""The one sync loop: store -> resolve -> datapath, rate-limited, coalescing, never crashing.

Role: the only thread that calls the resolver and the datapath. Each sync takes every change the
store coalesced since the last one, feeds the resolver, commits, and has the datapath reconcile
the new desired state. Rules (SEMANTICS A15, D1, D2; DESIGN.md "One sync loop"):

- Nothing is written to the maps (nor committed in the resolver, nor published as Route status)
  until every expected source has finished its first list. Meanwhile each batch the sources
  deliver is fed to the resolver at once (upserts and deletes, no commit): the objects then leave
  the store as the resolver's compact records instead of piling up as JSON until the slowest
  source is done.
- The first write is a full reconcile (the datapath adopts what is pinned, writes the difference
  and sweeps what is stale); later writes are incremental, handing over the resolver's delta
  (plus the pods whose cgroup changed).
- Drift (a map changed behind our back) is found by the periodic check (agent/datapath/check.py):
  when no change is pending, the loop runs one bounded step of it (a part of one map compared
  with what the writer wrote, a few ms at 50k Services), paced so that every entry is compared
  once per `map_check_period`; a pending change always goes first. A difference found is
  logged, counted and repaired by a full reconcile on the next turn. (Before, a full reconcile
  ran every period on this thread: seconds at 50k Services, during which no change was written.)
- Programs: attached at start when the maps were adopted (new programs replace ours in place and
  serve the old state at once), else right after the first full write, so new programs never run
  against empty maps.
- The datapath may arrive after the loop started (`datapath_opened`): compiling the programs
  takes seconds, and the runtime starts the loop and the sources first so that the start-up lists
  are read and fed to the resolver meanwhile. Until it arrives the loop only feeds the resolver,
  as while a source is still listing ("datapath" is then one of the things it waits for).
- Two syncs start at least `min_sync_interval` apart; changes arriving meanwhile wait and
  coalesce into the next one (the store keeps only the last state of each object).
- A failed sync is logged, counted, shown in health and retried after a capped exponential
  backoff, as a full reconcile (what reached the maps before the failure is then unknown).
  No exception from the resolver or the datapath ends the loop.
- Event-to-map latency: one observation per changed object (and per pod whose cgroup changed),
  from its arrival at the store to the end of the sync that applied it. What the first write
  applies is the start-up lists, not events: it is not observed (time to ready measures it).
- From `begin()` until the first full sync is written the garbage collector is paused (the
  start-up lists are large and acyclic); then the long-lived objects built so far (the
  resolver's view of the cluster) are frozen out of its generations and it runs again
  (agent.gcpause).

May touch: the resolver and the datapath (only from this thread), the store, health and metrics,
and the garbage collector's switch (through agent.gcpause).
Time comes from `clock`, so the tests drive it without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping, Protocol

from agent.gcpause import freeze_long_lived, pause_collector, release_free_heap, resume_collector
from agent.logs import get_logger
from agent.model import DesiredState, RouteId, RouteStatus, StateDelta
from agent.runtime.health import Health
from agent.runtime.metrics import Metrics
from agent.runtime.store import Batch, Store

log = get_logger("loop")


class Resolver(Protocol):
    """What the loop needs of agent.resolve.Resolver."""

    state: DesiredState
    statuses: Mapping[RouteId, RouteStatus]
    endpoint_count: int  #: endpoints over state.groups, kept by the resolver (not summed per sync)

    def upsert_many(self, objs: Iterable[dict]) -> None: ...

    def delete(self, obj: dict) -> None: ...

    def commit(self) -> StateDelta: ...


class Datapath(Protocol):
    """What the loop needs of agent.datapath.Datapath (already opened: maps adopted or made)."""

    adopted: bool

    def attach(self) -> None: ...

    def reconcile(self, state: DesiredState, pod_cgroups: Mapping[str, int], delta: StateDelta | None = None): ...

    def check(self):
        """One bounded step of the periodic check: a agent.datapath.CheckStep (work, cycle_work,
        cycle_done, drift)."""
        ...

    def counters(self) -> Mapping[str, int]: ...

    def fill(self) -> Mapping[str, tuple[int, int]]: ...


#: Longest idle wait: the loop wakes at least this often to notice a due resync or stats refresh.
IDLE_WAIT = 1.0


class SyncLoop:
    def __init__(self, store: Store, resolver: Resolver, datapath: Datapath | None, health: Health,
                 metrics: Metrics, *, min_sync_interval: float = 0.08, map_check_period: float = 60.0,
                 retry_initial: float = 0.2, retry_max: float = 10.0, stats_interval: float = 2.0,
                 on_statuses: Callable[[Mapping[RouteId, RouteStatus]], None] | None = None,
                 on_pods: Callable[[list[dict]], None] | None = None,
                 stale_sockets: Callable[[DesiredState], Mapping[tuple[str, str], int]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """stale_sockets: terminates the live sockets whose endpoint went away (SEMANTICS A16,
        agent/runtime/stale.py); called after each write that changed frontends or groups.
        datapath None: not open yet, handed over later by `datapath_opened`."""
        self.store = store
        self.resolver = resolver
        self.datapath = datapath
        self.health = health
        self.metrics = metrics
        self.min_sync_interval = min_sync_interval
        self.map_check_period = map_check_period
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stats_interval = stats_interval
        self.on_statuses = on_statuses
        #: called after each written sync with the pods on this node that have a cgroup:
        #: [{namespace, name, uid, cgroup_id}] (/status/pods, which `meshlet explain` reads)
        self.on_pods = on_pods
        self.stale_sockets = stale_sockets
        self.clock = clock

        self.attached = False
        self.first_sync_written = False
        self.failures = 0  #: consecutive failed syncs
        self._need_full = True
        self._last_sync_start: float | None = None
        #: when the next check step is due (None until the first write); paced from the start
        #: of its cycle, so that a loop kept busy by changes catches up when they stop
        self._check_at: float | None = None
        self._check_cycle_start = 0.0
        self._retry_at: float | None = None
        self._attach_at: float | None = None
        self._stats_at = 0.0
        self._logged_waiting: list[str] | None = None
        self._published_statuses = False
        self._problems_logged: set[str] = set()
        #: arrival times of the changes taken but not yet applied by a successful sync
        self._unapplied_arrivals: list[float] = []
        self._collector_was_enabled: bool | None = None  #: set while begin()'s pause holds
        #: (datapath, stale_sockets) handed over by another thread, taken by the next tick
        self._opened: tuple[Datapath, Callable | None] | None = None

    # --- driving ---------------------------------------------------------------------------

    def datapath_opened(self, datapath: Datapath,
                        stale_sockets: Callable[[DesiredState], Mapping[tuple[str, str], int]] | None = None
                        ) -> None:
        """Hand over the datapath of a loop built without one (from any thread); the loop takes
        it at its next tick (woken now), and attaches at once if the maps were adopted."""
        self._opened = (datapath, stale_sockets)
        self.store.poke()

    def _take_datapath(self) -> bool:
        """Take a handed-over datapath; True when the loop has one."""
        if self.datapath is None and self._opened is not None:
            self.datapath, stale_sockets = self._opened
            self.stale_sockets = stale_sockets if stale_sockets is not None else self.stale_sockets
            self._opened = None
            if self.datapath.adopted:
                self._attach()
        return self.datapath is not None

    def run(self, stop: threading.Event) -> None:
        """Sync until `stop` is set (the caller also pokes the store to wake us)."""
        self.begin()
        try:
            while not stop.is_set():
                delay, for_changes = self.tick()
                if stop.is_set():
                    break
                if for_changes:
                    self.store.wait(delay)
                else:
                    stop.wait(delay)  # rate limit or backoff: changes keep coalescing meanwhile
        finally:
            if self._collector_was_enabled is not None:  # stopped before the first write
                resume_collector(self._collector_was_enabled)
                self._collector_was_enabled = None

    def begin(self) -> None:
        """At start: adopted maps hold the last state, so our programs replace the running ones
        at once (in place, never detach-then-attach: D1); new maps wait for the first write.
        The collector pauses until the first write (agent.gcpause: the start-up lists)."""
        self._collector_was_enabled = pause_collector()
        if self.datapath is not None and self.datapath.adopted:
            self._attach()

    def tick(self) -> tuple[float, bool]:
        """Do what is due now. Returns (seconds to wait before the next tick, whether a new change
        should end that wait early: False while the rate limit or a backoff holds changes back)."""
        now = self.clock()
        has_datapath = self._take_datapath()
        if now >= self._stats_at and has_datapath:
            self._refresh_stats()
            self._stats_at = now + self.stats_interval
        waiting = self.store.waiting_for() + ([] if has_datapath else ["datapath"])
        if waiting != self._logged_waiting:
            for source, synced in self.store.sources().items():
                self.metrics.sources_synced.labels(source=source).set(1 if synced else 0)
            if waiting:
                log.info("sync.waiting", sources=",".join(waiting))
            self._logged_waiting = waiting
        if waiting:
            if self.store.has_pending() and (self._retry_at is None or now >= self._retry_at):
                self._feed_while_listing()
            return IDLE_WAIT, True
        if self._retry_at is not None and now < self._retry_at:
            return self._retry_at - now, False
        if self.first_sync_written and not self.attached:
            # Written but not attached (attach failed): retry it alone, on its own backoff.
            if self._attach_at is not None and now < self._attach_at:
                return self._attach_at - now, False
            self._attach()
            return 0.0, True
        if not self._due(now):
            if self._check_at is not None and now >= self._check_at:
                self._check(now)
                return 0.0, True
            wake = min(IDLE_WAIT, self._stats_at - now)
            if self._check_at is not None:
                wake = min(wake, self._check_at - now)
            return max(0.0, wake), True
        if self._last_sync_start is not None and now < self._last_sync_start + self.min_sync_interval:
            return self._last_sync_start + self.min_sync_interval - now, False
        self.sync(now)
        return 0.0, True

    def _due(self, now: float) -> bool:
        if self._need_full or not self.first_sync_written or self._retry_at is not None:
            return True
        return self.store.has_pending()

    # --- one sync ---------------------------------------------------------------------------

    def sync(self, now: float) -> bool:
        """Take, resolve, write. True when the write succeeded."""
        self._last_sync_start = now
        full = self._need_full or not self.first_sync_written
        mode = "full" if full else "incremental"
        batch = self.store.take()
        if self.first_sync_written:
            self._unapplied_arrivals.extend(batch.arrivals)
        try:
            delta = self._resolve(batch)
            if not full and not delta:
                self.store.applied()  # the changes cancelled out in resolve: nothing to write
                self._observe_event_to_map(self.clock())
                return True
            result = self.datapath.reconcile(self.resolver.state, batch.pod_cgroups, None if full else delta)
        except Exception as err:
            self._failed(mode, err)
            return False
        done = self.clock()
        self.store.applied()
        self.metrics.sync_duration.labels(mode=mode).observe(done - now)
        self.metrics.syncs.labels(mode=mode, outcome="ok").inc()
        self._observe_event_to_map(done)
        self._record_result(result)
        first = not self.first_sync_written
        seconds = round(done - now, 6)
        if first:
            log.info("sync.first", seconds=seconds, **self._sizes())
        elif full:
            (log.info if self.failures else log.debug)("sync.done", mode=mode, seconds=seconds,
                                                       recovered_after=self.failures, **self._sizes())
        else:
            log.info("sync.done", mode=mode, seconds=seconds, frontends_changed=len(delta.frontends),
                     groups_changed=len(delta.groups), clients_changed=len(delta.clients))
        self.first_sync_written = True
        self._publish_pods(batch.pod_cgroups)
        self.health.sync_written()
        self.failures = 0
        self._retry_at = None
        self._need_full = False
        if full:
            self._begin_check_cycle(done)  # the full reconcile compared every map
        if not self.attached:
            self._attach()
        if first:
            self._settle_collector()
        if full or delta.frontends or delta.groups:
            self._terminate_stale_sockets()
        if full:
            release_free_heap()  # the plan and the maps' read-back are gone: see agent.gcpause
        return True

    # --- the periodic check ------------------------------------------------------------------

    def _begin_check_cycle(self, now: float) -> None:
        self._check_cycle_start = self._check_at = now

    def _check(self, now: float) -> None:
        """One step of the periodic check; drift found makes the next turn a full reconcile."""
        started = self.clock()  # (`now` is the turn's: a stats refresh may have run since)
        try:
            step = self.datapath.check()
        except Exception as err:  # a failed read: the full reconcile reads (and repairs) all
            log.error("check.failed", error=str(err) or type(err).__name__, error_type=type(err).__name__)
            self._need_full = True
            return
        self.metrics.map_check_step.observe(max(0.0, self.clock() - started))
        if step.drift:
            log.warning("check.drift", repair="full reconcile",
                        **{f"{name}_entries": n for name, n in sorted(step.drift.items())})
            for name, n in step.drift.items():
                self.metrics.map_drift.labels(map=name).inc(n)
            self._need_full = True
            return
        # Each step moves the next one on by its share of the cycle's work: a cycle takes about
        # a period, however big the maps (and starts no earlier than a period after the last).
        self._check_at += self.map_check_period * step.work / max(step.cycle_work, 1)
        if step.cycle_done:
            self.metrics.map_check_cycles.inc()
            self._check_cycle_start = self._check_at = max(self._check_at,
                                                           self._check_cycle_start + self.map_check_period)
            # The sweep of sockets left on removed endpoints runs after each write that removed
            # some; once per cycle it also runs with nothing written, in case one failed.
            self._terminate_stale_sockets()

    def _terminate_stale_sockets(self) -> None:
        # Right after the write: from now on new connections get the new state, so every socket
        # still on a removed endpoint was opened before it, and is found now (within 1 s, A16).
        if self.stale_sockets is None:
            return
        try:
            self.stale_sockets(self.resolver.state)
        except Exception as err:  # never stops the datapath; the next change tries again
            log.error("stale.failed", error=str(err) or type(err).__name__)

    def _settle_collector(self) -> None:
        # What the first sync built (the resolver's records of the whole cluster, the plan's
        # tables) lives as long as the agent: take it out of the collector's generations, so that
        # no later collection walks millions of objects to free none; then end begin()'s pause.
        started = time.perf_counter()
        found, frozen = freeze_long_lived()
        if self._collector_was_enabled is not None:
            resume_collector(self._collector_was_enabled)
            self._collector_was_enabled = None
        log.info("gc.frozen", objects=frozen, garbage_found=found, seconds=round(time.perf_counter() - started, 3))

    def _feed_while_listing(self) -> None:
        """Hand what the sources delivered so far to the resolver, writing nothing (A15)."""
        batch = self.store.take()
        try:
            self._feed(batch)
        except Exception as err:  # a resolve bug: the first write is retried as a full one
            self._failed("full", err)

    def _feed(self, batch: Batch) -> None:
        for obj in batch.deletes:
            self.resolver.delete(obj)
        self.resolver.upsert_many(batch.upserts)  # collector paused: a first list is large

    def _observe_event_to_map(self, done: float) -> None:
        if self._unapplied_arrivals:
            self.metrics.record_event_to_map(done - arrived for arrived in self._unapplied_arrivals)
            self._unapplied_arrivals = []

    def _resolve(self, batch: Batch) -> StateDelta:
        self._feed(batch)
        delta = self.resolver.commit()
        self._log_problems()
        if delta.routes or not self._published_statuses:
            self._publish_statuses()
        if batch.pod_cgroups_changed:
            # A pod whose cgroup id changed needs its client entry rewritten even when resolve
            # saw no change of the Pod object (the cgroup appears after the API object).
            delta = StateDelta(frontends=delta.frontends, groups=delta.groups,
                               clients=delta.clients | batch.pod_cgroups_changed, routes=delta.routes)
        self.metrics.record_objects(self.store.counts())
        return delta

    def _log_problems(self) -> None:
        """One line per new problem resolve reports (a bad object skipped or read in part)."""
        problems = getattr(self.resolver, "problems", [])
        current = set(problems)
        for line in problems:
            if line not in self._problems_logged:
                log.warning("resolve.problem", problem=line)
        self._problems_logged = current

    def _publish_pods(self, pod_cgroups: Mapping[str, int]) -> None:
        if self.on_pods is None:
            return
        clients = self.resolver.state.clients
        self.on_pods([{"namespace": pod.namespace, "name": pod.name, "uid": uid, "cgroup_id": pod_cgroups[uid]}
                      for uid, pod in sorted(clients.items()) if uid in pod_cgroups])

    def _publish_statuses(self) -> None:
        self._published_statuses = True
        if self.on_statuses is None:
            return
        try:
            # A copy: the resolver's mapping is a live view that the next commit changes, and
            # the consumers read it from other threads.
            self.on_statuses(dict(self.resolver.statuses))
        except Exception as err:  # a status consumer never stops the datapath
            log.error("status.publish_failed", error=repr(err))

    def _failed(self, mode: str, err: Exception) -> None:
        self.failures += 1
        self._need_full = True
        delay = min(self.retry_max, self.retry_initial * (2 ** (self.failures - 1)))
        self._retry_at = self.clock() + delay
        message = str(err) or type(err).__name__
        self.health.write_failed(message)
        self.metrics.syncs.labels(mode=mode, outcome="error").inc()
        self.metrics.write_failures.inc()
        self.metrics.record_map_failure(err)
        log.error("sync.failed", mode=mode, attempt=self.failures, retry_in=round(delay, 3),
                  error=message, error_type=type(err).__name__)

    def _attach(self) -> bool:
        """Attach our programs; a failure is logged, counted and retried with the write backoff."""
        try:
            self.datapath.attach()
        except Exception as err:
            self.failures += 1
            delay = min(self.retry_max, self.retry_initial * (2 ** (self.failures - 1)))
            self._attach_at = self.clock() + delay
            message = str(err) or type(err).__name__
            self.health.write_failed(f"attach: {message}")
            log.error("attach.failed", attempt=self.failures, retry_in=round(delay, 3), error=message)
            return False
        self.failures = 0
        self._attach_at = None
        self.attached = True
        self.health.programs_attached()
        self.metrics.attached.set(1)
        log.info("attach.done", adopted=self.datapath.adopted,
                 carried=",".join(f"{m}:{n}" for m, n in getattr(self.datapath, "carried", {}).items()) or "-")
        return True

    # --- observations -------------------------------------------------------------------------

    def _sizes(self) -> dict[str, int]:
        state = self.resolver.state
        return {"frontends": len(state.frontends), "groups": len(state.groups),
                "endpoints": self.resolver.endpoint_count}

    def _record_result(self, result) -> None:
        sizes = self._sizes()
        self.metrics.record_programmed(sizes["frontends"], sizes["groups"], sizes["endpoints"])
        ops = getattr(result, "ops", None)
        if isinstance(ops, Mapping):
            self.metrics.record_map_ops(ops)

    def _refresh_stats(self) -> None:
        try:
            self.metrics.datapath_outcomes.update(self.datapath.counters())
            self.metrics.record_fill(self.datapath.fill())
            self.metrics.passive_health.update(*self.datapath.passive_health())
        except Exception as err:  # stats are best effort; the next refresh tries again
            log.warning("stats.failed", error=str(err) or type(err).__name__)
