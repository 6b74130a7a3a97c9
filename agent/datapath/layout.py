"""The maps' binary layout: one ctypes mirror per struct of bpf/meshlet.h, and the map specs.

Role: the only Python home of the datapath's byte layout. plan.py builds entries with these
classes, dump.py decodes with them, loader.py checks pinned maps against MAP_SPECS.
Pure: no I/O, no bcc. Each class quotes the C struct it mirrors; tests check that
- the sizes and field offsets equal what bcc compiled (tests/kernel/datapath), and
- the constants below equal the #defines in bpf/meshlet.h (tests/unit/datapath).

Invariant: any change here or in meshlet.h that alters a key or value bumps LAYOUT_VERSION, so
the pins of an older layout (under v<old>/) are never read with the new one.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, fields

from agent.datapath import uapi as U
from agent.model import MAX_BACKEND_REFS, Verdict

#: Version of the map layout; pins live under <bpffs>/v<LAYOUT_VERSION>/maps.
LAYOUT_VERSION = 3  # 2: the config map; 3: passive health (group flags, sock_watch, health maps), sock_xlat
                    # remembers scope, group and set (stale sockets), fe_slot holds a copy of its group,
                    # the fe_filter and eject_filter maps

# --- constants of bpf/meshlet.h (checked against the header by a unit test) --------------------
MAX_SLOTS = MAX_BACKEND_REFS  # one limit: resolve refuses a wider rule, the maps hold this many
SOCK_XLATS = 8
NAME_LEN = 96
MAX_POD_DEPTH = 8
TRACE_RING_BYTES = 262144
EJECT_SLOTS = 8
FE_FILTER_BITS_LOG2 = 20
FE_FILTER_WORDS = 1 << (FE_FILTER_BITS_LOG2 - 6)
EJECT_FILTER_SLOTS_LOG2 = 13

VERDICT_FORWARD = 0
VERDICT_REJECT = 1
VERDICT_UNREACHABLE = 2
VERDICT_NO_GROUP = 255
assert (VERDICT_FORWARD, VERDICT_REJECT, VERDICT_UNREACHABLE) == (
    Verdict.FORWARD, Verdict.REJECT, Verdict.UNREACHABLE), "model.Verdict values are the map's"

FE_HAS_SCOPES = 1
CLIENT_SKIP = 1
CONFIG_CLIENT_SKIPS = 1
TRACE_MATCH_FRONTEND = 1
TRACE_MATCH_CLIENT = 2

#: struct decision's kind: which call was decided (the C DECISION_* defines).
DECISION_KINDS = {1: "connect", 2: "datagram", 3: "remembered"}

GROUP_PASSIVE_HEALTH = 1

#: Passive health (SEMANTICS A17): failures that eject, the first back-off and its cap.
HEALTH_FAILURES = 3
HEALTH_BACKOFF_NS = 1_000_000_000
HEALTH_BACKOFF_MAX_NS = 30_000_000_000
HEALTH_MAX_DOUBLINGS = 5

#: Passive health counters: index in the `health_stats` array -> name (the C HSTAT_* defines).
HEALTH_STATS = {0: "ejections", 1: "capped", 2: "failures", 3: "successes"}
HSTAT_COUNT = 4

#: Outcome counters: index in the `counters` array -> name (the C OUT_* defines).
OUTCOMES = {0: "translated", 1: "rejected", 2: "unreachable", 3: "skipped", 4: "miss"}
#: Index of the counter of UDP re-picks (the C COUNT_REPICKED): not an outcome, counted besides one.
COUNT_REPICKED = 5
OUT_COUNT = 8

#: Names-map key of a client pod's "namespace/name": its cgroup id with this bit set, so it never
#: meets a group, route or scope id (cgroup ids are kernfs ids, far below 2^63). Read by
#: `meshlet trace` to name clients and to find the pod of --from, with the agent down too.
POD_NAME_TAG = 1 << 63

#: Threshold scale of the weighted pick: the program draws r uniform in [0, THRESHOLD_SCALE).
THRESHOLD_SCALE = 1 << 31

#: Key protocol numbers (IPPROTO_*), as the hook context's `protocol` holds them.
PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


class FeKey(ct.Structure):
    """struct fe_key {
        __u8 addr[16];     // IPv4 stored as ::ffff:a.b.c.d
        __u16 port;        // network order
        __u8 proto;
        __u8 pad;
        __u32 scope;       // 0 = default view, else namespace scope id
    };"""

    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8), ("scope", ct.c_uint32)]


class FeSlot(ct.Structure):
    """struct fe_slot {
        __u32 threshold;
        __u32 count;       // the rest: a copy of the group's group_value
        __u64 group_id;
        __u64 set_id;
        __u32 affinity_timeout_s;
        __u8 verdict;      // or VERDICT_NO_GROUP
        __u8 flags;
        __u8 pad[2];
    };"""

    _fields_ = [("threshold", ct.c_uint32), ("count", ct.c_uint32), ("group_id", ct.c_uint64),
                ("set_id", ct.c_uint64), ("affinity_timeout_s", ct.c_uint32), ("verdict", ct.c_uint8),
                ("flags", ct.c_uint8), ("pad", ct.c_uint8 * 2)]


class FeValue(ct.Structure):
    """struct fe_value {
        __u8 verdict;
        __u8 nslots;
        __u16 flags;
        __u32 pad;
        __u64 route_id;
        struct fe_slot slots[MAX_SLOTS];
    };"""

    _fields_ = [("verdict", ct.c_uint8), ("nslots", ct.c_uint8), ("flags", ct.c_uint16),
                ("pad", ct.c_uint32), ("route_id", ct.c_uint64), ("slots", FeSlot * MAX_SLOTS)]


class GroupValue(ct.Structure):
    """struct group_value {
        __u64 set_id;
        __u32 count;
        __u32 affinity_timeout_s;
        __u8 verdict;
        __u8 flags;        // GROUP_PASSIVE_HEALTH
        __u8 pad[6];
    };"""

    _fields_ = [("set_id", ct.c_uint64), ("count", ct.c_uint32), ("affinity_timeout_s", ct.c_uint32),
                ("verdict", ct.c_uint8), ("flags", ct.c_uint8), ("pad", ct.c_uint8 * 6)]


class EpKey(ct.Structure):
    """struct ep_key { __u64 set_id; __u32 index; __u32 pad; };"""

    _fields_ = [("set_id", ct.c_uint64), ("index", ct.c_uint32), ("pad", ct.c_uint32)]


class EpValue(ct.Structure):
    """struct ep_value { __u8 addr[16]; __u16 port; __u8 family; __u8 pad; };"""

    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("family", ct.c_uint8), ("pad", ct.c_uint8)]


class MemberKey(ct.Structure):
    """struct member_key { __u64 set_id; __u8 addr[16]; __u16 port; __u8 pad[6]; };"""

    _fields_ = [("set_id", ct.c_uint64), ("addr", ct.c_uint8 * 16), ("port", ct.c_uint16),
                ("pad", ct.c_uint8 * 6)]


class AffinityKey(ct.Structure):
    """struct affinity_key { __u64 netns_cookie; __u64 group_id; };"""

    _fields_ = [("netns_cookie", ct.c_uint64), ("group_id", ct.c_uint64)]


class AffinityValue(ct.Structure):
    """struct affinity_value { __u8 addr[16]; __u16 port; __u8 pad[6]; __u64 last_used_ns; };"""

    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("pad", ct.c_uint8 * 6),
                ("last_used_ns", ct.c_uint64)]


class ClientValue(ct.Structure):
    """struct client_value { __u32 scope; __u32 flags; };"""

    _fields_ = [("scope", ct.c_uint32), ("flags", ct.c_uint32)]


class ConfigValue(ct.Structure):
    """struct config_value { __u32 flags; __u32 pad; };"""

    _fields_ = [("flags", ct.c_uint32), ("pad", ct.c_uint32)]


class NameValue(ct.Structure):
    """struct name_value { char name[NAME_LEN]; };"""

    _fields_ = [("name", ct.c_char * NAME_LEN)]


class SockXlat(ct.Structure):
    """struct sock_xlat {
        __u8 frontend[16];
        __u8 endpoint[16];
        __u16 frontend_port;
        __u16 endpoint_port;
        __u8 used;
        __u8 pad[3];
        __u32 scope;
        __u32 pad2;
        __u64 group_id;
        __u64 set_id;
    };"""

    _fields_ = [("frontend", ct.c_uint8 * 16), ("endpoint", ct.c_uint8 * 16), ("frontend_port", ct.c_uint16),
                ("endpoint_port", ct.c_uint16), ("used", ct.c_uint8), ("pad", ct.c_uint8 * 3),
                ("scope", ct.c_uint32), ("pad2", ct.c_uint32), ("group_id", ct.c_uint64), ("set_id", ct.c_uint64)]


class SockWatch(ct.Structure):
    """struct sock_watch { __u64 set_id; __u32 index; __u32 count; };"""

    _fields_ = [("set_id", ct.c_uint64), ("index", ct.c_uint32), ("count", ct.c_uint32)]


class SockState(ct.Structure):
    """struct sock_state {
        struct sock_xlat xlat[SOCK_XLATS];
        __u32 next;
        __u32 pad;
        struct sock_watch watch;
    };"""

    _fields_ = [("xlat", SockXlat * SOCK_XLATS), ("next", ct.c_uint32), ("pad", ct.c_uint32),
                ("watch", SockWatch)]


class HealthKey(ct.Structure):
    """struct health_key { __u8 addr[16]; __u16 port; __u8 pad[6]; };"""

    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("pad", ct.c_uint8 * 6)]


class HealthValue(ct.Structure):
    """struct health_value { __u32 failures; __u32 ejections; __u64 until_ns; };"""

    _fields_ = [("failures", ct.c_uint32), ("ejections", ct.c_uint32), ("until_ns", ct.c_uint64)]


class EjectSlot(ct.Structure):
    """struct eject_slot { __u32 index; __u32 pad; __u64 until_ns; };"""

    _fields_ = [("index", ct.c_uint32), ("pad", ct.c_uint32), ("until_ns", ct.c_uint64)]


class SetEjections(ct.Structure):
    """struct set_ejections { struct eject_slot slot[EJECT_SLOTS]; };"""

    _fields_ = [("slot", EjectSlot * EJECT_SLOTS)]


class TraceControl(ct.Structure):
    """struct trace_control {
        __u64 expires_ns;     // bpf_ktime_get_ns() clock; 0 = off
        __u64 dropped;
        __u64 client_cgroup;
        __u8 frontend[16];
        __u16 frontend_port;  // network order; 0 = any
        __u8 proto;           // 0 = any
        __u8 pad;
        __u32 outcomes;       // bit (1 << OUT_*) set = traced
        __u32 flags;          // TRACE_MATCH_*
        __u32 client_level;
    };"""

    _fields_ = [("expires_ns", ct.c_uint64), ("dropped", ct.c_uint64), ("client_cgroup", ct.c_uint64),
                ("frontend", ct.c_uint8 * 16), ("frontend_port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8), ("outcomes", ct.c_uint32), ("flags", ct.c_uint32),
                ("client_level", ct.c_uint32)]


class Decision(ct.Structure):
    """struct decision {           // one trace event
        __u64 time_ns;
        __u64 cgroup_id;
        __u64 netns_cookie;
        __u64 route_id;
        __u64 group_id;
        __u8 frontend[16];
        __u8 endpoint[16];
        __u16 frontend_port;      // network order
        __u16 endpoint_port;      // network order
        __u32 scope;
        __u8 proto;
        __u8 kind;                // DECISION_*
        __u8 outcome;             // OUT_*
        __u8 pad;
        __u32 err;
    };"""

    _fields_ = [("time_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("netns_cookie", ct.c_uint64),
                ("route_id", ct.c_uint64), ("group_id", ct.c_uint64), ("frontend", ct.c_uint8 * 16),
                ("endpoint", ct.c_uint8 * 16), ("frontend_port", ct.c_uint16), ("endpoint_port", ct.c_uint16),
                ("scope", ct.c_uint32), ("proto", ct.c_uint8), ("kind", ct.c_uint8), ("outcome", ct.c_uint8),
                ("pad", ct.c_uint8), ("err", ct.c_uint32)]


U64 = ct.c_uint64
U32 = ct.c_uint32
#: A ring buffer has no key and no value (key_size = value_size = 0).
NOTHING = ct.c_uint8 * 0


#: The agent flag that sets a MapSizes field (`meshlet run --map-size NAME=ENTRIES`, repeatable):
#: named here so the errors that ask for a bigger map name the real option.
SIZE_OPTION = "--map-size"


@dataclass(frozen=True)
class MapSizes:
    """max_entries of each sized map, set with `meshlet run --map-size NAME=ENTRIES`. Defaults fit
    50k Services x 10 endpoints (dual-stack not counted twice: a single-stack cluster of that
    size), plus one revision in flight.

    Kernel memory (`memory_cost`, printed by `meshlet run --help` and logged at start): the hash
    maps are created with BPF_F_NO_PREALLOC, so up front they cost only their bucket array (16
    bytes per bucket, the size rounded up to a power of two); each entry in use then costs its
    element (a 48-byte header plus key and value, each rounded up to 8 bytes). The LRU maps
    (affinity, passive health) are preallocated: every entry and the buckets cost from the start.
    tests/kernel/datapath checks these estimates against the kernel's own count (fdinfo memlock). A pinned map keeps the size it
    was created with: starting with another size is refused (the message says how to go on).
    """

    frontends: int = 131072
    """Frontend entries: one per (ClusterIP/external IP, port, protocol) plus one per consumer
    scope that has its own routes. 50k Services with ~2 frontends each, and headroom.
    About 2 MiB up front and 344 bytes per entry in use (45 MiB when full)."""

    groups: int = 131072
    """Backend groups: one per (Service port, address family) in use as a backend.
    About 2 MiB up front and 80 bytes per entry in use."""

    endpoints: int = 655360
    """Endpoint entries over all current sets: 50k x 10 = 500k, plus room for new revisions
    written before old ones are deleted. About 16 MiB up front and 88 bytes per entry in use."""

    members: int = 131072
    """Endpoint membership entries, only for groups with ClientIP affinity.
    About 2 MiB up front and 88 bytes per entry in use."""

    affinity: int = 65536
    """Remembered (client netns, group) affinity choices; least recently used are evicted.
    Preallocated: about 7 MiB (96 bytes per entry and the buckets) from the start."""

    clients: int = 16384
    """Pod cgroups on this node (kubelet's max pods is 110 by default, 250 at most).
    About 256 KiB up front and 64 bytes per entry in use."""

    names: int = 262144
    """Human names of groups, routes and scopes, for `meshlet maps dump`.
    About 4 MiB up front and 152 bytes per entry in use."""

    health: int = 8192
    """Passive health records: endpoints whose handshakes failed lately (a success deletes
    one); least recently touched are evicted (that endpoint then needs fresh failures).
    Preallocated: about 0.8 MiB (88 bytes per entry and the buckets) from the start."""

    ejections: int = 4096
    """Endpoint sets with endpoints skipped now (passive health); least recently touched are
    evicted (their endpoints are picked again until they fail again).
    Preallocated: about 0.8 MiB (184 bytes per entry and the buckets) from the start."""

    udp_flows: int = 16384
    """Connected UDP sockets meshlet translated, by socket cookie, so the agent can terminate
    those whose endpoint goes away (SEMANTICS A16). LRU: closed sockets age out, and a live one
    evicted only escapes termination. Preallocated: about 2.2 MiB (120 bytes per entry and the buckets)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > MAX_MAP_ENTRIES:
                raise ValueError(f"MapSizes.{f.name} must be an integer from 1 to {MAX_MAP_ENTRIES}, "
                                 f"got {value!r}")


#: The names of the sized maps (the fields of MapSizes), as `--map-size` takes them.
SIZED_MAPS = tuple(f.name for f in fields(MapSizes))

#: Largest max_entries we accept for a sized map: the kernel refuses a hash map whose bucket array
#: would pass 2^31 entries, and far smaller maps already cost gigabytes.
MAX_MAP_ENTRIES = 1 << 26

#: Bytes of the kernel's element header of a hash map entry (struct htab_elem before its key).
_HTAB_ELEM_HEADER = 48
#: Bytes of a hash map bucket (struct bucket: a list head and a lock).
_HTAB_BUCKET = 16


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def memory_cost(name: str, sizes: MapSizes) -> tuple[int, int]:
    """(bytes the kernel allocates when the map is created, bytes per entry in use on top) for
    the sized map `name`: an estimate from the kernel's hash map layout (see MapSizes)."""
    spec = MAP_SPECS[name]
    entries = spec.max_entries(sizes)
    element = _HTAB_ELEM_HEADER + _round8(ct.sizeof(spec.key)) + _round8(ct.sizeof(spec.value))
    buckets = 1 << max(0, entries - 1).bit_length()
    if spec.flags & _NO_PREALLOC:
        return buckets * _HTAB_BUCKET, element
    return buckets * _HTAB_BUCKET + entries * element, 0


@dataclass(frozen=True)
class MapSpec:
    """What a pinned map must be: checked before adopting it (SEMANTICS D2)."""

    name: str
    type: int
    key: type
    value: type
    flags: int
    size_field: str | None  #: the MapSizes field giving max_entries, None for fixed sizes
    fixed_max: int = 0  #: PER_POSSIBLE_CPU: one entry per possible CPU of this machine

    def max_entries(self, sizes: MapSizes, possible_cpus: int = 0) -> int:
        if self.size_field:
            return getattr(sizes, self.size_field)
        return possible_cpus if self.fixed_max == PER_POSSIBLE_CPU else self.fixed_max


#: MapSpec.fixed_max of a perf event array: bcc sizes it to the possible CPUs, whatever we ask.
PER_POSSIBLE_CPU = -1


_HASH, _ARRAY, _PERCPU_ARRAY = U.MAP_TYPE_HASH, U.MAP_TYPE_ARRAY, U.MAP_TYPE_PERCPU_ARRAY
_LRU_HASH, _SK_STORAGE, _NO_PREALLOC = U.MAP_TYPE_LRU_HASH, U.MAP_TYPE_SK_STORAGE, U.BPF_F_NO_PREALLOC
_RINGBUF, _MMAPABLE, _PERF = U.MAP_TYPE_RINGBUF, U.BPF_F_MMAPABLE, U.MAP_TYPE_PERF_EVENT_ARRAY

#: Every map of bpf/sock.c, in the order the reconciler writes them.
MAP_SPECS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("endpoints", _HASH, EpKey, EpValue, _NO_PREALLOC, "endpoints"),
        MapSpec("members", _HASH, MemberKey, U32, _NO_PREALLOC, "members"),
        MapSpec("groups", _HASH, U64, GroupValue, _NO_PREALLOC, "groups"),
        MapSpec("clients", _HASH, U64, ClientValue, _NO_PREALLOC, "clients"),
        MapSpec("config", _ARRAY, U32, ConfigValue, 0, None, 1),
        MapSpec("names", _HASH, U64, NameValue, _NO_PREALLOC, "names"),
        MapSpec("frontends", _HASH, FeKey, FeValue, _NO_PREALLOC, "frontends"),
        MapSpec("fe_filter", _ARRAY, U32, ct.c_uint64, 0, None, FE_FILTER_WORDS),
        MapSpec("affinity", _LRU_HASH, AffinityKey, AffinityValue, 0, "affinity"),
        MapSpec("counters", _PERCPU_ARRAY, U32, ct.c_uint64, 0, None, OUT_COUNT),
        MapSpec("sockets", _SK_STORAGE, ct.c_int32, SockState, _NO_PREALLOC, None, 0),
        MapSpec("trace_control", _ARRAY, U32, TraceControl, _MMAPABLE, None, 1),
        MapSpec("trace_events", _RINGBUF, NOTHING, NOTHING, 0, None, TRACE_RING_BYTES),
        MapSpec("trace_perf", _PERF, ct.c_int32, U32, 0, None, PER_POSSIBLE_CPU),
        MapSpec("health", _LRU_HASH, HealthKey, HealthValue, 0, "health"),
        MapSpec("ejections", _LRU_HASH, U64, SetEjections, 0, "ejections"),
        MapSpec("eject_filter", _ARRAY, U32, ct.c_uint64, 0, None, 1 << EJECT_FILTER_SLOTS_LOG2),
        MapSpec("health_stats", _PERCPU_ARRAY, U32, ct.c_uint64, 0, None, HSTAT_COUNT),
        MapSpec("udp_flows", _LRU_HASH, U64, SockXlat, 0, "udp_flows"),
    )
}

