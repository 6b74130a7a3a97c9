"""Plan: the exact bytes of every map entry for a DesiredState (pure: no bcc, no I/O).

Role: turn agent.model.DesiredState plus the pod cgroup ids into a `Plan` of the maps the agent
owns (layout.PLANNED_MAPS), and the same per object (one group, one frontend family, one client)
so the reconciler can plan only what a StateDelta names: one endpoint change at 50k Services
plans one group.

A Plan is compact: one `GroupPlan` per backend group holds the group's entry and its whole
endpoint set as one blob (`SetLayout`), never one Python entry per endpoint (500k at 50k
Services); frontends and names keep their values without trailing zero bytes (`short_value`).
The reconciler expands a set into map entries only while writing it; `Plan.expand()` is the one
place a whole plan becomes {key: value} per map (tests, golden dumps, `meshlet explain`).

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

Weighted split: shares of the same group are merged, rejected shares (group None) become one
slot with group_id 0, zero weights are dropped (an empty interval can never be drawn, so it
would only waste a slot). Thresholds are cumulative weights scaled to 2^31 with exact integer
arithmetic, floor(C_k * 2^31 / W): each share's probability is within 2^-31 of w_k / W whatever
the weights' magnitude, and the last threshold is exactly 2^31.

Bytes are packed with struct.Struct formats (`_packer` below), not by filling layout's ctypes
objects: a full plan packs ~10 endpoints per Service and a precompiled pack is several times
faster than building and copying a ctypes structure. layout's ctypes classes stay the one mirror
of bpf/meshlet.h: each format is checked against its class at import (same size) and by a unit
test (same bytes). plan() pauses the garbage collector while it builds a full plan
(agent.gcpause).
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import operator
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from agent.datapath import layout as L
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
    Verdict,
    WeightedGroup,
)

#: map name -> {key bytes: value bytes}: every entry of a plan, expanded (Plan.expand).
MapImage = dict[str, dict[bytes, bytes]]


class PlanError(UserError):
    """The desired state cannot be expressed in the maps (too wide a split, an id collision)."""


# --- packers -------------------------------------------------------------------------------------


def _packer(mirror: type, fmt: str) -> struct.Struct:
    """A struct.Struct for layout class `mirror`. "=": native byte order like ctypes, no implicit
    padding (every pad byte of the C struct is an explicit "x"), so the bytes match field by
    field; the size check catches a field added to one but not the other."""
    packer = struct.Struct("=" + fmt)
    if packer.size != ct.sizeof(mirror):
        raise AssertionError(f"plan's format for {mirror.__name__} is {packer.size} bytes, layout says "
                             f"{ct.sizeof(mirror)}: update both together")
    return packer


_U64 = _packer(L.U64, "Q")
_U32 = _packer(L.U32, "I")
_EP_KEY = _packer(L.EpKey, "QI4x")  # set_id, index
_EP_KEY_READ = _packer(L.EpKey, "QII")  # set_id, index, pad (must be 0)
_EP_VALUE = _packer(L.EpValue, "16sHBx")  # addr, port (network order), family
# A member key is (set_id, the endpoint's addr and port): the first 18 bytes of its ep_value.
_MEMBER_KEY = _packer(L.MemberKey, "Q18s6x")  # set_id, addr + port (network order)
_MEMBER_KEY_READ = _packer(L.MemberKey, "Q18s6s")  # set_id, addr + port, pad (must be 0)
_GROUP_VALUE = _packer(L.GroupValue, "QIIB7x")  # set_id, count, affinity_timeout_s, verdict
_FE_KEY = _packer(L.FeKey, "16sHBxI")  # addr, port (network order), proto, scope
_FE_SLOT = _packer(L.FeSlot, "I4xQ")  # threshold, group_id
# fe_value is packed in parts (_frontend_value_used): its head, then the used slots. The
# _packer call only checks that head + slots is the size layout gives FeValue.
_FE_VALUE_HEAD = struct.Struct("=BBH4xQ")  # verdict, nslots, flags, route_id
_FE_VALUE_SIZE = _packer(L.FeValue, f"{_FE_VALUE_HEAD.size}x{L.MAX_SLOTS * _FE_SLOT.size}x").size
_CLIENT_VALUE = _packer(L.ClientValue, "II")  # scope, flags
_CONFIG_VALUE = _packer(L.ConfigValue, "I4x")  # flags
_NAME_VALUE = _packer(L.NameValue, f"{L.NAME_LEN}s")  # zero-padded, always NUL-terminated (see _name_value)

#: Bytes of an endpoint's address and port: the head of an ep_value, and what a member key holds
#: after its set_id (so a set's members are made from its endpoint blob).
_ADDR_PORT = L.EpValue.port.offset + L.EpValue.port.size
if L.MemberKey.port.offset + L.MemberKey.port.size - L.MemberKey.addr.offset != _ADDR_PORT:
    raise AssertionError("member_key must hold an ep_value's addr and port bytes as they are")


# --- short values --------------------------------------------------------------------------------

#: Maps whose values are mostly trailing zeros: a frontend uses 1 of its 16 slots most of the
#: time (272 bytes, ~32 used), a name ~30 of its 96 bytes. Plans and the reconciler's mirror keep
#: these values without their trailing zero bytes; full_value restores them before a write.
#: Lossless: all values of a map have the one size given here.
SHORT_VALUE_SIZES = {"frontends": _FE_VALUE_SIZE, "names": _NAME_VALUE.size}


def short_value(value: bytes) -> bytes:
    """A frontends or names value without its trailing zero bytes (see SHORT_VALUE_SIZES)."""
    return value.rstrip(b"\0")


def full_value(map_name: str, value: bytes) -> bytes:
    """The exact map value of a short value of map `map_name` (see SHORT_VALUE_SIZES)."""
    return value.ljust(SHORT_VALUE_SIZES[map_name], b"\0")


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


# --- addresses ---------------------------------------------------------------------------------


_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def addr16(address: str) -> bytes:
    """16 bytes of an address, IPv4 as ::ffff:a.b.c.d (the key form for both socket families).

    inet_pton rather than ipaddress: a full plan parses every endpoint (500k at 50k Services),
    and it is ten times faster. It also refuses what is not an address (OSError).
    """
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address)
    return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, address)


# --- reading entries back (the reconciler's reference tracking) --------------------------------


def group_value_fields(value: bytes) -> tuple[int, int, int, int]:
    """(set_id, count, affinity_timeout_s, verdict) of a groups-map value."""
    return _GROUP_VALUE.unpack(value)


def key_set_id(key: bytes) -> int:
    """set_id of an endpoints-map or members-map key (both start with it)."""
    return _U64.unpack_from(key)[0]


def frontend_value_refs(value: bytes) -> tuple[int, tuple[int, ...]]:
    """(route_id, group id of each used slot, 0 for a rejected share) of a frontends-map value,
    exact or short (short_value)."""
    value = full_value("frontends", value)
    _verdict, nslots, _flags, route = _FE_VALUE_HEAD.unpack_from(value)
    slot = _FE_SLOT.size
    return route, tuple(_FE_SLOT.unpack_from(value, _FE_VALUE_HEAD.size + i * slot)[1] for i in range(nslots))


def frontend_key_scope(key: bytes) -> int:
    """Client scope id of a frontends-map key (0 = the default view)."""
    return _FE_KEY.unpack(key)[3]


def client_value_scope(value: bytes) -> int:
    return _CLIENT_VALUE.unpack(value)[0]


def name_text(value: bytes) -> str:
    """The text of a names-map value, exact or short."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


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


