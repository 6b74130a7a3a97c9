"""Map entries as bytes: their packed forms, and the containers that carry them from the planner
to the writer (pure: no bcc, no I/O).

Role: the one home of how a map entry is packed and read back. plan.py packs the entries of a
DesiredState with it; reconcile.py reads back what it wrote (its mirror's reference counts, the
sets it finds in the maps) with it, and never calls the planner; dump.py and `meshlet explain`
decode with layout's ctypes mirrors and these address helpers. `Plan` (everything the planned
maps must hold) and `PlanChange` (the part of it an incremental sync writes) are what the
planner hands the writer.

Bytes are packed with struct.Struct formats (`_packer` below), not by filling layout's ctypes
objects: a full plan packs ~10 endpoints per Service and a precompiled pack is several times
faster than building and copying a ctypes structure. layout's ctypes classes stay the one mirror
of bpf/meshlet.h: each format is checked against its class at import (same size) and by a unit
test (same bytes).

A Plan is compact: one `GroupPlan` per backend group holds the group's entry and its whole
endpoint set as one blob (`SetLayout`), never one Python entry per endpoint (500k at 50k
Services); frontends and names keep their values without trailing zero bytes (`short_value`).
The writer expands a set into map entries only while writing it; `Plan.expand()` is the one
place a whole plan becomes {key: value} per map (tests, golden dumps, `meshlet explain`).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable

from agent.datapath import layout as L
from agent.model import Endpoint

# --- packers -------------------------------------------------------------------------------------

def _packer(mirror: type, fmt: str) -> struct.Struct:
    """A struct.Struct for layout class `mirror`. "=": native byte order like ctypes, no implicit
    padding (every pad byte of the C struct is an explicit "x"), so the bytes match field by
    field; the size check catches a field added to one but not the other."""
    packer = struct.Struct("=" + fmt)
    if packer.size != ct.sizeof(mirror):
        raise AssertionError(f"the packed format of {mirror.__name__} is {packer.size} bytes, layout says "
                             f"{ct.sizeof(mirror)}: update both together")
    return packer


U64 = _packer(L.U64, "Q")
U32 = _packer(L.U32, "I")
EP_KEY = _packer(L.EpKey, "QI4x")  # set_id, index
EP_KEY_READ = _packer(L.EpKey, "QII")  # set_id, index, pad (must be 0)
EP_VALUE = _packer(L.EpValue, "16sHBx")  # addr, port (network order), family
# A member key is (set_id, the endpoint's addr and port): the first 18 bytes of its ep_value.
MEMBER_KEY = _packer(L.MemberKey, "Q18s6x")  # set_id, addr + port (network order)
MEMBER_KEY_READ = _packer(L.MemberKey, "Q18s6s")  # set_id, addr + port, pad (must be 0)
GROUP_VALUE = _packer(L.GroupValue, "QIIBB6x")  # set_id, count, affinity_timeout_s, verdict, flags
FE_KEY = _packer(L.FeKey, "16sHBxI")  # addr, port (network order), proto, scope
FE_SLOT = _packer(L.FeSlot, "IIQQIBB2x")  # threshold, count, group_id, set_id, affinity_timeout_s, verdict, flags
# fe_value is packed in parts (plan._frontend_value_used): its head, then the used slots. The
# _packer call only checks that head + slots is the size layout gives FeValue.
FE_VALUE_HEAD = struct.Struct("=BBH4xQ")  # verdict, nslots, flags, route_id
FE_VALUE_SIZE = _packer(L.FeValue, f"{FE_VALUE_HEAD.size}x{L.MAX_SLOTS * FE_SLOT.size}x").size
CLIENT_VALUE = _packer(L.ClientValue, "II")  # scope, flags
CONFIG_VALUE = _packer(L.ConfigValue, "I4x")  # flags
NAME_VALUE = _packer(L.NameValue, f"{L.NAME_LEN}s")  # zero-padded, always NUL-terminated (see plan._name_value)

#: Bytes of an endpoint's address and port: the head of an ep_value, and what a member key holds
#: after its set_id (so a set's members are made from its endpoint blob).
ADDR_PORT = L.EpValue.port.offset + L.EpValue.port.size
if L.MemberKey.port.offset + L.MemberKey.port.size - L.MemberKey.addr.offset != ADDR_PORT:
    raise AssertionError("member_key must hold an ep_value's addr and port bytes as they are")


# --- short values --------------------------------------------------------------------------------

#: Maps whose values are mostly trailing zeros: a frontend uses 1 of its 16 slots most of the
#: time (272 bytes, ~32 used), a name ~30 of its 96 bytes. Plans and the reconciler's mirror keep
#: these values without their trailing zero bytes; full_value restores them before a write.
#: Lossless: all values of a map have the one size given here.
SHORT_VALUE_SIZES = {"frontends": FE_VALUE_SIZE, "names": NAME_VALUE.size}


def short_value(value: bytes) -> bytes:
    """A frontends or names value without its trailing zero bytes (see SHORT_VALUE_SIZES)."""
    return value.rstrip(b"\0")


def full_value(map_name: str, value: bytes) -> bytes:
    """The exact map value of a short value of map `map_name` (see SHORT_VALUE_SIZES)."""
    return value.ljust(SHORT_VALUE_SIZES[map_name], b"\0")


# --- addresses -----------------------------------------------------------------------------------

MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def addr16(address: str) -> bytes:
    """16 bytes of an address, IPv4 as ::ffff:a.b.c.d (the key form for both socket families).

    inet_pton rather than ipaddress: a full plan parses every endpoint (500k at 50k Services),
    and it is ten times faster. It also refuses what is not an address (OSError).
    """
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address)
    return MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, address)


def addr_text(raw: bytes) -> str:
    """16 address bytes (addr16's form) as text: an IPv4-mapped address prints as plain IPv4."""
    ip = ipaddress.IPv6Address(bytes(raw))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


# --- keys and values -----------------------------------------------------------------------------

def u64_bytes(value: int) -> bytes:
    """A __u64 map key or value (group ids, name ids, cgroup ids)."""
    return U64.pack(value)


def ep_key_bytes(sid: int, index: int) -> bytes:
    return EP_KEY.pack(sid, index)


def member_key_bytes(sid: int, endpoint: L.EpValue | bytes) -> bytes:
    """The members-map key of an endpoint of set `sid` (same address and port bytes); `endpoint`
    is an endpoints-map value, as a layout.EpValue or as its bytes."""
    return MEMBER_KEY.pack(sid, bytes(endpoint)[:ADDR_PORT])


# --- reading entries back (the writer's reference tracking) -------------------------------------

def group_value_fields(value: bytes) -> tuple[int, int, int, int, int]:
    """(set_id, count, affinity_timeout_s, verdict, flags) of a groups-map value."""
    return GROUP_VALUE.unpack(value)


#: A frontend slot's copy of a group it cannot find (fe_slot.verdict VERDICT_NO_GROUP).
NO_GROUP_VALUE = GROUP_VALUE.pack(0, 0, 0, L.VERDICT_NO_GROUP, 0)


def fe_slot_bytes(threshold: int, gid: int, group_value: bytes | None) -> bytes:
    """One fe_slot: the share's threshold and group id, with the copy of that group's value
    (bpf/meshlet.h, struct fe_slot); a rejected share (gid 0) copies nothing."""
    if gid == 0:
        return FE_SLOT.pack(threshold, 0, 0, 0, 0, 0, 0)
    sid, count, affinity, verdict, flags = GROUP_VALUE.unpack(group_value or NO_GROUP_VALUE)
    return FE_SLOT.pack(threshold, count, gid, sid, affinity, verdict, flags)


def key_set_id(key: bytes) -> int:
    """set_id of an endpoints-map or members-map key (both start with it)."""
    return U64.unpack_from(key)[0]


def frontend_value_refs(value: bytes) -> tuple[int, tuple[int, ...]]:
    """(route_id, group id of each used slot, 0 for a rejected share) of a frontends-map value,
    exact or short (short_value)."""
    value = full_value("frontends", value)
    _verdict, nslots, _flags, route = FE_VALUE_HEAD.unpack_from(value)
    slot = FE_SLOT.size
    return route, tuple(FE_SLOT.unpack_from(value, FE_VALUE_HEAD.size + i * slot)[2] for i in range(nslots))


_ADDR_WORDS = struct.Struct("=4I")


def fe_filter_bit(key: bytes) -> int:
    """The frontend filter's bit of a frontends-map key (its address, port and protocol; every
    scope alike): the mirror of fe_filter_bit() in bpf/sock.c, on the same native words."""
    addr, port, proto, _scope = FE_KEY.unpack(key)
    w0, w1, w2, w3 = _ADDR_WORDS.unpack(addr)
    return (((w0 ^ w1 ^ w2 ^ w3 ^ (port << 16) ^ proto) * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - L.FE_FILTER_BITS_LOG2)


def fe_filter_words(frontend_keys: Iterable[bytes]) -> list[int]:
    """The frontend filter's words for a frontends map holding these keys."""
    words = [0] * L.FE_FILTER_WORDS
    for key in frontend_keys:
        bit = fe_filter_bit(key)
        words[bit >> 6] |= 1 << (bit & 63)
    return words


def eject_filter_slot(set_id: int) -> int:
    """The ejected-sets filter's entry of a set: the mirror of eject_filter_slot() in bpf/sock.c
    (only the kernel sets these flags; the bench that fakes an ejection sets one too)."""
    return ((((set_id ^ (set_id >> 32)) & 0xFFFFFFFF) * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - L.EJECT_FILTER_SLOTS_LOG2)


def frontend_key_scope_id(key: bytes) -> int:
    """Client scope id of a frontends-map key (0 = the default view)."""
    return FE_KEY.unpack(key)[3]


def client_key_cgroup(key: bytes) -> int:
    return U64.unpack(key)[0]


def pod_name_key(cgroup_id: int) -> bytes:
    """The names-map key of a client pod's "namespace/name" (layout.POD_NAME_TAG)."""
    return U64.pack(cgroup_id | L.POD_NAME_TAG)


def client_value_scope_id(value: bytes) -> int:
    return CLIENT_VALUE.unpack(value)[0]


def name_text(value: bytes) -> str:
    """The text of a names-map value, exact or short."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


# --- endpoint sets -------------------------------------------------------------------------------

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
    record_size = EP_VALUE.size

    def entries(self, sid: int, blob: bytes) -> list[tuple[bytes, bytes]]:
        pack, size = EP_KEY.pack, self.record_size
        return [(pack(sid, index), blob[offset:offset + size])
                for index, offset in enumerate(range(0, len(blob), size))]

    def key(self, sid: int, index: int, record: bytes) -> bytes:
        return EP_KEY.pack(sid, index)

    def parse(self, key: bytes, value: bytes) -> tuple[int, int, bytes] | None:
        sid, index, pad = EP_KEY_READ.unpack(key)
        return None if pad else (sid, index, value)

    def kept(self, blob: bytes) -> int:
        return self.count(blob)

    def kept_keys(self, sid: int, kept: int) -> list[bytes]:
        pack = EP_KEY.pack
        return [pack(sid, index) for index in range(kept)]

    def kept_count(self, kept: int) -> int:
        return kept


class _MemberSets(SetLayout):
    """members: (set_id, addr, port) -> index. Record i = the addr and port of index i (the
    first 18 bytes of its ep_value): see member_records. The mirror keeps the blob: the keys
    hold the addresses. (Only groups with affinity have members.)"""

    name = "members"
    record_size = ADDR_PORT

    def entries(self, sid: int, blob: bytes) -> list[tuple[bytes, bytes]]:
        pack, index_bytes, size = MEMBER_KEY.pack, U32.pack, self.record_size
        return [(pack(sid, blob[offset:offset + size]), index_bytes(index))
                for index, offset in enumerate(range(0, len(blob), size))]

    def key(self, sid: int, index: int, record: bytes) -> bytes:
        return MEMBER_KEY.pack(sid, record)

    def parse(self, key: bytes, value: bytes) -> tuple[int, int, bytes] | None:
        sid, record, pad = MEMBER_KEY_READ.unpack(key)
        return None if pad.strip(b"\0") else (sid, U32.unpack(value)[0], record)

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
    pack, htons, pton = EP_VALUE.pack, socket.htons, socket.inet_pton
    v4, v6, mapped = socket.AF_INET, socket.AF_INET6, MAPPED_PREFIX
    return b"".join([pack(pton(v6, ep.address), htons(ep.port), 6) if ":" in ep.address
                     else pack(mapped + pton(v4, ep.address), htons(ep.port), 4) for ep in endpoints])


def member_records(endpoint_blob: bytes) -> bytes:
    """MEMBER_SETS' compact form of a set, from its endpoint blob."""
    size = ENDPOINT_SETS.record_size
    return b"".join([endpoint_blob[offset:offset + ADDR_PORT] for offset in range(0, len(endpoint_blob), size)])


# --- what the planner hands the writer -----------------------------------------------------------

#: map name -> {key bytes: value bytes}: every entry of a plan, expanded (Plan.expand).
MapImage = dict[str, dict[bytes, bytes]]


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


@dataclass
class Plan:
    """What the planned maps must hold (all of it from plan.plan(), a part in a PlanChange),
    compact: see the module docstring."""

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
        image: MapImage = {name: {} for name in L.WRITTEN_MAPS}
        for key, group in self.groups.items():
            image["groups"][key] = group.value
            image["endpoints"].update(ENDPOINT_SETS.entries(group.set_id, group.endpoints))
            image["members"].update(MEMBER_SETS.entries(group.set_id, group.members))
        image["clients"].update(self.clients)
        image["config"].update(self.config)
        for name in SHORT_VALUE_SIZES:
            image[name] = {key: full_value(name, value) for key, value in getattr(self, name).items()}
        image["fe_filter"] = {U32.pack(i): U64.pack(word) for i, word in enumerate(fe_filter_words(self.frontends))}
        return image


@dataclass
class PlanChange:
    """The part of the planned maps a StateDelta touches (plan.Planner.change), for an
    incremental write: `want` holds the entries to write, every client and the config entry
    included (a node has few pods, so clients and config are always planned whole).

    The writer deletes what these lists name unless `want` plans it (a removed group also only
    once no frontend in the maps names it), and every clients entry `want` does not hold.
    """

    want: Plan
    #: groups-map keys of every group the delta names, sorted: their sets before the write are
    #: the only candidates for deletion as stale (a set id hashes its group id)
    touched_groups: list[bytes] = field(default_factory=list)
    #: groups-map keys of the delta's groups that left the state
    removed_groups: list[bytes] = field(default_factory=list)
    #: frontends-map keys the delta's destinations (plan.Destination) cover but no longer plan
    removed_frontends: list[bytes] = field(default_factory=list)
