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
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from agent.datapath import layout as L
from agent.errors import UserError
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
    text = ",".join(str(ep) for ep in endpoints).encode()
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
    raw = text.encode()[: L.NAME_LEN - 1]
    return bytes(L.U64(ident)), bytes(L.NameValue(raw))


def group_key_bytes(key: GroupKey) -> bytes:
    return bytes(L.U64(group_id(key)))


def plan_group(group: BackendGroup) -> GroupEntries:
    gid = group_id(group.key)
    usable = group.verdict == Verdict.FORWARD and bool(group.endpoints)
    sid = set_id(gid, group.endpoints) if usable else 0
    verdict = group.verdict if group.verdict != Verdict.FORWARD or usable else Verdict.REJECT
    value = L.GroupValue(set_id=sid, count=len(group.endpoints) if usable else 0,
                         affinity_timeout_s=group.affinity_timeout, verdict=int(verdict))
    entries = GroupEntries(key=bytes(L.U64(gid)), value=bytes(value))
    name_key, name_value = _name_entry(gid, str(group.key))
    entries.names[name_key] = name_value
    if not usable:
        return entries
    for index, ep in enumerate(group.endpoints):
        ep_value = L.EpValue.from_buffer_copy(addr16(ep.address) + bytes(4))
        ep_value.port = socket.htons(ep.port)
        ep_value.family = family_of(ep.address)
        entries.endpoints[bytes(L.EpKey(set_id=sid, index=index))] = bytes(ep_value)
        if group.affinity_timeout:
            entries.members[member_key_bytes(sid, ep_value)] = bytes(L.U32(index))
    return entries


def member_key_bytes(sid: int, endpoint: L.EpValue) -> bytes:
    """The members-map key of an endpoint of set `sid` (same address and port bytes)."""
    member = L.MemberKey(set_id=sid, port=endpoint.port)
    member.addr[:] = bytes(endpoint.addr)
    return bytes(member)


def frontend_key_bytes(address: str, port: int, protocol: str, scope: str) -> bytes:
    key = L.FeKey(port=socket.htons(port), proto=L.PROTO_NUMBERS[protocol], scope=scope_id(scope))
    key.addr[:] = addr16(address)
    return bytes(key)


def plan_frontend(key: FrontendKey, fe: FrontendState, has_scopes: bool) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(key bytes, value bytes, name entries) of one frontend entry.

    has_scopes: set FE_HAS_SCOPES on a default entry whose frontend has consumer-scope entries.
    """
    slots = split_slots(fe.split)
    if len(slots) > L.MAX_SLOTS:
        raise PlanError(
            f"frontend {key} splits over {len(slots)} backend groups; the datapath holds at most "
            f"{L.MAX_SLOTS}: reduce the route's backendRefs")
    value = L.FeValue(verdict=L.VERDICT_FORWARD if slots else L.VERDICT_REJECT, nslots=len(slots),
                      flags=L.FE_HAS_SCOPES if has_scopes and key.scope == DEFAULT_SCOPE else 0)
    names: dict[bytes, bytes] = {}
    if fe.route is not None:
        value.route_id = route_id(fe.route)
        nk, nv = _name_entry(value.route_id, str(fe.route))
        names[nk] = nv
    for i, (threshold, gid) in enumerate(slots):
        value.slots[i].threshold = threshold
        value.slots[i].group_id = gid
    if key.scope != DEFAULT_SCOPE:
        nk, nv = _name_entry(scope_id(key.scope), key.scope)
        names[nk] = nv
    return frontend_key_bytes(key.address, key.port, key.protocol, key.scope), bytes(value), names


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
    return bytes(L.U64(cgroup_id))


def plan_client(pod: ClientPod, cgroup_id: int) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    value = L.ClientValue(scope=scope_id(pod.namespace), flags=L.CLIENT_SKIP if pod.skip else 0)
    nk, nv = _name_entry(value.scope, pod.namespace)
    return client_key_bytes(cgroup_id), bytes(value), {nk: nv}


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


def plan(state: DesiredState, pod_cgroups: Mapping[str, int]) -> MapImage:
    """The full image of the planned maps for a state and the pod cgroup ids (uid -> id)."""
    image = empty_image()
    check_scope_ids([k.scope for k in state.frontends if k.scope != DEFAULT_SCOPE]
                    + [pod.namespace for pod in state.clients.values()])
    group_ids: dict[int, GroupKey] = {}
    for gk in sorted(state.groups):
        entries = plan_group(state.groups[gk])
        gid = group_id(gk)
        if gid in group_ids:
            raise PlanError(f"backend groups {group_ids[gid]} and {gk} hash to the same id {gid:#x}")
        group_ids[gid] = gk
        image["groups"][entries.key] = entries.value
        image["endpoints"].update(entries.endpoints)
        image["members"].update(entries.members)
        image["names"].update(entries.names)
    for fam, scopes in sorted(scopes_by_family(state.frontends).items()):
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
