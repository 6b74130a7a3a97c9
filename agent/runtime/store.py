"""The store: the one Sink every source writes into, and the change tracker the sync loop drains.

Role: sources call upsert/delete/replace/synced/pod_cgroups from their own threads; the store keeps
the current object of each identity, coalesces changes not yet taken (the last write of an
identity wins, a change that restores what was taken before cancels out), knows which sources
have finished their first list, records when the oldest change not yet applied arrived (for
/healthz and the event-to-map latency), and wakes the sync loop. It never calls resolve or the
datapath: the loop takes a batch and feeds the resolver from its own thread, so a slow sync never
blocks a source and resolve needs no lock.

May touch: nothing outside this process. Invariants (under one lock):
- `_current` is what the sources say now; `_given` is what the loop has been handed;
  `_pending` names exactly the identities where the two differ;
- `unapplied_since()` is None iff every change seen has been taken and applied by a successful
  sync (`applied()`), or cancelled out before it was taken.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from agent.runtime.logs import get_logger
from agent.sources import POD_CGROUPS, ObjectKey, object_key

log = get_logger("store")

@dataclass
class Batch:
    """What changed since the last take, for the loop to feed the resolver.

    `upserts` and `deletes` are objects (a delete carries the last object seen); `pod_cgroups` is
    the full current mapping and `pod_cgroups_changed` the pod uids whose cgroup id appeared,
    changed or went away since the last take.
    """

    upserts: list[dict] = field(default_factory=list)
    deletes: list[dict] = field(default_factory=list)
    pod_cgroups: dict[str, int] = field(default_factory=dict)
    pod_cgroups_changed: frozenset[str] = frozenset()
    since: float | None = None  #: when the oldest change in this batch arrived (clock time)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.pod_cgroups_changed)


class Store:
    """The Sink implementation (agent.sources.Sink), shared by every source and the loop."""

    def __init__(self, expected_sources: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._current: dict[ObjectKey, dict] = {}
        self._given: dict[ObjectKey, dict] = {}
        self._pending: set[ObjectKey] = set()
        self._owner: dict[ObjectKey, str] = {}
        self._kind_source: dict[str, str] = {}
        self._cgroups: dict[str, int] = {}
        self._cgroups_given: dict[str, int] = {}
        self._expected: set[str] = set(expected_sources)
        self._synced: set[str] = set()
        self._pending_since: float | None = None  #: oldest change not taken yet
        self._in_flight_since: float | None = None  #: oldest change taken but not applied yet
        self._poked = False

    # --- the Sink side (any thread) ----------------------------------------------------------

    def upsert(self, obj: dict) -> None:
        with self._lock:
            key = object_key(obj)
            self._owner.setdefault(key, self._kind_source.get(key[1], key[1]))
            self._set(key, obj)

    def delete(self, obj: dict) -> None:
        with self._lock:
            key = object_key(obj)
            self._owner.pop(key, None)
            self._set(key, None)

    def replace(self, source: str, objs: list[dict]) -> None:
        with self._lock:
            fresh: dict[ObjectKey, dict] = {}
            for obj in objs:
                key = object_key(obj)
                fresh[key] = obj
                self._kind_source[key[1]] = source
            for key in [k for k, owner in self._owner.items() if owner == source and k not in fresh]:
                del self._owner[key]
                self._set(key, None)
            for key, obj in fresh.items():
                self._owner[key] = source
                self._set(key, obj)

    def synced(self, source: str) -> None:
        with self._lock:
            self._mark_synced(source)

    def pod_cgroups(self, mapping: dict[str, int]) -> None:
        with self._lock:
            if mapping != self._cgroups:
                self._cgroups = dict(mapping)
                if self._cgroups == self._cgroups_given:
                    self._forget_if_clean()
                else:
                    self._changed()
            self._mark_synced(POD_CGROUPS)

    # --- the loop side ------------------------------------------------------------------------

    def expect(self, source: str) -> None:
        """Add a source that must sync before anything is written (A15)."""
        with self._lock:
            self._expected.add(source)

    def all_synced(self) -> bool:
        with self._lock:
            return self._expected <= self._synced

    def sources(self) -> dict[str, bool]:
        """Every expected source and whether it has finished its first list."""
        with self._lock:
            return {source: source in self._synced for source in sorted(self._expected)}

    def waiting_for(self) -> list[str]:
        """The expected sources that have not finished their first list yet."""
        with self._lock:
            return sorted(self._expected - self._synced)

    def wait(self, timeout: float | None) -> bool:
        """Block until there is something new (a change, a source synced, `poke()`) or timeout."""
        with self._wakeup:
            if not (self._pending_since is not None or self._poked):
                self._wakeup.wait(timeout)
            poked, self._poked = self._poked, False
            return poked or self._pending_since is not None

    def poke(self) -> None:
        """Wake a waiting loop (used on shutdown and by tests)."""
        with self._wakeup:
            self._poked = True
            self._wakeup.notify_all()

    def has_pending(self) -> bool:
        """Is there a change not taken yet?"""
        with self._lock:
            return self._pending_since is not None

    def take(self) -> Batch:
        """Hand every change not yet taken to the caller; `unapplied_since` stays until `applied()`."""
        with self._lock:
            batch = Batch(since=self._pending_since, pod_cgroups=dict(self._cgroups))
            for key in sorted(self._pending):
                now, before = self._current.get(key), self._given.get(key)
                if now is not None:
                    batch.upserts.append(now)
                    self._given[key] = now
                elif before is not None:
                    batch.deletes.append(before)
                    del self._given[key]
            changed = {uid for uid in self._cgroups.keys() | self._cgroups_given.keys()
                       if self._cgroups.get(uid) != self._cgroups_given.get(uid)}
            batch.pod_cgroups_changed = frozenset(changed)
            self._cgroups_given = dict(self._cgroups)
            self._pending.clear()
            if self._pending_since is not None and self._in_flight_since is None:
                self._in_flight_since = self._pending_since
            self._pending_since = None
            return batch

    def applied(self) -> None:
        """Every batch taken so far is in the maps (a sync succeeded)."""
        with self._lock:
            self._in_flight_since = None

    def unapplied_since(self) -> float | None:
        """When the oldest change not yet in the maps arrived (clock time), or None."""
        with self._lock:
            if self._in_flight_since is None:
                return self._pending_since
            return self._in_flight_since

    def counts(self) -> dict[str, int]:
        """Number of current objects by kind."""
        with self._lock:
            out: dict[str, int] = {}
            for _, kind, _, _ in self._current:
                out[kind] = out.get(kind, 0) + 1
            return out

    # --- under the lock ---------------------------------------------------------------------

    def _set(self, key: ObjectKey, obj: dict | None) -> None:
        if obj is None:
            if self._current.pop(key, None) is None:
                return
        else:
            if self._current.get(key) == obj:
                return
            self._current[key] = obj
        # Pending iff the current object differs from what the loop was handed: a change that
        # restores the handed state cancels out (no resolve, no write).
        if self._current.get(key) == self._given.get(key):
            self._pending.discard(key)
            self._forget_if_clean()
        else:
            self._pending.add(key)
            self._changed()

    def _forget_if_clean(self) -> None:
        if not self._pending and self._cgroups == self._cgroups_given:
            self._pending_since = None

    def _changed(self) -> None:
        if self._pending_since is None:
            self._pending_since = self._clock()
        self._wakeup.notify_all()

    def _mark_synced(self, source: str) -> None:
        if source in self._synced:
            return
        self._synced.add(source)
        log.info("source.synced", source=source, waiting=",".join(sorted(self._expected - self._synced)) or "-")
        self._poked = True
        self._wakeup.notify_all()