#: Maps of `meshlet trace` only (agent/datapath/trace.py), never opened by the agent: the control
#: map and the event channel of the kernel (features.Support.trace_channel: the ring buffer
#: `trace_events`, else the perf event array `trace_perf`, else neither and no control map).
TRACE_MAPS = ("trace_control", "trace_events", "trace_perf")
#: features.Support.trace_channel values, and the map of each channel.
TRACE_RINGBUF, TRACE_PERF = "ringbuf", "perf"
TRACE_CHANNEL_MAPS = {TRACE_RINGBUF: "trace_events", TRACE_PERF: "trace_perf"}

#: Maps whose content the agent owns (plans, writes, sweeps). The others belong to the programs.
PLANNED_MAPS = ("endpoints", "members", "groups", "clients", "config", "names", "frontends")
#: Maps the reconciler writes: the planned ones, and the frontend filter it derives from the
#: frontends map's keys (fe_filter in bpf/meshlet.h).
WRITTEN_MAPS = PLANNED_MAPS + ("fe_filter",)

#: State the programs keep that a layout change carries over to the new maps when the map's type,
#: key and value are unchanged (loader.carry_over): session affinity and passive health's
#: ejections survive an upgrade, as they survive a restart (SEMANTICS A17). Health records are
#: keyed by the endpoint's address; a set's ejection slots name endpoints by their index in a set
#: whose id hashes the ordered endpoint list, so a carried slot can only ever meet the set (and
#: the index -> endpoint order) it was made for, or no set at all (then it ages out, LRU). Socket
#: storage cannot be copied (it lives on each socket), so it is not listed.
CARRIED_MAPS = ("affinity", "health", "ejections")

