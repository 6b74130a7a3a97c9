"""Plan: the exact bytes of every map entry for a DesiredState (pure: no bcc, no I/O).

Role: turn agent.model.DesiredState plus the pod cgroup ids into a `Plan` of the maps the agent
owns (layout.PLANNED_MAPS), and the same per object (one group, one frontend destination, one client)
so that an incremental sync plans only what a StateDelta names.

The Plan and its compact forms (an endpoint set as one blob, short values) are defined in
agent/datapath/entries.py, with every packed format: this module decides what the entries say.

`Planner` is the facade's planner: `full` plans everything, `change` plans only what a
StateDelta names (one endpoint change at 50k Services plans one group) and says which keys to
delete; the writer (reconcile.py) then only writes. Data flows one way: state -> plan -> writer.

Ids are hashes, not allocations: nothing to restore at start, and the same state always gives
the same bytes (golden tests compare text dumps of expanded plans).
- group_id = 64-bit hash of the GroupKey text;
- set_id = 64-bit hash of (group_id, the sorted endpoints): a content-addressed revision, so a
  changed endpoint set gets new keys and the old set stays readable until the group flips; the
  entries (set_id, index) of a set never change once written, which is what lets a plan hold a
  set as one blob and the reconciler's mirror as little as its count (SetLayout.kept);
- scope id = nonzero 32-bit hash of the namespace name; two namespaces in use with the same id
  are refused (PlanError) rather than silently sharing a view;
- route_id = 64-bit hash of the RouteRef text (only for names).

Each frontend slot carries a copy of its group's value (set_id, count, verdict, flags, affinity:
bpf/meshlet.h, struct fe_slot) so a connect needs no groups lookup; `group_value` is the one
function that makes that value, for the groups entry and for every copy.

Weighted split: shares of the same group are merged, rejected shares (group None) become one
slot with group_id 0, zero weights are dropped (an empty interval can never be drawn, so it
would only waste a slot). Thresholds are cumulative weights scaled to 2^31 with exact integer
arithmetic, floor(C_k * 2^31 / W): each share's probability is within 2^-31 of w_k / W whatever
the weights' magnitude, and the last threshold is exactly 2^31.

plan() pauses the garbage collector while it builds a full plan (agent.gcpause).
"""

from __future__ import annotations

import hashlib
import operator
import socket
from typing import Iterable, Mapping

from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath.entries import GroupPlan, Plan, PlanChange, addr16, endpoint_values, member_records, short_value
from agent.errors import UserError
from agent.gcpause import gc_paused
from agent.model import (
    DEFAULT_SCOPE,
    BackendGroup,
    ClientPod,
    DesiredState,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteRef,
    StateDelta,
    Verdict,
    WeightedGroup,
)


class PlanError(UserError):
    """The desired state cannot be expressed in the maps (too wide a split, an id collision)."""


# --- ids ---------------------------------------------------------------------------------------


def _hash64(domain: bytes, text: bytes) -> int:
    value = int.from_bytes(hashlib.blake2b(domain + b"\0" + text, digest_size=8).digest(), "little")
    return value or 1  # 0 means "none" (a rejected share, an empty set) in the maps


def group_id(key: GroupKey) -> int:
    return _hash64(b"group", str(key).encode())


def route_id(route: RouteRef) -> int:
    return _hash64(b"route", str(route).encode())


def scope_id(namespace: str) -> int:
    """The client scope of a namespace; 0 is the default view, so never 0."""
    if namespace == DEFAULT_SCOPE:
        return 0
    value = int.from_bytes(hashlib.blake2b(b"scope\0" + namespace.encode(), digest_size=4).digest(), "little")
    return value or 1


def set_id(gid: int, endpoints: Iterable[Endpoint]) -> int:
    text = ",".join([str(ep) for ep in endpoints]).encode()
    return _hash64(b"set", gid.to_bytes(8, "little") + text)


# --- the weighted split ------------------------------------------------------------------------


