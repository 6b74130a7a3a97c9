"""The periodic check: the planned maps compared with the writer's mirror, a bounded part at a time.

Role: find what changed in the maps behind the agent's back (another process, a tool, a bug),
without holding the sync loop: each `step` reads one part of one map (MapIO.chunks, a batch read
that keeps its place between steps) or checks one part of what the map should hold, and returns.
The loop runs a step only when no change is pending, paced so that every entry is compared once
per period (agent/runtime/loop.py). It never writes: a difference is reported, and the loop then
runs a full reconcile, which adopts the maps as they are and repairs them (reconcile.py).

What is compared with what (the mirror is what the writer wrote; reconcile.Reconciler):

- an entry of a map mirrored entry by entry (groups, clients, config, names, frontends) must be in
  the mirror with the same value; an entry mirrored but not read in this pass is looked up by
  its key at the end of the pass (missing, or written after the read passed it: only the lookup
  says which);
- a word of the frontend filter (fe_filter, an array the writer derives from the frontends) must
  equal what the writer wrote there;
- an entry of a set-keyed map (endpoints, members) must be in our form and belong to a complete
  set of the mirror at an index the set has; a members entry must hold the record of the set's
  blob. The entries read of each set are counted (and for endpoints, whose mirror keeps only a
  count, summed as in reconcile.records_digest): at the end of the pass a set read in part or
  with other content is looked up entry by entry before it is called drift.

The map may change between two steps (the loop writes in between): an entry is only judged
against the mirror in the step that read it, and what the end of a pass finds unseen is looked
up again. Sets and keys that appeared during a pass are checked in the next one. Sets the
mirror holds as drifted (`ragged`: only after an adoption or a failed write, which a full
reconcile follows) are left to that full reconcile.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath.reconcile import DIGEST_MASK, SET_MAPS, Reconciler, records_digest

#: Entries read from the kernel, or mirror keys checked, in one step: about 1-2 ms of Python.
CHECK_CHUNK = 1024

#: The maps a cycle compares, in order: every map the writer writes (the planned ones, then the
#: frontend filter it derives from the frontends).
CHECKED_MAPS = L.WRITTEN_MAPS
FILTER = "fe_filter"

#: Where a set's count lives in the number summed per set: above any records_digest.
_ONE = 1 << 192


@dataclass
class CheckStep:
    """What one step did."""

    work: int  #: entries read plus mirror keys or sets checked: the unit the loop paces by
    cycle_work: int  #: the same, for the whole cycle this step belongs to (estimated at its start)
    cycle_done: bool  #: this step ended a cycle: every map was compared once
    drift: dict[str, int] = field(default_factory=dict)  #: map -> differences found in this step


class _Pass:
    """One map's pass: reading it part by part, then checking what was not read."""

    def __init__(self, name: str, reader: Iterator[list[tuple[bytes, bytes]]], expected: list):
        self.name = name
        self.reader: Iterator[list[tuple[bytes, bytes]]] | None = reader
        #: keys (entry maps) or set ids (set maps) the mirror held when the pass began
        self.expected = expected
        self.position = 0  #: how far the end-of-pass check has gone through `expected`
        self.seen: set[bytes] = set()  #: entry maps: keys read whose value matched
        #: set maps: set id -> count * _ONE + digest of what was read
        self.sums: defaultdict[int, int] = defaultdict(int)