#: The one key of the config map (an array of one entry).
CONFIG_KEY = 0


def to_bytes(obj: ct._SimpleCData | ct.Structure) -> bytes:
    return bytes(obj)


def from_bytes(cls, raw: bytes):
    return cls.from_buffer_copy(raw)


def field_layout(cls, base: int = 0) -> list[tuple[str, int, int]]:
    """(path, offset, size) of every field of a mirror, recursing into structs and arrays of
    structs (paths as C writes them: `slots[3].group_id`): what the layout checks compare with
    the compiler's view of bpf/meshlet.h."""
    if not hasattr(cls, "_fields_"):
        return [("", base, ct.sizeof(cls))]
    out = []
    for name, ftype, *_ in cls._fields_:
        offset = base + getattr(cls, name).offset
        element = getattr(ftype, "_type_", None)
        if hasattr(ftype, "_length_") and hasattr(element, "_fields_"):
            for i in range(ftype._length_):
                out += [(f"{name}[{i}].{p}", o, s)
                        for p, o, s in field_layout(element, offset + i * ct.sizeof(element))]
        elif hasattr(ftype, "_fields_"):
            out += [(f"{name}.{p}", o, s) for p, o, s in field_layout(ftype, offset)]
        else:
            out.append((name, offset, ct.sizeof(ftype)))
    return out
