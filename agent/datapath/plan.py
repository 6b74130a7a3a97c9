"""Plan: the exact bytes of every map entry for a DesiredState (pure: no bcc, no I/O).

Role: turn agent.model.DesiredState plus the pod cgroup ids into a MapImage
(map name -> {key bytes: value bytes}) for the maps the agent owns (layout.PLANNED_MAPS), and
the same per object (one group, one frontend family, one client) so the reconciler can plan only
what a StateDelta names: one endpoint change at 50k Services plans one group.

Ids are hashes, not allocations: nothing to restore at start, and the same state always gives
the same bytes (golden tests compare text dumps of images).
- group_id = 64-bit hash of the GroupKey text;
- set_id = 64-bit hash of (group_id, the sorted endpoints): a content-addressed revision, so a
  changed endpoint set gets new keys and the old set stays readable until the group flips;
- scope id = nonzero 32-bit hash of the namespace name; two namespaces in use with the same id
  are refused (PlanError) rather than silently sharing a view;
- route_id = 64-bit hash of the RouteRef text (only for names).

Weighted split: shares of the same group are merged, rejected shares (group None) become one
slot with group_id 0, zero weights are dropped (an empty interval can never be drawn, so it
would only waste a slot). Thresholds are cumulative weights scaled to 2^31 with exact integer
arithmetic, floor(C_k * 2^31 / W): each share's probability is within 2^-31 of w_k / W whatever
the weights' magnitude, and the last threshold is exactly 2^31.

Bytes are packed with struct.Struct formats (`_packer` below), not by filling layout's ctypes
objects: a full plan writes ~10 entries per Service (500k at 50k Services) and a precompiled
pack is several times faster than building and copying a ctypes structure. layout's ctypes
classes stay the one mirror of bpf/meshlet.h: each format is checked against its class at import
(same size) and by a unit test (same bytes). plan() pauses the garbage collector while it
builds a full image (agent.gcpause).
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
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteRef,
    Verdict,
    WeightedGroup,
)

#: map name -> {key bytes: value bytes}
MapImage = dict[str, dict[bytes, bytes]]


class PlanError(UserError):
    """The desired state cannot be expressed in the maps (too wide a split, an id collision)."""


def empty_image() -> MapImage:
    return {name: {} for name in L.PLANNED_MAPS}


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
_EP_VALUE = _packer(L.EpValue, "16sHBx")  # addr, port (network order), family
_MEMBER_KEY = _packer(L.MemberKey, "Q16sH6x")  # set_id, addr, port (network order)
_GROUP_VALUE = _packer(L.GroupValue, "QIIB7x")  # set_id, count, affinity_timeout_s, verdict
_FE_KEY = _packer(L.FeKey, "16sHBxI")  # addr, port (network order), proto, scope
_FE_SLOT = _packer(L.FeSlot, "I4xQ")  # threshold, group_id
# fe_value is packed in parts (frontend_value_bytes): its head, then MAX_SLOTS slots. The
# _packer call only checks that head + slots is the size layout gives FeValue.
_FE_VALUE_HEAD = struct.Struct("=BBH4xQ")  # verdict, nslots, flags, route_id
_FE_VALUE_SIZE = _packer(L.FeValue, f"{_FE_VALUE_HEAD.size}x{L.MAX_SLOTS * _FE_SLOT.size}x").size
_CLIENT_VALUE = _packer(L.ClientValue, "II")  # scope, flags
_NAME_VALUE = _packer(L.NameValue, f"{L.NAME_LEN}s")  # zero-padded, always NUL-terminated (see _name_entry)


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


def set_id(gid: int, endpoints: Iterable) -> int:
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


def family_of(address: str) -> int:
    return 6 if ":" in address else 4


# --- reading entries back (the reconciler's reference tracking) --------------------------------


def group_value_fields(value: bytes) -> tuple[int, int, int, int]:
    """(set_id, count, affinity_timeout_s, verdict) of a groups-map value."""
    return _GROUP_VALUE.unpack(value)


def key_set_id(key: bytes) -> int:
    """set_id of an endpoints-map or members-map key (both start with it)."""
    return _U64.unpack_from(key)[0]


def frontend_value_refs(value: bytes) -> tuple[int, tuple[int, ...]]:
    """(route_id, group id of each used slot, 0 for a rejected share) of a frontends-map value."""
    _verdict, nslots, _flags, route = _FE_VALUE_HEAD.unpack_from(value)
    slot = _FE_SLOT.size
    return route, tuple(_FE_SLOT.unpack_from(value, _FE_VALUE_HEAD.size + i * slot)[1] for i in range(nslots))


def frontend_key_scope(key: bytes) -> int:
    """Client scope id of a frontends-map key (0 = the default view)."""
    return _FE_KEY.unpack(key)[3]


def client_value_scope(value: bytes) -> int:
    return _CLIENT_VALUE.unpack(value)[0]


# --- the weighted split ------------------------------------------------------------------------


def split_slots(split: Iterable[WeightedGroup]) -> list[tuple[int, int]]:
    """[(threshold, group_id)] for a split: see the module docstring for the rules."""
    merged: dict[int, int] = {}  # group_id (0 = reject) -> weight, in first-appearance order
    for share in split:
        if share.weight < 0:
            raise PlanError(f"negative weight {share.weight} in a split; resolve must never produce one")
        if share.weight == 0:
            continue
        gid = group_id(share.group) if share.group is not None else 0
        merged[gid] = merged.get(gid, 0) + share.weight
    total = sum(merged.values())
    slots = []
    cumulative = 0
    for gid, weight in merged.items():
        cumulative += weight
        slots.append((cumulative * L.THRESHOLD_SCALE // total, gid))
    return slots


# --- per-object entries ------------------------------------------------------------------------


@dataclass
class GroupEntries:
    """Everything one backend group writes: its value, its endpoint set and (with affinity) the
    set's membership index, plus its name."""

    key: bytes
    value: bytes
    endpoints: dict[bytes, bytes] = field(default_factory=dict)
    members: dict[bytes, bytes] = field(default_factory=dict)
    names: dict[bytes, bytes] = field(default_factory=dict)