def split_slots(split: Iterable[WeightedGroup], group_ids: Mapping[GroupKey, int] | None = None
                ) -> list[tuple[int, int]]:
    """[(threshold, group_id)] for a split: see the module docstring for the rules.

    group_ids: ids already computed (a full plan hashes each group once), else hashed here.
    """
    merged: dict[int, int] = {}  # group_id (0 = reject) -> weight, in first-appearance order
    for share in split:
        if share.weight < 0:
            raise PlanError(f"negative weight {share.weight} in a split; resolve must never produce one")
        if share.weight == 0:
            continue
        if share.group is None:
            gid = 0
        else:
            gid = group_ids.get(share.group) if group_ids is not None else None
            if gid is None:
                gid = group_id(share.group)
        merged[gid] = merged.get(gid, 0) + share.weight
    total = sum(merged.values())
    slots = []
    cumulative = 0
    for gid, weight in merged.items():
        cumulative += weight
        slots.append((cumulative * L.THRESHOLD_SCALE // total, gid))
    return slots


# --- per-object entries ------------------------------------------------------------------------


def _name_value(text: str) -> bytes:
    """A names-map value, short: at most NAME_LEN - 1 bytes, so the last byte of the exact value
    stays NUL (C reads it as a string)."""
    return short_value(text.encode()[: L.NAME_LEN - 1])


def group_key_bytes(key: GroupKey) -> bytes:
    return E.U64.pack(group_id(key))


def group_value(group: BackendGroup, gid: int | None = None) -> bytes:
    """The groups-map value of a group (gid: its group_id when already computed). Frontend
    slots carry a copy of it (struct fe_slot)."""
    flags = L.GROUP_PASSIVE_HEALTH if group.passive_health else 0
    if group.verdict != Verdict.FORWARD or not group.endpoints:
        verdict = Verdict.REJECT if group.verdict == Verdict.FORWARD else group.verdict
        return E.GROUP_VALUE.pack(0, 0, group.affinity_timeout, int(verdict), flags)
    sid = set_id(group_id(group.key) if gid is None else gid, group.endpoints)
    return E.GROUP_VALUE.pack(sid, len(group.endpoints), group.affinity_timeout, int(group.verdict), flags)


def plan_group(group: BackendGroup) -> GroupPlan:
    text = str(group.key)
    gid = _hash64(b"group", text.encode())  # group_id(group.key), the text made once
    name = _name_value(text)
    value = group_value(group, gid)
    if group.verdict != Verdict.FORWARD or not group.endpoints:
        return GroupPlan(E.U64.pack(gid), value, 0, b"", b"", name)
    sid = E.group_value_fields(value)[0]
    blob = endpoint_values(group.endpoints)
    # Members answer "is this endpoint in the current set": the affinity check asks it, and so
    # does an unconnected UDP socket's remembered choice when its group's set moved (A16).
    members = member_records(blob) if group.affinity_timeout or group.key.protocol == "UDP" else b""
    return GroupPlan(E.U64.pack(gid), value, sid, blob, members, name)


def frontend_key_bytes(address: str, port: int, protocol: str, scope: str) -> bytes:
    return E.FE_KEY.pack(addr16(address), socket.htons(port), L.PROTO_NUMBERS[protocol], scope_id(scope))


def _frontend_value_used(verdict: int, flags: int, route: int, slots: list[tuple[int, int]],
                         group_values: Mapping[int, bytes]) -> bytes:
    """A fe_value's head and used slots: the exact value without the unused slots' zeros."""
    return E.FE_VALUE_HEAD.pack(verdict, len(slots), flags, route) + b"".join(
        [E.fe_slot_bytes(threshold, gid, group_values.get(gid)) for threshold, gid in slots])


def plan_frontend(key: FrontendKey, fe: FrontendState, has_scopes: bool, group_values: Mapping[int, bytes],
                  group_ids: Mapping[GroupKey, int] | None = None, slots: list[tuple[int, int]] | None = None
                  ) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key bytes, value bytes, name entries) of one frontend entry; value and names short.

    has_scopes: set FE_HAS_SCOPES on a default entry whose frontend has consumer-scope entries.
    group_values: group_id -> groups-map value, for the copy each slot carries (a group not in
    it is copied as VERDICT_NO_GROUP). group_ids: see split_slots. slots: split_slots(fe.split)
    when the caller has it already.
    """
    if slots is None:
        slots = split_slots(fe.split, group_ids)
    if len(slots) > L.MAX_SLOTS:
        raise PlanError(
            f"frontend {key} splits over {len(slots)} backend groups; the datapath holds at most "
            f"{L.MAX_SLOTS}: reduce the route's backendRefs")
    names: dict[bytes, bytes] = {}
    rid = 0
    if fe.route is not None:
        rid = route_id(fe.route)
        names[E.U64.pack(rid)] = _name_value(str(fe.route))
    if key.scope != DEFAULT_SCOPE:
        names[E.U64.pack(scope_id(key.scope))] = _name_value(key.scope)
    value = _frontend_value_used(L.VERDICT_FORWARD if slots else L.VERDICT_REJECT,
                                 L.FE_HAS_SCOPES if has_scopes and key.scope == DEFAULT_SCOPE else 0, rid, slots,
                                 group_values)
    return frontend_key_bytes(key.address, key.port, key.protocol, key.scope), short_value(value), names


#: A destination: the default entry and every consumer-scope entry of one (address, port,
#: protocol). The unit of incremental frontend planning, because FE_HAS_SCOPES on the default
#: entry depends on its scoped siblings. (Not an address family: that is GroupKey.family.)
Destination = tuple[str, int, str]


def destination_of(key: FrontendKey) -> Destination:
    return (key.address, key.port, key.protocol)


def scoped_destinations(frontends: Iterable[FrontendKey]) -> dict[Destination, set[str]]:
    """The consumer scopes (not the default) of each destination that has any: few do."""
    index: dict[Destination, set[str]] = {}
    for key in frontends:
        if key.scope != DEFAULT_SCOPE:
            index.setdefault(destination_of(key), set()).add(key.scope)
    return index


def split_groups(fe: FrontendState) -> Iterable[GroupKey]:
    """The backend groups a frontend's split names (not the rejected shares)."""
    return [share.group for share in fe.split if share.group is not None]


def add_group_values(state: DesiredState, frontends: Iterable[FrontendState], values: dict[int, bytes]) -> None:
    """Put into `values` (group_id -> groups-map value) every group these frontends name that
    is in the state and not in `values` yet."""
    for fe in frontends:
        for gk in split_groups(fe):
            gid = group_id(gk)
            if gid not in values and gk in state.groups:
                values[gid] = group_value(state.groups[gk], gid)


def plan_destination(state: DesiredState, dest: Destination, scopes: Iterable[str],
                     group_values: dict[int, bytes] | None = None
                     ) -> tuple[dict[bytes, bytes], set[bytes], dict[bytes, bytes]]:
    """Entries of one frontend destination, looking at the candidate `scopes` (plus the default).

    group_values: group_id -> groups-map value already computed; the groups these entries
    name that it lacks are computed from the state and added to it.
    Returns (entries, owned keys, name entries), values short: owned keys are the frontends-map
    keys this destination covers, so a key owned but not planned is to be deleted.
    """
    address, port, protocol = dest
    candidates = set(scopes) | {DEFAULT_SCOPE}
    present = {s for s in candidates if FrontendKey(address, port, protocol, s) in state.frontends}
    has_scopes = any(s != DEFAULT_SCOPE for s in present)
    entries: dict[bytes, bytes] = {}
    names: dict[bytes, bytes] = {}
    owned = {frontend_key_bytes(address, port, protocol, s) for s in candidates}
    values = {} if group_values is None else group_values
    add_group_values(state, [state.frontends[FrontendKey(address, port, protocol, s)] for s in present], values)
    for scope in sorted(present):
        key = FrontendKey(address, port, protocol, scope)
        kb, vb, nm = plan_frontend(key, state.frontends[key], has_scopes, values)
        entries[kb] = vb
        names.update(nm)
    return entries, owned, names


def client_key_bytes(cgroup_id: int) -> bytes:
    return E.U64.pack(cgroup_id)


def plan_client(pod: ClientPod, cgroup_id: int) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key, value, name entries) of one client pod: its scope's name and its own; names short."""
    scope = scope_id(pod.namespace)
    return (client_key_bytes(cgroup_id), E.CLIENT_VALUE.pack(scope, L.CLIENT_SKIP if pod.skip else 0),
            {E.U64.pack(scope): _name_value(pod.namespace),
             E.pod_name_key(cgroup_id): _name_value(f"{pod.namespace}/{pod.name}")})


