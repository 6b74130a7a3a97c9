"""The one sync loop: store -> resolve -> datapath, rate-limited, coalescing, never crashing.

Role: the only thread that calls the resolver and the datapath. Each sync takes every change the
store coalesced since the last one, feeds the resolver, commits, and has the datapath reconcile
the new desired state. Rules (SEMANTICS A15, D1, D2; DESIGN.md "One sync loop"):

- Nothing is resolved or written until every expected source has finished its first list.
- The first write is a full reconcile (the datapath adopts what is pinned, writes the difference
  and sweeps what is stale); later writes are incremental, handing over the resolver's delta
  (plus the pods whose cgroup changed). A periodic full reconcile repairs drift.
- Programs: attached at start when the maps were adopted (new programs replace ours in place and
  serve the old state at once), else right after the first full write, so new programs never run
  against empty maps.
- Two syncs start at least `min_sync_interval` apart; changes arriving meanwhile wait and
  coalesce into the next one (the store keeps only the last state of each object).
- A failed sync is logged, counted, shown in health and retried after a capped exponential
  backoff, as a full reconcile (what reached the maps before the failure is then unknown).
  No exception from the resolver or the datapath ends the loop.

May touch: the resolver and the datapath (only from this thread), the store, health and metrics.
Time comes from `clock`, so the tests drive it without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Protocol

from agent.model import DesiredState, RouteId, RouteStatus, StateDelta
from agent.runtime.health import Health
from agent.runtime.logs import get_logger
from agent.runtime.metrics import Metrics
from agent.runtime.store import Batch, Store

log = get_logger("loop")


class Resolver(Protocol):
    """What the loop needs of agent.resolve.Resolver."""

    state: DesiredState
    statuses: Mapping[RouteId, RouteStatus]

    def upsert(self, obj: dict) -> None: ...

    def delete(self, obj: dict) -> None: ...

    def commit(self) -> StateDelta: ...


class Datapath(Protocol):
    """What the loop needs of agent.datapath.Datapath (already opened: maps adopted or made)."""

    adopted: bool

    def attach(self) -> None: ...

    def reconcile(self, state: DesiredState, pod_cgroups: Mapping[str, int], delta: StateDelta | None = None): ...

    def counters(self) -> Mapping[str, int]: ...

    def fill(self) -> Mapping[str, float]: ...


#: Longest idle wait: the loop wakes at least this often to notice a due resync or stats refresh.
IDLE_WAIT = 1.0


class SyncLoop:
    def __init__(self, store: Store, resolver: Resolver, datapath: Datapath, health: Health,
                 metrics: Metrics, *, min_sync_interval: float = 0.08, full_resync_interval: float = 60.0,
                 retry_initial: float = 0.2, retry_max: float = 10.0, stats_interval: float = 2.0,
                 on_statuses: Callable[[Mapping[RouteId, RouteStatus]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.resolver = resolver
        self.datapath = datapath
        self.health = health
        self.metrics = metrics
        self.min_sync_interval = min_sync_interval
        self.full_resync_interval = full_resync_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stats_interval = stats_interval
        self.on_statuses = on_statuses
        self.clock = clock

        self.attached = False
        self.first_sync_written = False
        self.failures = 0  #: consecutive failed syncs
        self._need_full = True
        self._last_sync_start: float | None = None
        self._last_full: float | None = None
        self._retry_at: float | None = None
        self._stats_at = 0.0
        self._logged_waiting: list[str] | None = None
        self._published_statuses = False

    # --- driving ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sync until `stop` is set (the caller also pokes the store to wake us)."""
        if self.datapath.adopted:
            self._attach()
        while not stop.is_set():
            delay, for_changes = self.tick()
            if stop.is_set():
                break
            if for_changes:
                self.store.wait(delay)
            else:
                stop.wait(delay)  # rate limit or backoff: changes keep coalescing meanwhile

    def tick(self) -> tuple[float, bool]:
        """Do what is due now. Returns (seconds to wait before the next tick, whether a new change
        should end that wait early: False while the rate limit or a backoff holds changes back)."""
        now = self.clock()
        if now >= self._stats_at:
            self._refresh_stats()
            self._stats_at = now + self.stats_interval
        waiting = self.store.waiting_for()
        if waiting:
            if waiting != self._logged_waiting:
                log.info("sync.waiting", sources=",".join(waiting))
                self._logged_waiting = waiting
            return IDLE_WAIT, True
        if self._retry_at is not None and now < self._retry_at:
            return self._retry_at - now, False
        if not self._due(now):
            next_full = (self._last_full if self._last_full is not None else now) + self.full_resync_interval
            return max(0.0, min(IDLE_WAIT, next_full - now, self._stats_at - now)), True
        if self._last_sync_start is not None and now < self._last_sync_start + self.min_sync_interval:
            return self._last_sync_start + self.min_sync_interval - now, False
        self.sync(now)
        return 0.0, True

    def _due(self, now: float) -> bool:
        if self._need_full or not self.first_sync_written or self._retry_at is not None:
            return True
        if self._last_full is not None and now >= self._last_full + self.full_resync_interval:
            return True
        return self.store.has_pending()

    # --- one sync ---------------------------------------------------------------------------

    def sync(self, now: float) -> bool:
        """Take, resolve, write. True when the write succeeded."""
        self._last_sync_start = now
        full = self._need_full or not self.first_sync_written or (
            self._last_full is not None and now >= self._last_full + self.full_resync_interval)
        mode = "full" if full else "incremental"
        batch = self.store.take()
        since = self.store.unapplied_since()
        try:
            delta = self._resolve(batch)
            if not full and not delta:
                self.store.applied()  # the changes cancelled out in resolve: nothing to write
                return True
            result = self.datapath.reconcile(self.resolver.state, batch.pod_cgroups, None if full else delta)
            if not self.attached:
                self._attach(raise_errors=True)
        except Exception as err:
            self._failed(mode, err)
            return False
        done = self.clock()
        self.store.applied()
        self.metrics.sync_duration.labels(mode=mode).observe(done - now)
        self.metrics.syncs.labels(mode=mode, outcome="ok").inc()
        if since is not None:
            self.metrics.event_to_map.observe(max(0.0, done - since))
        self._record_result(result)
        if not self.first_sync_written:
            log.info("sync.first", seconds=round(done - now, 6), **self._sizes())
        elif self.failures or full:
            log.info("sync.done", mode=mode, seconds=round(done - now, 6), recovered_after=self.failures,
                     **self._sizes())
        self.first_sync_written = True
        self.health.sync_written()
        self.failures = 0
        self._retry_at = None
        self._need_full = False
        if full:
            self._last_full = now
        return True

    def _resolve(self, batch: Batch) -> StateDelta:
        for obj in batch.deletes:
            self.resolver.delete(obj)
        for obj in batch.upserts:
            self.resolver.upsert(obj)
        delta = self.resolver.commit()
        if delta.routes or not self._published_statuses:
            self._publish_statuses()
        if batch.pod_cgroups_changed:
            # A pod whose cgroup id changed needs its client entry rewritten even when resolve
            # saw no change of the Pod object (the cgroup appears after the API object).
            delta = StateDelta(frontends=delta.frontends, groups=delta.groups,
                               clients=delta.clients | batch.pod_cgroups_changed, routes=delta.routes)
        self.metrics.record_objects(self.store.counts())
        return delta

    def _publish_statuses(self) -> None:
        self._published_statuses = True
        if self.on_statuses is None:
            return
        try:
            self.on_statuses(self.resolver.statuses)
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
        log.error("sync.failed", mode=mode, attempt=self.failures, retry_in=round(delay, 3),
                  error=message, error_type=type(err).__name__)

    def _attach(self, raise_errors: bool = False) -> None:
        try:
            self.datapath.attach()
        except Exception as err:
            if raise_errors:
                raise
            # At start (adopted maps) a failed attach is retried with the first sync's write.
            log.error("attach.failed", error=str(err) or type(err).__name__)
            return
        self.attached = True
        self.health.programs_attached()
        self.metrics.attached.set(1)
        log.info("attach.done", adopted=self.datapath.adopted)

    # --- observations -------------------------------------------------------------------------

    def _sizes(self) -> dict[str, int]:
        state = self.resolver.state
        return {"frontends": len(state.frontends), "groups": len(state.groups),
                "endpoints": sum(len(g.endpoints) for g in state.groups.values())}

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
        except Exception as err:  # stats are best effort; the next refresh tries again
            log.warning("stats.failed", error=str(err) or type(err).__name__)