class MapCheck:
    """Compares the planned maps with a Reconciler's mirror, one bounded step at a time."""

    def __init__(self, reconciler: Reconciler, chunk: int = CHECK_CHUNK):
        self.rec = reconciler
        self.chunk = chunk
        self.restart()

    def restart(self) -> None:
        """Begin a new cycle at the first map (after a full reconcile: it compared everything)."""
        self._next_map = 0
        self._pass: _Pass | None = None
        self._cycle_work = sum(self._map_work(name) for name in CHECKED_MAPS)

    def _map_work(self, name: str) -> int:
        if name == FILTER:
            return L.FE_FILTER_WORDS
        if name in SET_MAPS:
            table = self.rec.sets[name]
            return table.entries + len(table.complete)
        return 2 * len(self.rec.mirror[name])

    def step(self) -> CheckStep:
        """One bounded part of the cycle: one part of a map read and compared, or one part of
        what its pass has not read checked."""
        p = self._pass
        if p is None:
            name = CHECKED_MAPS[self._next_map]
            if name == FILTER:  # an array: every word is read, nothing is left to look up
                expected = []
            elif name in SET_MAPS:
                expected = list(self.rec.sets[name].complete)
            else:
                expected = list(self.rec.mirror[name])
            p = self._pass = _Pass(name, iter(self.rec.maps[name].chunks(self.chunk)), expected)
        is_set = p.name in SET_MAPS
        if p.reader is not None:
            part = next(p.reader, None)
            if part is not None:
                if p.name == FILTER:
                    wrong = self._read_filter(part)
                else:
                    wrong = self._read_sets(p, part) if is_set else self._read_entries(p, part)
                return CheckStep(len(part), self._cycle_work, False, {p.name: wrong} if wrong else {})
            p.reader = None  # read to the end: check what was not read, from the next part on
        todo = p.expected[p.position:p.position + self.chunk]
        p.position += len(todo)
        wrong = 0
        if todo:
            wrong = self._finish_sets(p, todo) if is_set else self._finish_entries(p, todo)
        drift = {p.name: wrong} if wrong else {}
        if p.position < len(p.expected):
            return CheckStep(len(todo), self._cycle_work, False, drift)
        self._pass = None
        self._next_map += 1
        if self._next_map < len(CHECKED_MAPS):
            return CheckStep(len(todo), self._cycle_work, False, drift)
        cycle_work = self._cycle_work
        self.restart()
        return CheckStep(len(todo), cycle_work, True, drift)

    # --- the frontend filter ------------------------------------------------------------------

    def _read_filter(self, part: list[tuple[bytes, bytes]]) -> int:
        word_of, wrong = self.rec.filter_word, 0
        for key, value in part:
            if E.U64.unpack(value)[0] != word_of(E.U32.unpack(key)[0]):
                wrong += 1
        return wrong

    # --- maps mirrored entry by entry --------------------------------------------------------

    def _read_entries(self, p: _Pass, part: list[tuple[bytes, bytes]]) -> int:
        mirror, short = self.rec.mirror[p.name], p.name in E.SHORT_VALUE_SIZES
        seen, wrong = p.seen, 0
        for key, value in part:
            want = mirror.get(key)
            if want is not None and want == (value.rstrip(b"\0") if short else value):
                seen.add(key)
            else:
                wrong += 1  # another value, or a key we never wrote (or deleted)
        return wrong

    def _finish_entries(self, p: _Pass, keys: list[bytes]) -> int:
        name = p.name
        mirror, short, wrong = self.rec.mirror[name], name in E.SHORT_VALUE_SIZES, 0
        for key in keys:
            want = mirror.get(key)
            if want is None or key in p.seen:
                continue  # deleted by the writer since the pass began, or read and matched
            value = self.rec.maps[name].lookup(key)
            if value is None or want != (value.rstrip(b"\0") if short else value):
                wrong += 1
        return wrong

    # --- maps mirrored per endpoint set ------------------------------------------------------

    def _read_sets(self, p: _Pass, part: list[tuple[bytes, bytes]]) -> int:
        table = self.rec.sets[p.name]
        complete, ragged, sums = table.complete, table.ragged, p.sums
        if p.name == "endpoints":
            return self._read_endpoints(part, complete, ragged, sums)
        layout, wrong = table.layout, 0
        size = layout.record_size
        for key, value in part:
            parsed = layout.parse(key, value)
            if parsed is None:
                wrong += 1  # not in the form we write
                continue
            sid, index, record = parsed
            blob = complete.get(sid)
            if blob is None:
                if sid not in ragged:
                    wrong += 1  # a set we never wrote, or deleted
            elif blob_record(blob, index, size) != record:
                wrong += 1
            else:
                sums[sid] += _ONE
        return wrong

    @staticmethod
    def _read_endpoints(part, complete, ragged, sums) -> int:
        """The endpoints map's part of _read_sets, written out: it is most of the entries (10 per
        Service), and this loop most of the check's time. The terms are reconcile.records_digest's."""
        unpack, mask, wrong = E.EP_KEY_READ.unpack, DIGEST_MASK, 0
        for key, value in part:
            sid, index, pad = unpack(key)
            count = complete.get(sid)
            if pad or count is None or index >= count:
                if pad or count is not None or sid not in ragged:
                    wrong += 1  # not our form, an index past the set, a set we never wrote
                continue
            sums[sid] += _ONE + (hash(value) & mask) * (2 * index + 1)
        return wrong

    def _finish_sets(self, p: _Pass, sids: list[int]) -> int:
        name = p.name
        table = self.rec.sets[name]
        wrong = 0
        for sid in sids:
            kept = table.complete.get(sid)
            if kept is None:
                continue  # deleted by the writer since the pass began
            count = table.layout.kept_count(kept)
            digest = table.digests.get(sid, 0)
            if p.sums.get(sid) == count * _ONE + digest:
                continue
            # Read in part (rewritten after the read passed it?) or with other content: look
            # its entries up one by one.
            if not self._set_holds(name, sid, kept, digest):
                wrong += 1
        return wrong

    def _set_holds(self, name: str, sid: int, kept, digest: int) -> bool:
        table, m = self.rec.sets[name], self.rec.maps[name]
        if name == "members":
            return all(m.lookup(key) == value for key, value in table.layout.entries(sid, kept))
        records = [m.lookup(key) for key in table.layout.kept_keys(sid, kept)]
        return None not in records and records_digest(records) == digest


def blob_record(blob: bytes, index: int, size: int) -> bytes | None:
    """Record `index` of a set's blob, None past its end."""
    start = index * size
    return blob[start:start + size] if start + size <= len(blob) else None