# --- endpoint sets -----------------------------------------------------------------------------


class SetLayout:
    """How one endpoint set lies in a set-keyed map (endpoints, members), and its compact forms.

    In a plan a set is a blob of fixed-size records, record i being the set's index i; its
    entries are generated from (set_id, blob) when written and never kept. The reconciler's
    mirror keeps less (`kept`): only what names the set's keys, since a set_id stands for the
    set's content. `parse` reads an entry back; it answers None for an entry that is not in the
    form we write (a nonzero pad byte), which the reconciler treats as drift.
    """

    name: str
    record_size: int

    def entries(self, sid: int, blob: bytes) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError

    def key(self, sid: int, index: int, record: bytes) -> bytes:
        raise NotImplementedError

    def parse(self, key: bytes, value: bytes) -> tuple[int, int, bytes] | None:
        """(set_id, index, record) of an entry, None if it is not in the form we write."""
        raise NotImplementedError

    def count(self, blob: bytes) -> int:
        return len(blob) // self.record_size

    def kept(self, blob: bytes) -> int | bytes:
        """What the reconciler's mirror keeps of a set written as `blob`: equal for the same
        set (with the same set_id), and enough for kept_keys."""
        raise NotImplementedError

    def kept_keys(self, sid: int, kept: int | bytes) -> list[bytes]:
        raise NotImplementedError

    def kept_count(self, kept: int | bytes) -> int:
        raise NotImplementedError


