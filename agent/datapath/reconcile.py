"""Reconciler: the only code that writes the datapath's maps.

Role: make the planned maps (layout.PLANNED_MAPS) hold a MapImage (`full`) or the part of it a
StateDelta names (`apply`), in an order that never lets a concurrent connect() see a mix of old
and new for a frontend. It keeps a mirror of what it believes is in each map (read at adoption
and at every full reconcile, updated on every write) so an incremental change costs in
proportion to the change, not to the table.

It touches maps only through the `MapIO` interface: bpfsys.Map in the agent, `DictMap` (an
in-memory stand-in, named as such) in the unit tests and the benchmark. A full reconcile runs
with the garbage collector paused (agent.gcpause): it adds a mirror entry per map entry.

Write order (the one rule of this module; each step uses batch operations):

    1. endpoints + members of new endpoint sets     nothing names them yet: invisible
    2. groups                                       one atomic flip per group to its new set
    3. clients, names                               scopes of new pods; display names
    4. frontends, consumer-scoped before default    one atomic update per frontend; a default
                                                    entry gains FE_HAS_SCOPES only after its
                                                    scoped entries exist
    5. delete stale frontends
    6. delete stale groups (only those no frontend in the maps still names)
    7. delete stale sets' endpoints and members (only sets no group in the maps still names)

Deleting last also keeps old sets readable for a while after the flip: a program that read a
group value just before the flip still finds the endpoints that value named.

Overflow (SEMANTICS D4): capacity is checked before anything of a group or frontend is written,
counting the peak (old entries are deleted only in steps 5-7). A group whose new set does not
fit keeps its old state and so does every frontend that would need it; everything else is still
written, and a MapFullError naming the map and the MapSizes field is raised at the end. The
stale entries deleted at the end free room, so a retry can succeed on its own.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol

from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.errors import TransientError
from agent.gcpause import gc_paused
from agent.model import DEFAULT_SCOPE, DesiredState, FrontendKey, StateDelta


class MapIO(Protocol):
    """What the reconciler needs of a map. Keys and values are bytes of the map's exact sizes."""

    name: str
    max_entries: int

    def items(self) -> dict[bytes, bytes]: ...

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


class MapFullError(TransientError):
    """Some groups or frontends kept their old state because a map had no room for the new one."""

    def __init__(self, problems: dict[str, list[str]]):
        self.problems = problems
        parts = []
        for map_name, what in sorted(problems.items()):
            field_name = L.MAP_SPECS[map_name].size_field
            shown = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
            parts.append(f"map {map_name} is full (MapSizes.{field_name}); kept the old state of {shown}")
        super().__init__("; ".join(parts) + "; hint: raise the size setting (then `meshlet uninstall` "
                         "and restart, pinned maps keep their size)")


@dataclass
class ReconcileStats:
    mode: str  #: "full" or "incremental"
    seconds: float = 0.0
    ops: Counter = field(default_factory=Counter)  #: (map, "update" | "delete") -> entries


def _group_set(value: bytes) -> tuple[int, int]:
    """(set_id, count) of a groups-map value."""
    sid, count, _affinity, _verdict = P.group_value_fields(value)
    return sid, count


#: set_id of an endpoints or members key (its first 8 bytes, host order).
_ep_set = P.key_set_id


def _frontend_groups(value: bytes) -> set[bytes]:
    """groups-map keys a frontend value names (rejected shares, id 0, name none)."""
    _route, gids = P.frontend_value_refs(value)
    return {P.u64_bytes(gid) for gid in gids if gid}


#: The maps whose entries name other entries (groups and names); _track ignores the others.
_REFERRING_MAPS = ("groups", "frontends", "clients")