def plan_config(clients: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The config map's one entry, from the clients entries planned: CONFIG_CLIENT_SKIPS iff a
    pod here opted out (the programs then look for every client's pod, bpf/meshlet.h)."""
    skips = any(E.CLIENT_VALUE.unpack(value)[1] & L.CLIENT_SKIP for value in clients.values())
    return {E.U32.pack(L.CONFIG_KEY): E.CONFIG_VALUE.pack(L.CONFIG_CLIENT_SKIPS if skips else 0)}


def check_scope_ids(namespaces: Iterable[str]) -> None:
    """Refuse two namespaces in use whose scope ids collide (one would see the other's view)."""
    seen: dict[int, str] = {}
    for ns in sorted(set(namespaces)):
        sid = scope_id(ns)
        other = seen.get(sid)
        if other is not None and other != ns:
            raise PlanError(
                f"namespaces {other!r} and {ns!r} hash to the same client scope id {sid:#x}; "
                "rename one of them or report this to the meshlet maintainers")
        seen[sid] = ns


# --- the whole plan ----------------------------------------------------------------------------


#: GroupKey's own order (its fields in order), as a C-level tuple key: sorting 50k GroupKeys with
#: the dataclass's __lt__ costs a Python call per comparison.
_group_order = operator.attrgetter("namespace", "service", "port_name", "protocol", "family")


def _group_item_order(item: tuple[GroupKey, BackendGroup]) -> tuple:
    return _group_order(item[0])


#: group_id -> the frontend keys whose entries copy that group's value (struct fe_slot): one
#: key, or a tuple of several (no container for the usual single user).
Copies = dict[int, "FrontendKey | tuple[FrontendKey, ...]"]


def add_copy(copies: Copies, gid: int, key: FrontendKey) -> None:
    users = copies.get(gid)
    if users is None:
        copies[gid] = key
    elif type(users) is tuple:
        if key not in users:
            copies[gid] = users + (key,)
    elif users != key:
        copies[gid] = (users, key)


def plan(state: DesiredState, pod_cgroups: Mapping[str, int], copies: Copies | None = None) -> Plan:
    """The full plan of the planned maps for a state and the pod cgroup ids (uid -> id).

    Groups are planned in GroupKey order (the order the reconciler admits them in when a map is
    full), frontends and clients in the state's order. copies: filled with which frontends copy
    which group (Planner keeps it), while the splits are at hand.
    """
    with gc_paused():  # builds a few objects per Service at once: see agent.gcpause
        return _plan(state, pod_cgroups, {} if copies is None else copies)


def _plan(state: DesiredState, pod_cgroups: Mapping[str, int], copies: Copies) -> Plan:
    out = Plan()
    check_scope_ids([k.scope for k in state.frontends if k.scope != DEFAULT_SCOPE]
                    + [pod.namespace for pod in state.clients.values()])
    group_ids: dict[GroupKey, int] = {}
    group_values: dict[int, bytes] = {}
    owners: dict[int, GroupKey] = {}
    for gk, backend in sorted(state.groups.items(), key=_group_item_order):
        group = plan_group(backend)
        gid = group_ids[gk] = E.U64.unpack(group.key)[0]  # group_id(gk), without hashing it again
        if gid in owners:
            raise PlanError(f"backend groups {owners[gid]} and {gk} hash to the same id {gid:#x}")
        owners[gid] = gk
        group_values[gid] = group.value
        out.add_group(group)
    # Each entry on its own (plan_destination's result without its set algebra): a default
    # entry needs only to know whether its destination has scoped entries.
    scoped = scoped_destinations(state.frontends)
    frontends, names = out.frontends, out.names
    for key, fe in state.frontends.items():
        has_scopes = bool(scoped) and key.scope == DEFAULT_SCOPE and destination_of(key) in scoped
        slots = split_slots(fe.split, group_ids)
        kb, vb, fe_names = plan_frontend(key, fe, has_scopes, group_values, slots=slots)
        for _threshold, gid in slots:
            if gid:
                add_copy(copies, gid, key)
        frontends[kb] = vb
        if fe_names:
            names.update(fe_names)
    out.clients, client_names = plan_clients(state, pod_cgroups)
    names.update(client_names)
    out.config = plan_config(out.clients)
    return out


# --- the facade's planner: whole, or the part a delta names ------------------------------------


def _namespaces_in_use(frontends: Iterable[FrontendKey], state: DesiredState) -> set[str]:
    """Consumer namespaces of these frontend keys, and every client pod's namespace."""
    names = {k.scope for k in frontends if k.scope != DEFAULT_SCOPE}
    return names | {pod.namespace for pod in state.clients.values()}


def plan_clients(state: DesiredState, pod_cgroups: Mapping[str, int]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(clients entries, their names entries) of every pod with a cgroup here."""
    clients: dict[bytes, bytes] = {}
    names: dict[bytes, bytes] = {}
    for uid in sorted(state.clients):
        cgroup = pod_cgroups.get(uid)
        if cgroup is None:
            continue  # no cgroup on this node (yet): its processes are node processes
        key, value, pod_names = plan_client(state.clients[uid], cgroup)
        clients[key] = value
        names.update(pod_names)
    return clients, names


class Planner:
    """Plans for the writer: `full` (the whole state) or `change` (what a StateDelta names).

    Between calls it keeps three facts about the states it planned, which incremental planning
    needs and a delta does not carry: which destinations have consumer-scope entries (a
    destination's entries are replanned together, so a scope that left the state is deleted),
    which namespace each scope id stands for (a collision is refused in incremental plans too),
    and which destinations name each group (their slots copy the group's value, so a changed
    group replans them: one endpoint change rewrites its group and the few frontends using it).
    A full plan resets both from its state.
    """

    def __init__(self) -> None:
        #: (address, port, protocol) -> consumer scopes with an entry in the state, for the
        #: destinations that have any; None until a state was planned
        self._scoped: dict[Destination, set[str]] | None = None
        #: scope id -> namespace
        self._scope_names: dict[int, str] = {}
        #: Copies: the frontends whose destinations are replanned when a group changes. May
        #: name a key that no longer uses the group (only added to between full plans):
        #: replanning it then writes nothing new.
        self._copies: Copies | None = None

    def full(self, state: DesiredState, pod_cgroups: Mapping[str, int]) -> Plan:
        copies: Copies = {}
        out = plan(state, pod_cgroups, copies)
        self._scoped = scoped_destinations(state.frontends)
        self._scope_names = {scope_id(ns): ns for ns in _namespaces_in_use(state.frontends, state)}
        self._copies = copies
        return out

    def _add_copies(self, frontends: Iterable[tuple[FrontendKey, FrontendState]]) -> None:
        for key, fe in frontends:
            for gk in split_groups(fe):
                add_copy(self._copies, group_id(gk), key)

    def _users_of(self, gid: int) -> tuple[FrontendKey, ...]:
        users = self._copies.get(gid)
        return () if users is None else users if type(users) is tuple else (users,)

    def change(self, state: DesiredState, delta: StateDelta, pod_cgroups: Mapping[str, int]) -> PlanChange:
        """Plan the groups and frontend destinations `delta` names, and every client."""
        if self._scoped is None:
            self._scoped = scoped_destinations(state.frontends)
        if self._copies is None:
            self._copies = {}
            self._add_copies(state.frontends.items())
        change = PlanChange(Plan())
        want = change.want
        group_values: dict[int, bytes] = {}
        for gk in sorted(delta.groups):
            gkey = group_key_bytes(gk)
            change.touched_groups.append(gkey)
            group = state.groups.get(gk)
            if group is None:
                change.removed_groups.append(gkey)
            else:
                planned = plan_group(group)
                want.add_group(planned)
                group_values[E.U64.unpack(gkey)[0]] = planned.value

        self._check_scope_ids(_namespaces_in_use(delta.frontends, state))
        self._add_copies((key, state.frontends[key]) for key in delta.frontends if key in state.frontends)
        destinations: dict[Destination, set[str]] = {}
        for key in delta.frontends:
            destinations.setdefault(destination_of(key), set()).add(key.scope)
        # The entries that copy a changed group's value (a removed group's users change with it).
        for gk in delta.groups:
            if gk in state.groups:
                for key in self._users_of(group_id(gk)):
                    destinations.setdefault(destination_of(key), set())
        for dest in sorted(destinations):
            known = self._scoped.pop(dest, set())
            for scope in destinations[dest] - {DEFAULT_SCOPE}:
                if FrontendKey(*dest, scope) in state.frontends:
                    known.add(scope)
                else:
                    known.discard(scope)
            if known:
                self._scoped[dest] = known
            entries, owned, names = plan_destination(state, dest, known | destinations[dest], group_values)
            want.frontends.update(entries)
            want.names.update(names)
            change.removed_frontends += [key for key in owned if key not in entries]

        want.clients, client_names = plan_clients(state, pod_cgroups)
        want.names.update(client_names)
        want.config = plan_config(want.clients)
        return change

    def _check_scope_ids(self, namespaces: Iterable[str]) -> None:
        for ns in namespaces:
            sid = scope_id(ns)
            other = self._scope_names.setdefault(sid, ns)
            if other != ns:
                check_scope_ids([other, ns])  # raises PlanError naming both