class _EndpointSets(SetLayout):
    """endpoints: (set_id, index) -> ep_value. Record i = the ep_value of index i. The mirror
    keeps a set's count: its keys are (set_id, 0..count-1)."""

    name = "endpoints"
    record_size = _EP_VALUE.size

    def entries(self, sid: int, blob: bytes) -> list[tuple[bytes, bytes]]:
        pack, size = _EP_KEY.pack, self.record_size
        return [(pack(sid, index), blob[offset:offset + size])
                for index, offset in enumerate(range(0, len(blob), size))]

    def key(self, sid: int, index: int, record: bytes) -> bytes:
        return _EP_KEY.pack(sid, index)

    def parse(self, key: bytes, value: bytes) -> tuple[int, int, bytes] | None:
        sid, index, pad = _EP_KEY_READ.unpack(key)
        return None if pad else (sid, index, value)

    def kept(self, blob: bytes) -> int:
        return self.count(blob)

    def kept_keys(self, sid: int, kept: int) -> list[bytes]:
        pack = _EP_KEY.pack
        return [pack(sid, index) for index in range(kept)]

    def kept_count(self, kept: int) -> int:
        return kept


class _MemberSets(SetLayout):
    """members: (set_id, addr, port) -> index. Record i = the addr and port of index i (the
    first 18 bytes of its ep_value): see member_records. The mirror keeps the blob: the keys
    hold the addresses. (Only groups with affinity have members.)"""

    name = "members"
    record_size = _ADDR_PORT

    def entries(self, sid: int, blob: bytes) -> list[tuple[bytes, bytes]]:
        pack, index_bytes, size = _MEMBER_KEY.pack, _U32.pack, self.record_size
        return [(pack(sid, blob[offset:offset + size]), index_bytes(index))
                for index, offset in enumerate(range(0, len(blob), size))]

    def key(self, sid: int, index: int, record: bytes) -> bytes:
        return _MEMBER_KEY.pack(sid, record)

    def parse(self, key: bytes, value: bytes) -> tuple[int, int, bytes] | None:
        sid, record, pad = _MEMBER_KEY_READ.unpack(key)
        return None if pad.strip(b"\0") else (sid, _U32.unpack(value)[0], record)

    def kept(self, blob: bytes) -> bytes:
        return blob

    def kept_keys(self, sid: int, kept: bytes) -> list[bytes]:
        return [key for key, _index in self.entries(sid, kept)]

    def kept_count(self, kept: bytes) -> int:
        return self.count(kept)


ENDPOINT_SETS: SetLayout = _EndpointSets()
MEMBER_SETS: SetLayout = _MemberSets()
SET_LAYOUTS = {layout.name: layout for layout in (ENDPOINT_SETS, MEMBER_SETS)}