def _references(name: str, key: bytes, value: bytes) -> tuple[set[bytes], set[bytes]]:
    """(groups keys, names keys) an entry of a planned map refers to: the groups a frontend
    splits over, and the ids whose names it shows (group, route, scope ids). One decode of the
    entry for both, because _track runs for every frontend of the state on a full sync."""
    if name == "groups":
        return set(), {key}
    if name == "frontends":
        route, gids = P.frontend_value_refs(value)
        scope = P.frontend_key_scope(key)
        names = {P.u64_bytes(ident) for ident in (scope, route) if ident}
        return {P.u64_bytes(gid) for gid in gids if gid}, names
    if name == "clients":
        return set(), {P.u64_bytes(P.client_value_scope(value))}
    return set(), set()


class _Refs:
    """Who uses what: target key -> user keys, kept in step with every write."""

    def __init__(self):
        self.users: dict[bytes, set] = {}
        self.orphaned: set[bytes] = set()  #: targets whose last user went away

    def add(self, target: bytes, user) -> None:
        self.users.setdefault(target, set()).add(user)

    def remove(self, target: bytes, user) -> None:
        users = self.users.get(target)
        if users is not None:
            users.discard(user)
            if not users:
                del self.users[target]
                self.orphaned.add(target)

    def used(self, target: bytes) -> bool:
        return bool(self.users.get(target))


def _has_affinity(group_value: bytes) -> bool:
    return P.group_value_fields(group_value)[2] > 0


def _is_scoped(key: bytes) -> bool:
    return P.frontend_key_scope(key) != 0


