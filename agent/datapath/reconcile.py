"""Reconciler: the only code that writes the datapath's maps.

Role: make the planned maps (layout.PLANNED_MAPS) hold a Plan (`full`) or write a PlanChange
(`apply`), both made by the planner (agent/datapath/plan.py) before the writer sees them: this
module never plans and never imports the planner (entries.py holds the forms both share). It
writes in an order that never lets a concurrent connect() see a mix of old and new for a
frontend. It keeps a mirror of what it believes is in each map (read at adoption
and at every full reconcile, updated on every write) so an incremental change costs in
proportion to the change, not to the table.

It touches maps only through the `MapIO` interface: bpfsys.Map in the agent, `DictMap` (an
in-memory stand-in, named as such) in the unit tests and the benchmark. A full reconcile runs
with the garbage collector paused (agent.gcpause): it builds the mirror's objects at once.

The mirror is compact, like the plan (see agent.datapath.entries): the endpoints and members maps
are mirrored per endpoint set (`_SetMirror`: set_id -> its count, or for members its records
as one blob), never per entry; this holds because a set_id stands for the set's content and a
set's entries (set_id, index) never change once written. A stale set is deleted by the keys its
count (or blob) gives. Frontends and names values are kept short (entries.short_value).

Drift: a set found in a map in another form than we write (an index missing, a key with a
nonzero pad byte, two members for one index), or, in a full reconcile, with other content than
the plan gives its set_id, is kept as its list of keys; a full reconcile that plans the set
rewrites it whole (then deletes the keys the rewrite did not cover), or deletes it like any
stale set. Adoption at start and every full reconcile read the maps; only a full one sweeps.

Write order (the one rule of this module; each step uses batch operations):

    1. endpoints + members of new endpoint sets     nothing names them yet: invisible
    2. groups                                       one atomic flip per group to its new set
    3. config, clients, names                       the opt-out flag before the pods that
                                                    need it; scopes of new pods; display names
       fe_filter bits of new frontends              a frontend never finds its bit clear
    4. frontends, consumer-scoped before default    one atomic update per frontend; a default
                                                    entry gains FE_HAS_SCOPES only after its
                                                    scoped entries exist
    5. delete stale frontends
    6. delete stale groups (only those no frontend in the maps still names)
    7. delete stale sets' endpoints and members (only sets no group in the maps still names;
       members also of a set whose group has no affinity any more), and the keys a rewrite
       of a drifted set did not cover
    8. fe_filter exact: the bits no frontends entry has any more cleared (a word per write)

The frontend filter (fe_filter in bpf/meshlet.h) is not planned: it is derived here from the
frontends mirror (a count of entries per bit), so it follows what the map really holds.

A set is expanded into its entries only while it is written or deleted, WRITE_CHUNK entries at
a time: never a Python entry per endpoint kept. Deleting last also keeps old sets readable for
a while after the flip: a program that read a group value just before the flip still finds the
endpoints that value named.

Overflow (SEMANTICS D4): capacity is checked before anything of a group or frontend is written,
counting the peak (old entries are deleted only in steps 5-7) and the new keys of each set a
group needs. A group whose new set does not fit keeps its old state and so does every frontend
that would need it; everything else is still written, and a MapFullError naming the map and the
option that sizes it (`--map-size`) is raised at the end. The stale entries deleted at the end free room, so a retry
can succeed on its own.

A failed write (an OSError from the map) re-reads that map into the mirror, since what reached
it is then unknown, and is raised; the next full reconcile repairs.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Protocol

from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath.entries import Plan, PlanChange
from agent.errors import TransientError
from agent.gcpause import gc_paused

#: Entries expanded from sets and handed to one update_batch / delete_batch call: bounds the
#: transient expansion (each entry is two bytes objects and a tuple) while keeping calls few.
WRITE_CHUNK = 8192

#: Planned maps mirrored entry by entry; the others (SET_MAPS) per endpoint set.
ENTRY_MAPS = ("groups", "clients", "config", "names", "frontends")
SET_MAPS = ("endpoints", "members")


class MapIO(Protocol):
    """What the reconciler needs of a map. Keys and values are bytes of the map's exact sizes."""

    name: str
    max_entries: int

    def items(self) -> dict[bytes, bytes]: ...

    def chunks(self, chunk: int = ...) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry, about `chunk` at a time (the entries of a set-keyed map are never all
        held). Between two parts the map may change, as the kernel's batch read allows: an entry
        deleted meanwhile is not returned, one added meanwhile may or may not be."""
        ...

    def lookup(self, key: bytes) -> bytes | None: ...

    def update_batch(self, entries: list[tuple[bytes, bytes]]) -> None: ...

    def delete_batch(self, keys: list[bytes]) -> None: ...


class DictMap:
    """An in-memory map (a stand-in for a kernel hash map, for tests and the benchmark).

    Like the kernel it refuses a new key when full (E2BIG), and writes a batch in order up to
    the first failure. `log` records every operation in order, for ordering tests.
    """

    def __init__(self, name: str, max_entries: int, log: list | None = None):
        self.name = name
        self.max_entries = max_entries
        self.data: dict[bytes, bytes] = {}
        self.log = log if log is not None else []

    def items(self) -> dict[bytes, bytes]:
        return dict(self.data)

    def chunks(self, chunk: int = 3) -> Iterator[list[tuple[bytes, bytes]]]:
        # Small parts, so that the tests exercise a set whose entries arrive in several. In key
        # order, from the entries still there when each part is made (the kernel reads a hash
        # map bucket by bucket, the same way); keys added after the start are not returned.
        keys = sorted(self.data)
        for start in range(0, len(keys), chunk):
            part = [(key, self.data[key]) for key in keys[start:start + chunk] if key in self.data]
            if part:
                yield part

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def update_batch(self, entries: list[tuple[bytes, bytes]]) -> None:
        for key, value in entries:
            if key not in self.data and len(self.data) >= self.max_entries:
                raise OSError(7, f"map {self.name} is full")  # E2BIG, as the kernel says
            self.data[key] = value
            self.log.append(("update", self.name, key, value))

    def delete_batch(self, keys: list[bytes]) -> None:
        for key in keys:
            self.data.pop(key, None)
            self.log.append(("delete", self.name, key))


def dict_maps(max_entries: int, log: list | None = None, **sizes: int) -> dict[str, DictMap]:
    """A DictMap for every map the reconciler writes: `max_entries` each unless `sizes` names
    the map; the frontend filter (an array) at its fixed size."""
    fixed = {"fe_filter": L.FE_FILTER_WORDS}
    return {name: DictMap(name, sizes.get(name, fixed.get(name, max_entries)), log) for name in L.WRITTEN_MAPS}


class MapFullError(TransientError):
    """Some groups or frontends kept their old state because a map had no room for the new one.

    capacities: map -> its max_entries, for the hint (the option to raise, from what)."""

    def __init__(self, problems: dict[str, list[str]], capacities: Mapping[str, int] | None = None):
        self.problems = problems
        capacities = capacities or {}
        parts, raise_to = [], []
        for map_name, what in sorted(problems.items()):
            size = L.MAP_SPECS[map_name].size_field
            have = capacities.get(map_name)
            shown = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
            parts.append(f"map {map_name} is full ({L.SIZE_OPTION} {size}"
                         f"{f'={have}' if have else ''}); kept the old state of {shown}")
            raise_to.append(f"{L.SIZE_OPTION} {size}={have * 2 if have else 'MORE'}")
        super().__init__("; ".join(parts) + f"; hint: start the agent with a larger size, e.g. "
                         f"{' '.join(raise_to)} (after `meshlet uninstall`: a pinned map keeps its size)")


@dataclass
class ReconcileStats:
    mode: str  #: "full" or "incremental"
    seconds: float = 0.0
    ops: Counter = field(default_factory=Counter)  #: (map, "update" | "delete") -> entries


class _SetMirror:
    """What the reconciler believes a set-keyed map (endpoints, members) holds, per set.

    `complete`: the sets in the form we write (every index 0..n-1, one entry each), as what
    entries.SetLayout.kept keeps of them (an endpoint set: its count; a members set: its blob).
    `ragged`: the keys of every set found in another form (drift). `entries` counts the map's
    entries, for the capacity checks.

    A set in `complete` is taken to hold what its set_id stands for: the id hashes the content,
    and nothing of ours writes a set's entries but in full. A full reconcile checks it anyway:
    its adoption compares every planned set found in the map with the plan (load's `expected`).
    """

    def __init__(self, layout: E.SetLayout):
        self.layout = layout
        self.complete: dict[int, int | bytes] = {}
        self.ragged: dict[int, list[bytes]] = {}
        self.entries = 0
        #: set id -> records_digest of its records, for the complete sets of a layout whose
        #: `kept` form does not hold the records (endpoints: a count): what the periodic check
        #: (agent/datapath/check.py) compares the map's entries with
        self.digests: dict[int, int] = {}
        self._digested = not isinstance(layout.kept(b""), bytes)

    def load(self, chunks: Iterable[list[tuple[bytes, bytes]]], max_entries: int,
             expected: Mapping[int, bytes] | None = None) -> None:
        """Group a map's entries by set (adoption, or after a failed write). A set of ours whose
        content differs from its `expected` blob (set id -> blob, a full reconcile's plan) is
        drift too, kept as ragged.

        Reads the map a chunk at a time (MapIO.chunks), so the whole map never exists as Python
        entries (500k at 50k Services): only the records of sets in our form are held until
        checked."""
        layout, total = self.layout, 0
        found: dict[int, list[bytes | None]] = {}  # set id -> record per index, None for a hole
        ragged: dict[int, list[bytes]] = {}
        for key, value in (entry for chunk in chunks for entry in chunk):
            total += 1
            parsed = layout.parse(key, value)
            # An index the map cannot hold cannot belong to a complete set (and must not size a
            # list).
            if parsed is None or parsed[1] >= max_entries:
                ragged.setdefault(E.key_set_id(key), []).append(key)
                continue
            sid, index, record = parsed
            records = found.get(sid)
            if records is None:
                records = found[sid] = []
            if index >= len(records):
                records.extend([None] * (index + 1 - len(records)))
            if records[index] is not None:  # two members entries claim one index
                ragged.setdefault(sid, []).append(key)
            else:
                records[index] = record
        complete: dict[int, int | bytes] = {}
        digests: dict[int, int] = {}
        for sid, records in found.items():
            if sid not in ragged and None not in records:
                blob = b"".join(records)
                want = expected.get(sid) if expected is not None else None
                if want is None or want == blob:
                    complete[sid] = layout.kept(blob)
                    if self._digested:
                        digests[sid] = records_digest(records)
                    continue
            ragged.setdefault(sid, []).extend(
                layout.key(sid, i, record) for i, record in enumerate(records) if record is not None)
        self.complete, self.ragged, self.entries, self.digests = complete, ragged, total, digests

    def holds(self, sid: int, blob: bytes) -> bool:
        """True when the map holds set `sid` as `blob`, complete."""
        kept = self.complete.get(sid)
        return kept is not None and kept == self.layout.kept(blob)

    def sets(self) -> set[int]:
        return set(self.complete) | set(self.ragged)

    def keys_of(self, sid: int) -> list[bytes]:
        kept = self.complete.get(sid)
        if kept is not None:
            return self.layout.kept_keys(sid, kept)
        return list(self.ragged.get(sid, ()))

    def _known(self, sid: int) -> bool:
        return sid in self.complete or sid in self.ragged

    def new_keys(self, sid: int, blob: bytes) -> int:
        """How many entries writing set `sid` as `blob` adds to the map."""
        if not self._known(sid):
            return self.layout.count(blob)
        return len(set(self.layout.kept_keys(sid, self.layout.kept(blob))) - set(self.keys_of(sid)))

    def stored(self, sid: int, blob: bytes) -> list[bytes]:
        """Note that the map now holds set `sid` as `blob`. Returns the keys of its earlier
        (drifted) form the new one does not cover: still in the map, to be deleted."""
        kept = self.layout.kept(blob)
        if self._digested:
            size = self.layout.record_size
            self.digests[sid] = records_digest([blob[offset:offset + size] for offset in range(0, len(blob), size)])
        if not self._known(sid):
            self.complete[sid] = kept
            self.entries += self.layout.kept_count(kept)
            return []
        old, new = set(self.keys_of(sid)), set(self.layout.kept_keys(sid, kept))
        self.ragged.pop(sid, None)
        self.complete[sid] = kept
        self.entries += len(new - old)
        return sorted(old - new)

    def deleted(self, sids: Iterable[int], keys: int) -> None:
        """Note that the map lost every key of these sets, and `keys` entries in all."""
        for sid in sids:
            self.complete.pop(sid, None)
            self.ragged.pop(sid, None)
            self.digests.pop(sid, None)
        self.entries -= keys


#: records_digest's mask: each record's hash as an unsigned 64-bit number.
DIGEST_MASK = (1 << 64) - 1


def records_digest(records: Iterable[bytes]) -> int:
    """A digest of a set's records that does not depend on the order they are read in, yet
    changes when a record moves to another index: the sum over the records of
    (hash(record) & DIGEST_MASK) * (2 * index + 1) (the periodic check adds the same terms up as
    it reads the entries, agent/datapath/check.py). Python's hash of bytes is keyed per process:
    a digest is only compared within the process that made it."""
    return sum([(hash(record) & DIGEST_MASK) * (2 * index + 1) for index, record in enumerate(records)])


def _group_set(value: bytes) -> int:
    """set_id of a groups-map value."""
    return E.group_value_fields(value)[0]


def _has_affinity(group_value: bytes) -> bool:
    return E.group_value_fields(group_value)[2] > 0


def _references(name: str, key: bytes, value: bytes) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(groups keys, names keys) an entry of a frontends or clients map refers to: the groups a
    frontend splits over (each once: plan merges a group's shares), and the ids whose names it
    shows (route, scope ids; a client also its pod name). One decode of the entry for both, because this runs for every
    frontend of the state on a full sync; tuples, not sets, for the same reason. (A group's own
    name has the group's key: a group in the map keeps its name, see _name_used.)"""
    if name == "frontends":
        route, gids = E.frontend_value_refs(value)
        scope_id = E.frontend_key_scope_id(key)
        return (tuple(E.u64_bytes(gid) for gid in gids if gid),
                tuple(E.u64_bytes(ident) for ident in (scope_id, route) if ident))
    if name == "clients":
        return (), (E.u64_bytes(E.client_value_scope_id(value)), E.pod_name_key(E.client_key_cgroup(key)))
    return (), ()


#: The maps whose entries name other entries (besides a group naming its own name).
_REFERRING_MAPS = ("frontends", "clients")


def _is_scoped(key: bytes) -> bool:
    return E.frontend_key_scope_id(key) != 0


class Reconciler:
    def __init__(self, maps: Mapping[str, MapIO]):
        missing = set(L.WRITTEN_MAPS) - set(maps)
        if missing:
            raise ValueError(f"reconciler needs the maps {sorted(missing)}")
        self.maps = maps
        #: ENTRY_MAPS: key -> value (short for entries.SHORT_VALUE_SIZES maps)
        self.mirror: dict[str, dict[bytes, bytes]] = {name: {} for name in ENTRY_MAPS}
        #: SET_MAPS: per endpoint set
        self.sets: dict[str, _SetMirror] = {name: _SetMirror(E.SET_LAYOUTS[name]) for name in SET_MAPS}
        #: groups key -> how many frontends entries name it (a group still in use is never deleted)
        self._users: Counter[bytes] = Counter()
        #: names key -> how many frontends and clients entries show it
        self._named: Counter[bytes] = Counter()
        #: names keys whose last user went away (deleted at the end of the write)
        self._orphaned: set[bytes] = set()
        #: The frontend filter (fe_filter in bpf/meshlet.h), derived from the frontends mirror:
        #: how many frontends entries have each bit, the words that follow, the words changed
        #: since the last write, what the map holds.
        self._filter_count = array("I", bytes(4 << L.FE_FILTER_BITS_LOG2))
        self._filter_want: list[int] = [0] * L.FE_FILTER_WORDS
        self._filter_dirty: set[int] = set()
        self._filter_map: dict[int, int] = {}
        self.adopt()

    # --- mirror ----------------------------------------------------------------------------

    def adopt(self, plan: Plan | None = None) -> None:
        """Read what is in the maps (pinned state of an earlier agent, or drift). With the plan
        of a full reconcile, a planned set found with other content is drift to rewrite."""
        for name in L.PLANNED_MAPS:
            self._load(name, plan)
        self._rebuild_refs()
        self._load_filter()
        self._write_filter(None)  # every word (_rebuild_refs): pins of an agent without the filter get it now

    def _load(self, name: str, plan: Plan | None = None) -> None:
        """Read one map into the mirror (the map's old mirror is dropped first: at 50k Services,
        the old and the new endpoints mirror side by side would be ~15 MiB more at the peak)."""
        if name in SET_MAPS:
            expected = None
            if plan is not None:
                expected = {group.set_id: blob for group in plan.groups.values()
                            if (blob := group.endpoints if name == "endpoints" else group.members)}
            self.sets[name] = _SetMirror(E.SET_LAYOUTS[name])
            self.sets[name].load(self.maps[name].chunks(), self.maps[name].max_entries, expected)
            return
        self.mirror[name] = {}
        items = self.maps[name].items()
        if name in E.SHORT_VALUE_SIZES:
            self.mirror[name] = {key: E.short_value(value) for key, value in items.items()}
        else:
            self.mirror[name] = items

    def _load_filter(self) -> None:
        self._filter_map = {E.U32.unpack(k)[0]: E.U64.unpack(v)[0] for k, v in self.maps["fe_filter"].items().items()}

    def _rebuild_refs(self) -> None:
        self._users, self._named, self._orphaned = Counter(), Counter(), set()
        self._filter_count = array("I", bytes(4 << L.FE_FILTER_BITS_LOG2))
        self._filter_want = [0] * L.FE_FILTER_WORDS
        self._filter_dirty = set(range(L.FE_FILTER_WORDS))  # what the map holds is compared again
        for name in _REFERRING_MAPS:
            for key, value in self.mirror[name].items():
                self._track(name, key, None, value)
        self._orphaned.clear()

    def _track(self, name: str, key: bytes, old: bytes | None, new: bytes | None,
               new_refs: tuple[tuple[bytes, ...], tuple[bytes, ...]] | None = None) -> None:
        """Keep the reference counts in step with one entry going from `old` to `new`
        (new_refs: _references of `new`, if known), and the frontend filter with a frontends key
        coming or going."""
        if name == "frontends" and (old is None) != (new is None):
            bit = E.fe_filter_bit(key)
            self._filter_count[bit] += 1 if old is None else -1
            if self._filter_count[bit] == (1 if old is None else 0):  # the first entry came, the last went
                self._filter_want[bit >> 6] ^= 1 << (bit & 63)
                self._filter_dirty.add(bit >> 6)
        if old is not None:
            groups, names = _references(name, key, old)
            for g in groups:
                _release(self._users, g)
            for n in names:
                if _release(self._named, n):
                    self._orphaned.add(n)
        if new is not None:
            groups, names = new_refs or _references(name, key, new)
            for g in groups:
                self._users[g] += 1
            for n in names:
                self._named[n] += 1

    def _name_used(self, key: bytes) -> bool:
        return key in self.mirror["groups"] or self._named[key] > 0

    def filter_word(self, index: int) -> int:
        """What this writer last wrote to (or read from) word `index` of the frontend filter."""
        return self._filter_map.get(index, 0)

    def counts(self) -> dict[str, int]:
        """Entries per planned map."""
        return {name: self._count(name) for name in L.PLANNED_MAPS}

    # --- entry points ------------------------------------------------------------------------

    def full(self, plan: Plan) -> ReconcileStats:
        """Make the maps equal the plan: write what differs, sweep every stale entry."""
        with gc_paused():  # the mirror is rebuilt at once: see agent.gcpause
            stats = ReconcileStats("full")
            start = time.monotonic()
            self.adopt(plan)  # a full reconcile also repairs what changed behind our back
            drop = {name: [key for key in self.mirror[name] if key not in getattr(plan, name)]
                    for name in ENTRY_MAPS}
            self._write(plan, drop, old_groups=None, stats=stats)
            stats.seconds = time.monotonic() - start
            return stats

    def apply(self, change: PlanChange) -> ReconcileStats:
        """Write an incremental plan (plan.Planner.change): what it plans, then delete what it
        names as removed, and every clients entry it does not plan."""
        stats = ReconcileStats("incremental")
        start = time.monotonic()
        groups = self.mirror["groups"]
        old_groups = {gkey: groups[gkey] for gkey in change.touched_groups if gkey in groups}
        drop: dict[str, list[bytes]] = {name: [] for name in ENTRY_MAPS}
        drop["groups"] = list(change.removed_groups)
        drop["frontends"] = list(change.removed_frontends)
        drop["clients"] = [key for key in self.mirror["clients"] if key not in change.want.clients]
        self._write(change.want, drop, old_groups=old_groups, stats=stats)
        stats.seconds = time.monotonic() - start
        return stats

    # --- writing -----------------------------------------------------------------------------

    def _write(self, want: Plan, drop: dict[str, list[bytes]], old_groups: dict[bytes, bytes] | None,
               stats: ReconcileStats) -> None:
        """Steps 1-7 of the module docstring, one phase each.

        drop: ENTRY_MAPS keys to delete unless planned (or, for groups, still in use).
        old_groups: the touched groups' values before this write (incremental), whose sets are
        the only candidates for step 7; None sweeps every set no group names (full).
        """
        refused: dict[str, list[str]] = {}  # map -> what kept its old state for lack of room there
        uncovered, refused_groups = self._write_sets_and_groups(want, refused, stats)
        self._write_config_clients_names(want, refused, stats)
        self._set_filter_bits(want, stats)
        self._write_frontends(want, refused_groups, refused, stats)
        self._delete_stale(want, drop, old_groups, uncovered, stats)
        self._write_filter(stats)
        if refused:
            raise MapFullError(refused, {name: self.maps[name].max_entries for name in refused})

    def _write_sets_and_groups(self, want: Plan, refused: dict[str, list[str]], stats: ReconcileStats
                               ) -> tuple[dict[str, list[bytes]], set[bytes]]:
        """Steps 1-2: new endpoint sets, then the group flips. Returns (per set map, the keys of
        drifted sets' old forms the rewrites did not cover; the refused groups' keys)."""
        set_writes, flips, refused_groups = self._admit_groups(want, refused)
        uncovered = {name: self._write_sets(name, set_writes[name], stats) for name in SET_MAPS}
        self._update("groups", flips, stats)
        return uncovered, refused_groups

    def _write_config_clients_names(self, want: Plan, refused: dict[str, list[str]],
                                    stats: ReconcileStats) -> None:
        """Step 3. The config flag first: a pod that opts out is then honoured from the instant
        its entry appears; when the flag goes off, no pod wants out any more, so the entries
        still saying so are only about to be rewritten."""
        for name in ("config", "clients", "names"):
            current = self.mirror[name]
            changed = [(k, v) for k, v in getattr(want, name).items() if current.get(k) != v]
            fits = self._room(name)
            new = [kv for kv in changed if kv[0] not in current]
            if len(new) > fits:
                skipped = sorted(new)[fits:]  # which ones wait does not depend on the plan's order
                skip_keys = {k for k, _ in skipped}
                changed = [kv for kv in changed if kv[0] not in skip_keys]
                refused.setdefault(name, []).append(f"{len(skipped)} {name} entries")
            self._update(name, changed, stats)

    def _set_filter_bits(self, want: Plan, stats: ReconcileStats) -> None:
        """Before step 4: the filter bits of the frontends about to appear, so a frontend in the
        map never finds its bit clear. The exact words (a refused entry's bit, the bits of
        deleted entries cleared) are written after step 5."""
        current = self.mirror["frontends"]
        words: dict[int, int] = {}
        for key in want.frontends:
            if key not in current:
                bit = E.fe_filter_bit(key)
                i = bit >> 6
                words[i] = words.get(i, self._filter_map.get(i, 0)) | (1 << (bit & 63))
        self._write_filter_words(words, stats)

    def _write_filter(self, stats: ReconcileStats | None) -> None:
        """Step 8: the words changed since the last write, exact."""
        words = {i: self._filter_want[i] for i in self._filter_dirty}
        self._write_filter_words(words, stats)
        self._filter_dirty.clear()

    def _write_filter_words(self, words: dict[int, int], stats: ReconcileStats | None) -> None:
        """Write the filter words that differ from what the map holds."""
        changed = [(i, word) for i, word in sorted(words.items()) if self._filter_map.get(i) != word]
        if not changed:
            return
        try:
            self.maps["fe_filter"].update_batch([(E.U32.pack(i), E.U64.pack(word)) for i, word in changed])
        except OSError:
            self._load_filter()
            raise
        self._filter_map.update(changed)
        if stats is not None:
            stats.ops[("fe_filter", "update")] += len(changed)

    def _write_frontends(self, want: Plan, refused_groups: set[bytes], refused: dict[str, list[str]],
                         stats: ReconcileStats) -> None:
        """Step 4: scoped before default, only those whose groups are all in their new state (a
        frontend needing a refused group keeps its old value)."""
        groups, current = self.mirror["groups"], self.mirror["frontends"]
        changed = [(k, v) for k, v in want.frontends.items() if current.get(k) != v]
        scoped_first = [kv for kv in changed if _is_scoped(kv[0])] + [kv for kv in changed if not _is_scoped(kv[0])]
        ready, refs, room_fe = [], [], self._room("frontends")
        for key, value in scoped_first:
            named = _references("frontends", key, value)
            if any(g not in groups or g in refused_groups for g in named[0]):
                refused.setdefault("groups", []).append(f"frontend {self._frontend_name(key)}")
                continue
            if key not in current:
                if room_fe <= 0:
                    refused.setdefault("frontends", []).append(f"frontend {self._frontend_name(key)}")
                    continue
                room_fe -= 1
            ready.append((key, value))
            refs.append(named)
            if len(ready) == WRITE_CHUNK:  # written as they are found ready: keeps refs small
                self._update("frontends", ready, stats, refs)
                ready, refs = [], []
        self._update("frontends", ready, stats, refs)

    def _delete_stale(self, want: Plan, drop: dict[str, list[bytes]], old_groups: dict[bytes, bytes] | None,
                      uncovered: dict[str, list[bytes]], stats: ReconcileStats) -> None:
        """Steps 5-7, then the clients and names nothing plans or shows any more."""
        # 5. Stale frontends.
        self._delete("frontends", [k for k in drop["frontends"] if k not in want.frontends], stats)
        # 6. Stale groups nobody names any more.
        self._delete("groups", [k for k in drop["groups"] if k not in want.groups and not self._users[k]], stats)
        # 7. Stale sets, and what rewrites of drifted sets left over.
        self._sweep_sets(want, old_groups, uncovered, stats)

        self._delete("clients", [k for k in drop["clients"] if k not in want.clients], stats)
        # Names nothing shows any more: those a full reconcile does not plan, and those whose
        # last user went away during this write.
        orphans = set(drop["names"]) | self._orphaned
        self._orphaned = set()
        self._delete("names", sorted(k for k in orphans if k not in want.names and not self._name_used(k)), stats)

    def _admit_groups(self, want: Plan, refused_by_map: dict[str, list[str]]
                      ) -> tuple[dict[str, list[tuple[int, bytes]]], list[tuple[bytes, bytes]], set[bytes]]:
        """Steps 1-2 decided: groups are admitted one by one (in the plan's order) while what
        they add fits, counting the new entries of each set they need (a set already in the map
        costs nothing). Returns (sets to write per map, group flips, refused group keys); a
        refused group is named in `refused_by_map`."""
        groups = self.mirror["groups"]
        endpoints, members = self.sets["endpoints"], self.sets["members"]
        room_eps, room_members, room_groups = self._room("endpoints"), self._room("members"), self._room("groups")
        set_writes: dict[str, list[tuple[int, bytes]]] = {name: [] for name in SET_MAPS}
        flips: list[tuple[bytes, bytes]] = []
        refused: set[bytes] = set()
        for gkey, group in want.groups.items():
            sid = group.set_id
            write_eps = bool(group.endpoints) and not endpoints.holds(sid, group.endpoints)
            write_members = bool(group.members) and not members.holds(sid, group.members)
            flip = groups.get(gkey) != group.value
            if not (write_eps or write_members or flip):
                continue
            need_eps = endpoints.new_keys(sid, group.endpoints) if write_eps else 0
            need_members = members.new_keys(sid, group.members) if write_members else 0
            need_group = 0 if gkey in groups else 1
            if need_eps > room_eps or need_members > room_members or need_group > room_groups:
                if flip:  # (a repair of an unchanged group's set is reported, nothing waits on it)
                    refused.add(gkey)
                short = "endpoints" if need_eps > room_eps else "members" if need_members > room_members else "groups"
                refused_by_map.setdefault(short, []).append(self._group_name(gkey, want))
                continue
            room_eps -= need_eps
            room_members -= need_members
            room_groups -= need_group
            if write_eps:
                set_writes["endpoints"].append((sid, group.endpoints))
            if write_members:
                set_writes["members"].append((sid, group.members))
            if flip:
                flips.append((gkey, group.value))
        return set_writes, flips, refused

    def _sweep_sets(self, want: Plan, old_groups: dict[bytes, bytes] | None,
                    uncovered: dict[str, list[bytes]], stats: ReconcileStats) -> None:
        """Step 7: delete the endpoints of every set no group value in the map names, the
        members of a set whose group has no affinity (any more), and the `uncovered` keys.

        A set id hashes its group id, so only its own group can name it: the incremental case
        (old_groups: the touched groups' values before the write) looks at the sets those
        values named alone. A set the plan wants is kept even if no group names it yet (its
        group was refused): a retry will not need to write it again.
        """
        groups = self.mirror["groups"]
        if old_groups is None:
            owners = {_group_set(value): value for value in groups.values()}
            candidates = {name: self.sets[name].sets() for name in SET_MAPS}
        else:
            owners = {}
            for gkey in old_groups:
                value = groups.get(gkey)
                if value is not None:
                    owners[_group_set(value)] = value
            old_sets = {_group_set(value) for value in old_groups.values()}
            candidates = {name: old_sets for name in SET_MAPS}
        for name in SET_MAPS:
            planned = {group.set_id for group in want.groups.values()
                       if (group.endpoints if name == "endpoints" else group.members)}
            stale = []
            for sid in candidates[name]:
                if sid in planned:
                    continue
                owner = owners.get(sid)
                if owner is None or (name == "members" and not _has_affinity(owner)):
                    stale.append(sid)
            self._delete_sets(name, sorted(stale), uncovered[name], stats)

    def _room(self, name: str) -> int:
        return self.maps[name].max_entries - self._count(name)

    def _count(self, name: str) -> int:
        return self.sets[name].entries if name in SET_MAPS else len(self.mirror[name])

    def _write_sets(self, name: str, sets: list[tuple[int, bytes]], stats: ReconcileStats) -> list[bytes]:
        """Write whole sets, expanded WRITE_CHUNK entries at a time. Returns the keys of their
        earlier drifted forms that the writes did not cover (see _SetMirror.stored)."""
        table = self.sets[name]
        entries: list[tuple[bytes, bytes]] = []
        written: list[tuple[int, bytes]] = []
        uncovered: list[bytes] = []

        def flush() -> None:
            try:
                self.maps[name].update_batch(entries)
            except OSError:
                self._load(name)  # what reached the map is now unknown
                raise
            for sid, blob in written:
                uncovered.extend(table.stored(sid, blob))
            stats.ops[(name, "update")] += len(entries)
            entries.clear()
            written.clear()

        for sid, blob in sets:
            entries += table.layout.entries(sid, blob)
            written.append((sid, blob))
            if len(entries) >= WRITE_CHUNK:
                flush()
        if entries:
            flush()
        return uncovered

    def _delete_sets(self, name: str, sids: list[int], keys: list[bytes], stats: ReconcileStats) -> None:
        """Delete every entry of these sets, and these other keys, WRITE_CHUNK keys at a time."""
        table = self.sets[name]
        batch: list[bytes] = list(keys)
        done: list[int] = []

        def flush() -> None:
            try:
                self.maps[name].delete_batch(batch)
            except OSError:
                self._load(name)
                raise
            table.deleted(done, len(batch))
            stats.ops[(name, "delete")] += len(batch)
            batch.clear()
            done.clear()

        for sid in sids:
            batch += table.keys_of(sid)
            done.append(sid)
            if len(batch) >= WRITE_CHUNK:
                flush()
        if batch or done:
            flush()

    def _update(self, name: str, entries: list[tuple[bytes, bytes]], stats: ReconcileStats,
                refs: list[tuple[tuple[bytes, ...], tuple[bytes, ...]]] | None = None) -> None:
        """Write entries of an ENTRY_MAPS map (values as the mirror keeps them), WRITE_CHUNK at a
        time (short values are made exact only for the chunk being written). refs: the
        _references of each new value, when the caller has them already."""
        mirror = self.mirror[name]
        referring = name in _REFERRING_MAPS
        for start in range(0, len(entries), WRITE_CHUNK):
            chunk = entries[start:start + WRITE_CHUNK]
            exact = chunk
            if name in E.SHORT_VALUE_SIZES:
                exact = [(key, E.full_value(name, value)) for key, value in chunk]
            try:
                self.maps[name].update_batch(exact)
            except OSError:
                self._load(name)  # what reached the map is now unknown
                self._rebuild_refs()
                raise
            if referring:
                for i, (key, value) in enumerate(chunk):
                    self._track(name, key, mirror.get(key), value, refs[start + i] if refs else None)
            mirror.update(chunk)
            stats.ops[(name, "update")] += len(chunk)

    def _delete(self, name: str, keys: list[bytes], stats: ReconcileStats) -> None:
        mirror = self.mirror[name]
        keys = [k for k in keys if k in mirror]
        if not keys:
            return
        try:
            self.maps[name].delete_batch(keys)
        except OSError:
            self._load(name)
            self._rebuild_refs()
            raise
        for key in keys:
            old = mirror.pop(key)
            if name in _REFERRING_MAPS:
                self._track(name, key, old, None)
        if name == "groups":
            self._orphaned.update(keys)  # a group's name goes with it, unless shown elsewhere
        stats.ops[(name, "delete")] += len(keys)

    # --- names for errors ----------------------------------------------------------------------

    def _group_name(self, gkey: bytes, want: Plan) -> str:
        raw = want.names.get(gkey) or self.mirror["names"].get(gkey)
        if raw:
            return "group " + E.name_text(raw)
        return f"group {int.from_bytes(gkey, 'little'):#x}"

    @staticmethod
    def _frontend_name(key: bytes) -> str:
        from agent.datapath.dump import format_frontend_key  # display only

        return format_frontend_key(L.FeKey.from_buffer_copy(key))


def _release(counts: Counter, key: bytes) -> bool:
    """One user fewer of `key`; True when that was the last one (the key leaves `counts`)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
        return False
    counts.pop(key, None)
    return True