def endpoint_values(endpoints: Iterable[Endpoint]) -> bytes:
    """The ep_values of a set in index order, as one blob (ENDPOINT_SETS' compact form)."""
    # addr16 inlined into one list comprehension (no call per endpoint): this runs for
    # every endpoint of the cluster on a full plan. test_plan_packing checks both families.
    pack, htons, pton = _EP_VALUE.pack, socket.htons, socket.inet_pton
    v4, v6, mapped = socket.AF_INET, socket.AF_INET6, _MAPPED_PREFIX
    return b"".join([pack(pton(v6, ep.address), htons(ep.port), 6) if ":" in ep.address
                     else pack(mapped + pton(v4, ep.address), htons(ep.port), 4) for ep in endpoints])


def member_records(endpoint_blob: bytes) -> bytes:
    """MEMBER_SETS' compact form of a set, from its endpoint blob."""
    size = ENDPOINT_SETS.record_size
    return b"".join([endpoint_blob[offset:offset + _ADDR_PORT] for offset in range(0, len(endpoint_blob), size)])


# --- per-object entries ------------------------------------------------------------------------


@dataclass(slots=True)
class GroupPlan:
    """Everything one backend group writes: its groups-map entry, its endpoint set (and the
    set's membership index with affinity) in compact form, and its name."""

    key: bytes  #: groups-map key (the group id), also the key of its name
    value: bytes  #: groups-map value
    set_id: int  #: 0 when the group has no endpoint set (reject, unreachable)
    endpoints: bytes  #: ENDPOINT_SETS blob of the set, b"" without a set
    members: bytes  #: MEMBER_SETS blob, only with affinity (else b"")
    name: bytes  #: names-map value, short


def _name_value(text: str) -> bytes:
    """A names-map value, short: at most NAME_LEN - 1 bytes, so the last byte of the exact value
    stays NUL (C reads it as a string)."""
    return short_value(text.encode()[: L.NAME_LEN - 1])


def u64_bytes(value: int) -> bytes:
    """A __u64 map key or value (group ids, name ids, cgroup ids)."""
    return _U64.pack(value)


def group_key_bytes(key: GroupKey) -> bytes:
    return _U64.pack(group_id(key))


def ep_key_bytes(sid: int, index: int) -> bytes:
    return _EP_KEY.pack(sid, index)


def plan_group(group: BackendGroup) -> GroupPlan:
    text = str(group.key)
    gid = _hash64(b"group", text.encode())  # group_id(group.key), the text made once
    name = _name_value(text)
    if group.verdict != Verdict.FORWARD or not group.endpoints:
        verdict = Verdict.REJECT if group.verdict == Verdict.FORWARD else group.verdict
        return GroupPlan(_U64.pack(gid), _GROUP_VALUE.pack(0, 0, group.affinity_timeout, int(verdict)),
                         0, b"", b"", name)
    sid = set_id(gid, group.endpoints)
    blob = endpoint_values(group.endpoints)
    value = _GROUP_VALUE.pack(sid, len(group.endpoints), group.affinity_timeout, int(group.verdict))
    return GroupPlan(_U64.pack(gid), value, sid, blob, member_records(blob) if group.affinity_timeout else b"",
                     name)


def member_key_bytes(sid: int, endpoint: L.EpValue | bytes) -> bytes:
    """The members-map key of an endpoint of set `sid` (same address and port bytes); `endpoint`
    is an endpoints-map value, as a layout.EpValue or as its bytes."""
    return _MEMBER_KEY.pack(sid, bytes(endpoint)[:_ADDR_PORT])


def frontend_key_bytes(address: str, port: int, protocol: str, scope: str) -> bytes:
    return _FE_KEY.pack(addr16(address), socket.htons(port), L.PROTO_NUMBERS[protocol], scope_id(scope))


def _frontend_value_used(verdict: int, flags: int, route: int, slots: list[tuple[int, int]]) -> bytes:
    """A fe_value's head and used slots: the exact value without the unused slots' zeros."""
    return _FE_VALUE_HEAD.pack(verdict, len(slots), flags, route) + b"".join(
        [_FE_SLOT.pack(threshold, gid) for threshold, gid in slots])