class Reconciler:
    def __init__(self, maps: Mapping[str, MapIO]):
        missing = set(L.PLANNED_MAPS) - set(maps)
        if missing:
            raise ValueError(f"reconciler needs the maps {sorted(missing)}")
        self.maps = maps
        self.mirror: dict[str, dict[bytes, bytes]] = {}
        #: groups key -> frontends keys naming it (so a group still in use is never deleted)
        self._users = _Refs()
        #: names key -> (map, key) of the groups, frontends and clients it names
        self._named = _Refs()
        #: (address, port, protocol) -> scopes with an entry in the state, for incremental planning
        self._family_scopes: dict[P.FamilyId, set[str]] | None = None
        #: scope id -> namespace, to refuse a collision in incremental plans too
        self._scope_names: dict[int, str] = {}
        self.adopt()

    # --- mirror ----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Read what is in the maps (pinned state of an earlier agent, or drift)."""
        self.mirror = {name: self.maps[name].items() for name in L.PLANNED_MAPS}
        self._users, self._named = _Refs(), _Refs()
        for name in ("groups", "frontends", "clients"):
            for key, value in self.mirror[name].items():
                self._track(name, key, None, value)
        self._named.orphaned.clear()

    def _track(self, name: str, key: bytes, old: bytes | None, new: bytes | None) -> None:
        """Keep the reference indexes in step with one entry going from `old` to `new`."""
        if old is not None:
            groups, names = _references(name, key, old)
            for g in groups:
                self._users.remove(g, key)
            for n in names:
                self._named.remove(n, (name, key))
        if new is not None:
            groups, names = _references(name, key, new)
            for g in groups:
                self._users.add(g, key)
            for n in names:
                self._named.add(n, (name, key))

    def counts(self) -> dict[str, int]:
        return {name: len(entries) for name, entries in self.mirror.items()}

    # --- entry points ------------------------------------------------------------------------

    def full(self, image: P.MapImage, state: DesiredState | None = None) -> ReconcileStats:
        """Make the maps equal the image: write what differs, sweep every stale entry."""
        with gc_paused():  # the mirror gains an entry per map entry: see agent.gcpause
            return self._full(image, state)

    def _full(self, image: P.MapImage, state: DesiredState | None) -> ReconcileStats:
        stats = ReconcileStats("full")
        start = time.monotonic()
        self.adopt()  # a full reconcile also repairs what changed behind our back
        drop = {name: set(self.mirror[name]) - set(image[name]) for name in L.PLANNED_MAPS}
        self._write(image, drop, old_groups=None, stats=stats)
        self._family_scopes = P.scopes_by_family(state.frontends) if state is not None else None
        if state is not None:
            self._scope_names = {P.scope_id(ns): ns for ns in self._namespaces(state.frontends, state)}
        stats.seconds = time.monotonic() - start
        return stats

    def apply(self, state: DesiredState, delta: StateDelta, pod_cgroups: Mapping[str, int]) -> ReconcileStats:
        """Plan and write only what `delta` names (plus every client: a node has few pods)."""
        stats = ReconcileStats("incremental")
        start = time.monotonic()
        if self._family_scopes is None:
            self._family_scopes = P.scopes_by_family(state.frontends)
        want: P.MapImage = P.empty_image()
        drop: dict[str, set[bytes]] = {name: set() for name in L.PLANNED_MAPS}
        old_groups: dict[bytes, bytes] = {}

        for gk in sorted(delta.groups):
            gkey = P.group_key_bytes(gk)
            old = self.mirror["groups"].get(gkey)
            if old is not None:
                old_groups[gkey] = old
            group = state.groups.get(gk)
            if group is None:
                drop["groups"].add(gkey)
                continue
            entries = P.plan_group(group)
            want["groups"][entries.key] = entries.value
            want["endpoints"].update(entries.endpoints)
            want["members"].update(entries.members)
            want["names"].update(entries.names)

        families: dict[P.FamilyId, set[str]] = {}
        for key in delta.frontends:
            families.setdefault(P.family_id(key), set()).add(key.scope)
        namespaces = {k.scope for k in delta.frontends if k.scope != DEFAULT_SCOPE}
        namespaces |= {pod.namespace for pod in state.clients.values()}
        self._check_scopes(namespaces)
        for fam in sorted(families):
            known = self._family_scopes.setdefault(fam, set())
            for scope in families[fam]:
                if P.FrontendKey(*fam, scope) in state.frontends:
                    known.add(scope)
                else:
                    known.discard(scope)
            entries, owned, names = P.plan_frontend_family(state, fam, known | families[fam])
            want["frontends"].update(entries)
            want["names"].update(names)
            drop["frontends"] |= owned - set(entries)
            if not known:
                del self._family_scopes[fam]

        clients = self._plan_clients(state, pod_cgroups)
        want["clients"] = clients["clients"]
        want["names"].update(clients["names"])
        drop["clients"] = set(self.mirror["clients"]) - set(want["clients"])

        self._write(want, drop, old_groups=old_groups, stats=stats)
        stats.seconds = time.monotonic() - start
        return stats

    # --- planning helpers --------------------------------------------------------------------

    @staticmethod
    def _namespaces(frontends: Iterable[FrontendKey], state: DesiredState) -> set[str]:
        names = {k.scope for k in frontends if k.scope != DEFAULT_SCOPE}
        return names | {pod.namespace for pod in state.clients.values()}

    def _check_scopes(self, namespaces: Iterable[str]) -> None:
        for ns in namespaces:
            sid = P.scope_id(ns)
            other = self._scope_names.setdefault(sid, ns)
            if other != ns:
                P.check_scope_ids([other, ns])  # raises PlanError naming both

    @staticmethod
    def _plan_clients(state: DesiredState, pod_cgroups: Mapping[str, int]) -> P.MapImage:
        out: P.MapImage = {"clients": {}, "names": {}}
        for uid in sorted(state.clients):
            cgroup = pod_cgroups.get(uid)
            if cgroup is None:
                continue
            key, value, names = P.plan_client(state.clients[uid], cgroup)
            out["clients"][key] = value
            out["names"].update(names)
        return out

    # --- writing -----------------------------------------------------------------------------

    def _write(self, want: P.MapImage, drop: dict[str, set[bytes]], old_groups: dict[bytes, bytes] | None,
               stats: ReconcileStats) -> None:
        """Steps 1-7 of the module docstring.

        old_groups: the touched groups' values before this write (incremental), whose sets are
        the only candidates for step 7; None sweeps every set no group names (full).
        """
        full: dict[str, list[str]] = {}  # map -> what kept its old state for lack of room there
        mirror = self.mirror

        # 1-2. New endpoint sets, then the group flips, admitted group by group while they fit.
        by_set: dict[int, tuple[list, list]] = {}  # set id -> (endpoints entries, members entries)
        for name, slot in (("endpoints", 0), ("members", 1)):
            current = mirror[name]
            for key, value in want[name].items():  # every endpoint of the state on a full sync
                if current.get(key) != value:
                    sid = _ep_set(key)
                    lists = by_set.get(sid)
                    if lists is None:
                        lists = by_set[sid] = ([], [])
                    lists[slot].append((key, value))
        room = {name: self._room(name) for name in ("endpoints", "members", "groups")}
        write_sets: dict[str, list] = {"endpoints": [], "members": [], "groups": []}
        refused_groups: set[bytes] = set()
        for gkey, value in sorted(want["groups"].items()):
            if mirror["groups"].get(gkey) == value:
                continue
            eps, members = by_set.pop(_group_set(value)[0], ([], []))
            need = {"endpoints": self._new_keys("endpoints", eps), "members": self._new_keys("members", members),
                    "groups": 0 if gkey in mirror["groups"] else 1}
            short = [name for name, n in need.items() if n > room[name]]
            if short:
                refused_groups.add(gkey)
                full.setdefault(short[0], []).append(self._group_name(gkey, want))
                continue
            for name, n in need.items():
                room[name] -= n
            write_sets["endpoints"] += eps
            write_sets["members"] += members
            write_sets["groups"].append((gkey, value))
        # Entries of sets whose group value is unchanged (e.g. a repaired drift): no flip needed.
        for eps, members in by_set.values():
            write_sets["endpoints"] += eps
            write_sets["members"] += members
        for name in ("endpoints", "members", "groups"):
            self._update(name, write_sets[name], stats)

        # 3. Clients and names.
        for name in ("clients", "names"):
            changed = [(k, v) for k, v in sorted(want[name].items()) if mirror[name].get(k) != v]
            fits = self._room(name)
            new = [kv for kv in changed if kv[0] not in mirror[name]]
            if len(new) > fits:
                skipped = new[fits:]
                skip_keys = {k for k, _ in skipped}
                changed = [kv for kv in changed if kv[0] not in skip_keys]
                full.setdefault(name, []).append(f"{len(skipped)} {name} entries")
            self._update(name, changed, stats)

        # 4. Frontends: scoped before default, only those whose groups are all in their new
        # state (a frontend needing a refused group keeps its old value).
        changed = [(k, v) for k, v in want["frontends"].items() if mirror["frontends"].get(k) != v]
        changed.sort(key=lambda kv: (not _is_scoped(kv[0]), kv[0]))
        ready, room_fe = [], self._room("frontends")
        for key, value in changed:
            groups = _frontend_groups(value)
            if any(g not in mirror["groups"] or g in refused_groups for g in groups):
                full.setdefault("groups", []).append(f"frontend {self._frontend_name(key)}")
                continue
            if key not in mirror["frontends"]:
                if room_fe <= 0:
                    full.setdefault("frontends", []).append(f"frontend {self._frontend_name(key)}")
                    continue
                room_fe -= 1
            ready.append((key, value))
        self._update("frontends", ready, stats)

        # 5. Stale frontends.
        self._delete("frontends", [k for k in drop["frontends"] if k not in want["frontends"]], stats)

        # 6. Stale groups nobody names any more.
        self._delete("groups", [k for k in drop["groups"]
                                if k not in want["groups"] and not self._users.used(k)], stats)

        # 7. Stale sets: endpoints of a set no group value in the map names, and members of a
        # set whose group has no affinity (any more). A set id hashes its group id, so only its
        # own group can name it: the incremental case looks at the touched groups alone.
        if old_groups is None:
            live = {_group_set(v)[0]: v for v in mirror["groups"].values()}
            candidates = {name: [k for k in mirror[name] if k not in want[name]]
                          for name in ("endpoints", "members")}
        else:
            live = {}
            for gkey in old_groups:
                value = mirror["groups"].get(gkey)
                if value is not None:
                    live[_group_set(value)[0]] = value
            candidates = self._set_entries(old_groups.values())
        for name in ("endpoints", "members"):
            stale = []
            for key in candidates[name]:
                if key in want[name]:
                    continue
                owner = live.get(_ep_set(key))
                if owner is None or (name == "members" and not _has_affinity(owner)):
                    stale.append(key)
            self._delete(name, stale, stats)

        self._delete("clients", [k for k in drop["clients"] if k not in want["clients"]], stats)
        # Names nothing shows any more: those a full reconcile does not plan, and those whose
        # last user went away during this write.
        orphans = drop["names"] | self._named.orphaned
        self._named.orphaned = set()
        self._delete("names", [k for k in orphans if k not in want["names"] and not self._named.used(k)], stats)

        if full:
            raise MapFullError(full)

    def _set_entries(self, group_values: Iterable[bytes]) -> dict[str, list[bytes]]:
        """endpoints and members keys in the map for the sets these group values name."""
        out: dict[str, list[bytes]] = {"endpoints": [], "members": []}
        endpoints = self.mirror["endpoints"]
        for value in group_values:
            sid, count = _group_set(value)
            for index in range(count):
                key = P.ep_key_bytes(sid, index)
                ep = endpoints.get(key)
                if ep is None:
                    continue
                out["endpoints"].append(key)
                out["members"].append(P.member_key_bytes(sid, ep))
        return out

    def _room(self, name: str) -> int:
        return self.maps[name].max_entries - len(self.mirror[name])

    def _new_keys(self, name: str, entries: list[tuple[bytes, bytes]]) -> int:
        mirror = self.mirror[name]
        return sum(1 for k, _ in entries if k not in mirror)

    def _update(self, name: str, entries: list[tuple[bytes, bytes]], stats: ReconcileStats) -> None:
        if not entries:
            return
        try:
            self.maps[name].update_batch(entries)
        except OSError:
            self.mirror[name] = self.maps[name].items()  # what reached the map is now unknown
            self._reindex(name)
            raise
        mirror = self.mirror[name]
        if name in _REFERRING_MAPS:
            for key, value in entries:
                self._track(name, key, mirror.get(key), value)
        mirror.update(entries)
        stats.ops[(name, "update")] += len(entries)

    def _delete(self, name: str, keys: list[bytes], stats: ReconcileStats) -> None:
        keys = [k for k in keys if k in self.mirror[name]]
        if not keys:
            return
        try:
            self.maps[name].delete_batch(keys)
        except OSError:
            self.mirror[name] = self.maps[name].items()
            self._reindex(name)
            raise
        mirror = self.mirror[name]
        for key in keys:
            old = mirror.pop(key)
            if name in _REFERRING_MAPS:
                self._track(name, key, old, None)
        stats.ops[(name, "delete")] += len(keys)

    def _reindex(self, name: str) -> None:
        if name in ("groups", "frontends", "clients"):
            self.adopt()

    # --- names for errors ----------------------------------------------------------------------

    def _group_name(self, gkey: bytes, want: P.MapImage) -> str:
        raw = want["names"].get(gkey) or self.mirror["names"].get(gkey)
        if raw:
            return "group " + L.NameValue.from_buffer_copy(raw).name.decode(errors="replace")
        return f"group {int.from_bytes(gkey, 'little'):#x}"

    @staticmethod
    def _frontend_name(key: bytes) -> str:
        from agent.datapath.dump import format_frontend_key  # display only

        return format_frontend_key(L.FeKey.from_buffer_copy(key))