def _name_entry(ident: int, text: str) -> tuple[bytes, bytes]:
    raw = text.encode()[: L.NAME_LEN - 1]  # the last byte stays NUL: C reads it as a string
    return _U64.pack(ident), _NAME_VALUE.pack(raw)


def u64_bytes(value: int) -> bytes:
    """A __u64 map key or value (group ids, name ids, cgroup ids)."""
    return _U64.pack(value)


def group_key_bytes(key: GroupKey) -> bytes:
    return _U64.pack(group_id(key))


def ep_key_bytes(sid: int, index: int) -> bytes:
    return _EP_KEY.pack(sid, index)


def plan_group(group: BackendGroup) -> GroupEntries:
    gid = group_id(group.key)
    usable = group.verdict == Verdict.FORWARD and bool(group.endpoints)
    sid = set_id(gid, group.endpoints) if usable else 0
    verdict = group.verdict if group.verdict != Verdict.FORWARD or usable else Verdict.REJECT
    value = _GROUP_VALUE.pack(sid, len(group.endpoints) if usable else 0, group.affinity_timeout, int(verdict))
    entries = GroupEntries(key=_U64.pack(gid), value=value)
    name_key, name_value = _name_entry(gid, str(group.key))
    entries.names[name_key] = name_value
    if not usable:
        return entries
    endpoints, members = entries.endpoints, entries.members
    # The loop body runs once per endpoint of the cluster on a full plan: methods bound to locals.
    pack_key, pack_value, htons = _EP_KEY.pack, _EP_VALUE.pack, socket.htons
    for index, ep in enumerate(group.endpoints):
        address = ep.address
        addr = addr16(address)
        port = htons(ep.port)
        endpoints[pack_key(sid, index)] = pack_value(addr, port, family_of(address))
        if group.affinity_timeout:
            members[_MEMBER_KEY.pack(sid, addr, port)] = _U32.pack(index)
    return entries


def member_key_bytes(sid: int, endpoint: L.EpValue | bytes) -> bytes:
    """The members-map key of an endpoint of set `sid` (same address and port bytes); `endpoint`
    is an endpoints-map value, as a layout.EpValue or as its bytes."""
    raw = bytes(endpoint)
    addr, port, _family = _EP_VALUE.unpack(raw)
    return _MEMBER_KEY.pack(sid, addr, port)


def frontend_key_bytes(address: str, port: int, protocol: str, scope: str) -> bytes:
    return _FE_KEY.pack(addr16(address), socket.htons(port), L.PROTO_NUMBERS[protocol], scope_id(scope))


def frontend_value_bytes(verdict: int, flags: int, route: int, slots: list[tuple[int, int]]) -> bytes:
    """A fe_value: the head, the used slots, and zeros for the unused ones."""
    head = _FE_VALUE_HEAD.pack(verdict, len(slots), flags, route)
    used = b"".join(_FE_SLOT.pack(threshold, gid) for threshold, gid in slots)
    return head + used + bytes(_FE_VALUE_SIZE - len(head) - len(used))