def plan_frontend(key: FrontendKey, fe: FrontendState, has_scopes: bool,
                  group_ids: Mapping[GroupKey, int] | None = None) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key bytes, value bytes, name entries) of one frontend entry; value and names short.

    has_scopes: set FE_HAS_SCOPES on a default entry whose frontend has consumer-scope entries.
    group_ids: see split_slots.
    """
    slots = split_slots(fe.split, group_ids)
    if len(slots) > L.MAX_SLOTS:
        raise PlanError(
            f"frontend {key} splits over {len(slots)} backend groups; the datapath holds at most "
            f"{L.MAX_SLOTS}: reduce the route's backendRefs")
    names: dict[bytes, bytes] = {}
    rid = 0
    if fe.route is not None:
        rid = route_id(fe.route)
        names[_U64.pack(rid)] = _name_value(str(fe.route))
    if key.scope != DEFAULT_SCOPE:
        names[_U64.pack(scope_id(key.scope))] = _name_value(key.scope)
    value = _frontend_value_used(L.VERDICT_FORWARD if slots else L.VERDICT_REJECT,
                                 L.FE_HAS_SCOPES if has_scopes and key.scope == DEFAULT_SCOPE else 0, rid, slots)
    return frontend_key_bytes(key.address, key.port, key.protocol, key.scope), short_value(value), names


#: A frontend family: the default entry and every consumer-scope entry of one (address, port,
#: protocol). The unit of incremental frontend planning, because FE_HAS_SCOPES on the default
#: entry depends on its scoped siblings.
FamilyId = tuple[str, int, str]


def family_id(key: FrontendKey) -> FamilyId:
    return (key.address, key.port, key.protocol)


def scoped_families(frontends: Iterable[FrontendKey]) -> dict[FamilyId, set[str]]:
    """The consumer scopes (not the default) of each family that has any: few families do."""
    index: dict[FamilyId, set[str]] = {}
    for key in frontends:
        if key.scope != DEFAULT_SCOPE:
            index.setdefault(family_id(key), set()).add(key.scope)
    return index


def plan_frontend_family(state: DesiredState, fam: FamilyId, scopes: Iterable[str],
                         group_ids: Mapping[GroupKey, int] | None = None
                         ) -> tuple[dict[bytes, bytes], set[bytes], dict[bytes, bytes]]:
    """Entries of one frontend family, looking at the candidate `scopes` (plus the default).

    Returns (entries, owned keys, name entries), values short: owned keys are the frontends-map
    keys this family covers, so a key owned but not planned is to be deleted.
    """
    address, port, protocol = fam
    candidates = set(scopes) | {DEFAULT_SCOPE}
    present = {s for s in candidates if FrontendKey(address, port, protocol, s) in state.frontends}
    has_scopes = any(s != DEFAULT_SCOPE for s in present)
    entries: dict[bytes, bytes] = {}
    names: dict[bytes, bytes] = {}
    owned = {frontend_key_bytes(address, port, protocol, s) for s in candidates}
    for scope in sorted(present):
        key = FrontendKey(address, port, protocol, scope)
        kb, vb, nm = plan_frontend(key, state.frontends[key], has_scopes, group_ids)
        entries[kb] = vb
        names.update(nm)
    return entries, owned, names


def client_key_bytes(cgroup_id: int) -> bytes:
    return _U64.pack(cgroup_id)


def plan_client(pod: ClientPod, cgroup_id: int) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key, value, name entries) of one client pod; names short."""
    scope = scope_id(pod.namespace)
    return (client_key_bytes(cgroup_id), _CLIENT_VALUE.pack(scope, L.CLIENT_SKIP if pod.skip else 0),
            {_U64.pack(scope): _name_value(pod.namespace)})


