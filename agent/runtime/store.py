"""The store: the one Sink every source writes into, and the change tracker the sync loop drains.

Role: sources call the Sink methods (agent.sources.Sink) from their own threads; the store
coalesces the changes not yet taken (the last write of an identity wins), knows which sources
have finished their first list, records when each change arrived (for /healthz and the
event-to-map latency), and wakes the sync loop. It never calls resolve or the datapath: the loop
takes a batch and feeds the resolver from its own thread, so a slow sync never blocks a source
and resolve needs no lock.

It keeps no object longer than the loop takes to take it. Per identity it remembers only a
fingerprint of the version handed to the loop (`_handed`), and the object itself only while a
change of it waits to be taken (`_pending`). The resolver holds the cluster, as its own compact
records: a second copy of every object as a JSON dict here was ~400 MiB at 50k Services.

May touch: nothing outside this process. Invariants (under one lock):
- `_handed` maps every identity the loop holds (handed over, not retracted) to the fingerprint
  of the version it holds; `_pending` names exactly the identities with a change not yet taken:
  the newest object and its fingerprint (None, None for a delete) and when the first of those
  changes arrived. What the sources hold now is `_pending`'s version, else `_handed`'s;
- a fingerprint is the object's `metadata.resourceVersion` (the Sink contract: same identity and
  version, same object), else a token equal to nothing: such an object counts as changed at
  every upsert, and the resolver, finding its records equal, writes nothing;
- a change that restores what the loop was handed cancels out (no resolve, no write) where that
  can be told without the objects: an identity created and deleted between two takes, or brought
  back at the resourceVersion it was handed at (a relist of an unchanged object);
- an identity belongs to the source that listed its kind last (else to the source named after
  its kind, agent.sources); a list in progress holds the identities of its source it has not
  delivered yet (`_unlisted`), and its end deletes those;
- `unapplied_since()` is None iff every change seen has been taken and applied by a successful
  sync (`applied()`), or cancelled out before it was taken;
- `counts()` is the number of identities the sources hold now, by kind (kept as changes arrive:
  the loop reads it every sync).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from agent.logs import get_logger
from agent.sources import POD_CGROUPS, ObjectKey, identity_stub, object_key

log = get_logger("store")


@dataclass
class Batch:
    """What changed since the last take, for the loop to feed the resolver.

    `upserts` are the newest objects; `deletes` name the identities gone (identity stubs, see
    agent.sources.identity_stub: the resolver reads nothing else of a delete). `pod_cgroups` is the
    full current mapping and `pod_cgroups_changed` the pod uids whose cgroup id appeared, changed
    or went away since the last take. `arrivals` holds, for each object and each pod uid in the
    batch, when its first change since the last take reached the store (clock time).
    """

    upserts: list[dict] = field(default_factory=list)
    deletes: list[dict] = field(default_factory=list)
    pod_cgroups: dict[str, int] = field(default_factory=dict)
    pod_cgroups_changed: frozenset[str] = frozenset()
    arrivals: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.pod_cgroups_changed)


def _fingerprint(obj: dict) -> object:
    meta = obj.get("metadata")
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if isinstance(version, str) and version:
        return version
    return object()  # unknown: equal to nothing, so every upsert is a change


class Store:
    """The Sink implementation (agent.sources.Sink), shared by every source and the loop."""

    def __init__(self, expected_sources: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._handed: dict[ObjectKey, object] = {}
        self._pending: dict[ObjectKey, tuple[dict | None, object, float]] = {}
        self._counts: dict[str, int] = {}
        self._kind_source: dict[str, str] = {}
        self._api_versions: dict[str, str] = {}  #: kind -> the apiVersion it last came in
        self._unlisted: dict[str, set[ObjectKey]] = {}  #: source listing -> identities not seen yet
        self._cgroups: dict[str, int] = {}
        self._cgroups_given: dict[str, int] = {}
        self._cgroups_since: float | None = None  #: first cgroup change not taken yet
        self._expected: set[str] = set(expected_sources)
        self._synced: set[str] = set()
        self._pending_since: float | None = None  #: oldest change not taken yet
        self._in_flight_since: float | None = None  #: oldest change taken but not applied yet
        self._poked = False

    # --- the Sink side (any thread) ----------------------------------------------------------

    def upsert(self, obj: dict) -> None:
        with self._lock:
            self._upsert(obj, None)

    def delete(self, obj: dict) -> None:
        with self._lock:
            self._delete(object_key(obj))

    def apply(self, upserts: list[dict], deletes: list[dict]) -> None:
        with self._lock:
            for obj in deletes:
                self._delete(object_key(obj))
            for obj in upserts:
                self._upsert(obj, None)

    def list_begin(self, source: str) -> None:
        with self._lock:
            self._list_begin(source)

    def list_page(self, source: str, objs: list[dict]) -> None:
        with self._lock:
            for obj in objs:
                self._upsert(obj, source)

    def list_end(self, source: str) -> None:
        with self._lock:
            self._list_end(source)

    def replace(self, source: str, objs: list[dict]) -> None:
        with self._lock:  # one step: the loop takes the whole list or none of it
            self._list_begin(source)
            for obj in objs:
                self._upsert(obj, source)
            self._list_end(source)

    def synced(self, source: str) -> None:
        with self._lock:
            self._mark_synced(source)

    def pod_cgroups(self, mapping: dict[str, int]) -> None:
        with self._lock:
            if mapping != self._cgroups:
                self._cgroups = dict(mapping)
                if self._cgroups == self._cgroups_given:
                    self._cgroups_since = None
                    self._forget_if_clean()
                else:
                    if self._cgroups_since is None:
                        self._cgroups_since = self._clock()
                    self._changed(self._cgroups_since)
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
        """Hand every change not yet taken to the caller; `unapplied_since` stays until `applied()`.

        The objects leave the store with the batch: from here on only their fingerprints stay."""
        with self._lock:
            batch = Batch(pod_cgroups=dict(self._cgroups))
            for key, (obj, fingerprint, arrived) in self._pending.items():
                if obj is not None:
                    batch.upserts.append(obj)
                    self._handed[key] = fingerprint
                else:
                    batch.deletes.append(identity_stub(key, self._api_versions.get(key[1])))
                    del self._handed[key]  # the delete handed over: nothing of it is left
                batch.arrivals.append(arrived)
            self._pending = {}
            changed = {uid for uid in self._cgroups.keys() | self._cgroups_given.keys()
                       if self._cgroups.get(uid) != self._cgroups_given.get(uid)}
            batch.pod_cgroups_changed = frozenset(changed)
            if changed:
                batch.arrivals.extend([self._cgroups_since if self._cgroups_since is not None
                                       else self._clock()] * len(changed))
            self._cgroups_given = dict(self._cgroups)
            self._cgroups_since = None
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
        """Number of objects the sources hold now, by kind."""
        with self._lock:
            return {kind: count for kind, count in self._counts.items() if count}

    # --- under the lock ---------------------------------------------------------------------

    def _list_begin(self, source: str) -> None:
        kinds = {kind for kind, owner in self._kind_source.items() if owner == source}
        if source not in self._kind_source:
            kinds.add(source)  # a kind never listed belongs to the source named after it
        held = {key for key in self._handed if key[1] in kinds}
        held.update(key for key, change in self._pending.items() if key[1] in kinds and change[0] is not None)
        self._unlisted[source] = held

    def _list_end(self, source: str) -> None:
        for key in self._unlisted.pop(source, ()):  # none: no list of it was in progress
            self._delete(key)

    def _upsert(self, obj: dict, listing_source: str | None) -> None:
        key = object_key(obj)
        kind = key[1]
        if listing_source is not None:
            self._kind_source[kind] = listing_source
        unlisted = self._unlisted.get(self._owner(key))
        if unlisted:
            unlisted.discard(key)  # held now: the list in progress must not delete it
        api_version = obj.get("apiVersion")
        if isinstance(api_version, str) and self._api_versions.get(kind) != api_version:
            self._api_versions[kind] = sys.intern(api_version)
        fingerprint = _fingerprint(obj)
        change = self._pending.get(key)
        present = change[1] if change is not None else self._handed.get(key)
        if present is not None and present == fingerprint:
            return  # the same version again (a relist): no change
        if present is None:
            self._counts[kind] = self._counts.get(kind, 0) + 1
        handed = self._handed.get(key)
        if handed is not None and handed == fingerprint:
            self._settled(key)  # back to what the loop was handed
        else:
            arrived = change[2] if change is not None else self._clock()
            self._pending[key] = (obj, fingerprint, arrived)
            self._changed(arrived)

    def _delete(self, key: ObjectKey) -> None:
        change = self._pending.get(key)
        present = change[1] if change is not None else self._handed.get(key)
        if present is None:
            return
        self._counts[key[1]] -= 1
        if key not in self._handed:
            self._settled(key)  # never handed to the loop: nothing to retract
        else:
            arrived = change[2] if change is not None else self._clock()
            self._pending[key] = (None, None, arrived)
            self._changed(arrived)

    def _owner(self, key: ObjectKey) -> str:
        return self._kind_source.get(key[1], key[1])

    def _settled(self, key: ObjectKey) -> None:
        if self._pending.pop(key, None) is not None:
            self._forget_if_clean()

    def _forget_if_clean(self) -> None:
        if not self._pending and self._cgroups == self._cgroups_given:
            self._pending_since = None

    def _changed(self, arrived: float) -> None:
        if self._pending_since is None:
            self._pending_since = arrived
        self._wakeup.notify_all()

    def _mark_synced(self, source: str) -> None:
        if source in self._synced:
            return
        self._synced.add(source)
        log.info("source.synced", source=source, waiting=",".join(sorted(self._expected - self._synced)) or "-")
        self._poked = True
        self._wakeup.notify_all()