def plan_frontend(key: FrontendKey, fe: FrontendState, has_scopes: bool) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key bytes, value bytes, name entries) of one frontend entry.

    has_scopes: set FE_HAS_SCOPES on a default entry whose frontend has consumer-scope entries.
    """
    slots = split_slots(fe.split)
    if len(slots) > L.MAX_SLOTS:
        raise PlanError(
            f"frontend {key} splits over {len(slots)} backend groups; the datapath holds at most "
            f"{L.MAX_SLOTS}: reduce the route's backendRefs")
    names: dict[bytes, bytes] = {}
    rid = 0
    if fe.route is not None:
        rid = route_id(fe.route)
        nk, nv = _name_entry(rid, str(fe.route))
        names[nk] = nv
    if key.scope != DEFAULT_SCOPE:
        nk, nv = _name_entry(scope_id(key.scope), key.scope)
        names[nk] = nv
    value = frontend_value_bytes(L.VERDICT_FORWARD if slots else L.VERDICT_REJECT,
                                 L.FE_HAS_SCOPES if has_scopes and key.scope == DEFAULT_SCOPE else 0, rid, slots)
    return frontend_key_bytes(key.address, key.port, key.protocol, key.scope), value, names


#: A frontend family: the default entry and every consumer-scope entry of one (address, port,
#: protocol). The unit of incremental frontend planning, because FE_HAS_SCOPES on the default
#: entry depends on its scoped siblings.
FamilyId = tuple[str, int, str]


def family_id(key: FrontendKey) -> FamilyId:
    return (key.address, key.port, key.protocol)


def scopes_by_family(frontends: Iterable[FrontendKey]) -> dict[FamilyId, set[str]]:
    index: dict[FamilyId, set[str]] = {}
    for key in frontends:
        index.setdefault(family_id(key), set()).add(key.scope)
    return index


def plan_frontend_family(state: DesiredState, fam: FamilyId, scopes: Iterable[str]
                         ) -> tuple[dict[bytes, bytes], set[bytes], dict[bytes, bytes]]:
    """Entries of one frontend family, looking at the candidate `scopes` (plus the default).

    Returns (entries, owned keys, name entries): owned keys are the frontends-map keys this
    family covers, so a key owned but not planned is to be deleted.
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
        kb, vb, nm = plan_frontend(key, state.frontends[key], has_scopes)
        entries[kb] = vb
        names.update(nm)
    return entries, owned, names


def client_key_bytes(cgroup_id: int) -> bytes:
    return _U64.pack(cgroup_id)


def plan_client(pod: ClientPod, cgroup_id: int) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    scope = scope_id(pod.namespace)
    nk, nv = _name_entry(scope, pod.namespace)
    return client_key_bytes(cgroup_id), _CLIENT_VALUE.pack(scope, L.CLIENT_SKIP if pod.skip else 0), {nk: nv}


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


# --- the whole image ---------------------------------------------------------------------------


#: GroupKey's own order (its fields in order), as a C-level tuple key: sorting 50k GroupKeys with
#: the dataclass's __lt__ costs a Python call per comparison.
_group_order = operator.attrgetter("namespace", "service", "port_name", "protocol", "family")
_DEFAULT_ONLY = {DEFAULT_SCOPE}


def plan(state: DesiredState, pod_cgroups: Mapping[str, int]) -> MapImage:
    """The full image of the planned maps for a state and the pod cgroup ids (uid -> id)."""
    with gc_paused():  # builds ~10 entries per Service at once: see agent.gcpause
        return _plan(state, pod_cgroups)


def _plan(state: DesiredState, pod_cgroups: Mapping[str, int]) -> MapImage:
    image = empty_image()
    check_scope_ids([k.scope for k in state.frontends if k.scope != DEFAULT_SCOPE]
                    + [pod.namespace for pod in state.clients.values()])
    group_ids: dict[int, GroupKey] = {}
    for gk in sorted(state.groups, key=_group_order):
        entries = plan_group(state.groups[gk])
        gid = _U64.unpack(entries.key)[0]  # group_id(gk), without hashing it again
        if gid in group_ids:
            raise PlanError(f"backend groups {group_ids[gid]} and {gk} hash to the same id {gid:#x}")
        group_ids[gid] = gk
        image["groups"][entries.key] = entries.value
        image["endpoints"].update(entries.endpoints)
        image["members"].update(entries.members)
        image["names"].update(entries.names)
    for fam, scopes in sorted(scopes_by_family(state.frontends).items()):
        if scopes == _DEFAULT_ONLY:
            # Most families: one default entry, no scoped sibling to flag. Same entry as
            # plan_frontend_family gives, without its set algebra.
            key = FrontendKey(*fam)
            kb, vb, names = plan_frontend(key, state.frontends[key], has_scopes=False)
            image["frontends"][kb] = vb
        else:
            entries, _owned, names = plan_frontend_family(state, fam, scopes)
            image["frontends"].update(entries)
        image["names"].update(names)
    for uid in sorted(state.clients):
        cgroup = pod_cgroups.get(uid)
        if cgroup is None:
            continue  # no cgroup on this node (yet): its processes are node processes
        kb, vb, names = plan_client(state.clients[uid], cgroup)
        image["clients"][kb] = vb
        image["names"].update(names)
    return image