def plan_config(clients: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The config map's one entry, from the clients entries planned: CONFIG_CLIENT_SKIPS iff a
    pod here opted out (the programs then look for every client's pod, bpf/meshlet.h)."""
    skips = any(_CLIENT_VALUE.unpack(value)[1] & L.CLIENT_SKIP for value in clients.values())
    return {_U32.pack(L.CONFIG_KEY): _CONFIG_VALUE.pack(L.CONFIG_CLIENT_SKIPS if skips else 0)}


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


@dataclass
class Plan:
    """What the planned maps must hold (all of it from plan(), a part from the reconciler's
    incremental planning), compact: see the module docstring."""

    groups: dict[bytes, GroupPlan] = field(default_factory=dict)  #: by groups-map key
    frontends: dict[bytes, bytes] = field(default_factory=dict)  #: values short
    clients: dict[bytes, bytes] = field(default_factory=dict)
    config: dict[bytes, bytes] = field(default_factory=dict)  #: plan_config(clients)
    names: dict[bytes, bytes] = field(default_factory=dict)  #: values short; group names too

    def add_group(self, group: GroupPlan) -> None:
        self.groups[group.key] = group
        self.names[group.key] = group.name

    def expand(self) -> MapImage:
        """Every entry with its exact bytes, per planned map: for tests, golden dumps and
        `meshlet explain`; the reconciler never expands a whole plan."""
        image: MapImage = {name: {} for name in L.PLANNED_MAPS}
        for key, group in self.groups.items():
            image["groups"][key] = group.value
            image["endpoints"].update(ENDPOINT_SETS.entries(group.set_id, group.endpoints))
            image["members"].update(MEMBER_SETS.entries(group.set_id, group.members))
        image["clients"].update(self.clients)
        image["config"].update(self.config)
        for name in SHORT_VALUE_SIZES:
            image[name] = {key: full_value(name, value) for key, value in getattr(self, name).items()}
        return image


#: GroupKey's own order (its fields in order), as a C-level tuple key: sorting 50k GroupKeys with
#: the dataclass's __lt__ costs a Python call per comparison.
_group_order = operator.attrgetter("namespace", "service", "port_name", "protocol", "family")


def _group_item_order(item: tuple[GroupKey, BackendGroup]) -> tuple:
    return _group_order(item[0])


def plan(state: DesiredState, pod_cgroups: Mapping[str, int]) -> Plan:
    """The full plan of the planned maps for a state and the pod cgroup ids (uid -> id).

    Groups are planned in GroupKey order (the order the reconciler admits them in when a map is
    full), frontends and clients in the state's order.
    """
    with gc_paused():  # builds a few objects per Service at once: see agent.gcpause
        return _plan(state, pod_cgroups)


def _plan(state: DesiredState, pod_cgroups: Mapping[str, int]) -> Plan:
    out = Plan()
    check_scope_ids([k.scope for k in state.frontends if k.scope != DEFAULT_SCOPE]
                    + [pod.namespace for pod in state.clients.values()])
    group_ids: dict[GroupKey, int] = {}
    owners: dict[int, GroupKey] = {}
    for gk, backend in sorted(state.groups.items(), key=_group_item_order):
        group = plan_group(backend)
        gid = group_ids[gk] = _U64.unpack(group.key)[0]  # group_id(gk), without hashing it again
        if gid in owners:
            raise PlanError(f"backend groups {owners[gid]} and {gk} hash to the same id {gid:#x}")
        owners[gid] = gk
        out.add_group(group)
    # Each entry on its own (plan_frontend_family's result without its set algebra): a default
    # entry needs only to know whether its family has scoped entries.
    scoped = scoped_families(state.frontends)
    frontends, names = out.frontends, out.names
    for key, fe in state.frontends.items():
        has_scopes = bool(scoped) and key.scope == DEFAULT_SCOPE and family_id(key) in scoped
        kb, vb, fe_names = plan_frontend(key, fe, has_scopes, group_ids)
        frontends[kb] = vb
        if fe_names:
            names.update(fe_names)
    for uid in sorted(state.clients):
        cgroup = pod_cgroups.get(uid)
        if cgroup is None:
            continue  # no cgroup on this node (yet): its processes are node processes
        kb, vb, client_names = plan_client(state.clients[uid], cgroup)
        out.clients[kb] = vb
        names.update(client_names)
    out.config = plan_config(out.clients)
    return out
