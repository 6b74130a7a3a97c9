"""Read the pinned maps without the agent and decode them into typed records for humans.

Role: the data behind `meshlet maps dump` (agent/datapath/cli.py) and `meshlet explain`. It reads
through bpfsys only (no compile, no bcc) and never writes. Decoding uses the layout mirrors, so
it has no byte offsets of its own; ids are shown with the human names the reconciler keeps in
the `names` map.

Records are plain frozen dataclasses whose fields are the table's columns and the JSON keys
(stable: scripts rely on them). The socket-local storage map is not listed: the kernel offers
no way to iterate it from user space.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import asdict, dataclass, field

from agent.datapath import bpfsys
from agent.datapath import layout as L
from agent.datapath.entries import addr_text
from agent.errors import UserError
from agent.model import host_port

VERDICT_NAMES = {L.VERDICT_FORWARD: "forward", L.VERDICT_REJECT: "reject",
                 L.VERDICT_UNREACHABLE: "unreachable"}


# --- decoding helpers --------------------------------------------------------------------------


def format_endpoint(raw: bytes, port_be: int) -> str:
    return host_port(addr_text(raw), socket.ntohs(port_be))


def format_frontend_key(key: L.FeKey) -> str:
    proto = L.PROTO_NAMES.get(key.proto, str(key.proto)).lower()
    scope = f" scope={key.scope:#x}" if key.scope else ""
    return f"{format_endpoint(bytes(key.addr), key.port)}/{proto}{scope}"


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    group: str  #: group name, or "reject" for a rejected share
    group_id: int
    share: float  #: probability of this slot, from the thresholds


@dataclass(frozen=True)
class FrontendRow:
    address: str
    port: int
    protocol: str
    scope: str  #: "" for the default view, else the consumer namespace (or its id if unnamed)
    verdict: str
    has_scopes: bool
    route: str  #: the Route rule in effect, "" for the Service's own balancing
    split: tuple[Share, ...]


@dataclass(frozen=True)
class GroupRow:
    group: str
    group_id: int
    set_id: int
    count: int
    affinity_timeout: int
    verdict: str
    passive_health: bool = True  #: GROUP_PASSIVE_HEALTH: its failing endpoints are ejected (A17)


@dataclass(frozen=True)
class EndpointRow:
    group: str  #: the group whose current set this is, "" for a set no group names (stale)
    set_id: int
    index: int
    address: str
    port: int


@dataclass(frozen=True)
class MemberRow:
    set_id: int
    address: str
    port: int
    index: int


@dataclass(frozen=True)
class AffinityRow:
    netns_cookie: int
    group: str
    endpoint: str
    idle_seconds: float  #: since the client last used it


@dataclass(frozen=True)
class ClientRow:
    cgroup_id: int
    scope: str
    scope_id: int
    skip: bool


@dataclass(frozen=True)
class CounterRow:
    outcome: str
    total: int


@dataclass(frozen=True)
class NameRow:
    id: int
    name: str


@dataclass(frozen=True)
class HealthRow:
    """Passive health (SEMANTICS A17): an endpoint whose TCP handshakes failed lately."""

    endpoint: str
    failures: int  #: consecutive failed handshakes since its last ejection (or success)
    ejections: int  #: ejections since its last success (the back-off doubles with each)
    backoff_left_seconds: float  #: until its back-off ends; 0 = not ejected now
    skipped_in: tuple[str, ...]  #: groups whose current endpoint set skips it now


@dataclass
class MapsView:
    """Every readable map, decoded. `names` resolves ids (group, route, scope) to text."""

    frontends: list[FrontendRow] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    endpoints: list[EndpointRow] = field(default_factory=list)
    members: list[MemberRow] = field(default_factory=list)
    affinity: list[AffinityRow] = field(default_factory=list)
    clients: list[ClientRow] = field(default_factory=list)
    counters: list[CounterRow] = field(default_factory=list)
    names: list[NameRow] = field(default_factory=list)
    health: list[HealthRow] = field(default_factory=list)

    def skipped_endpoints(self, group_name: str) -> dict[str, float]:
        """Endpoint -> seconds of back-off left, for the endpoints `group_name` skips now."""
        return {h.endpoint: h.backoff_left_seconds for h in self.health if group_name in h.skipped_in}

    def as_json(self, which: str | None = None) -> dict:
        tables = DUMPABLE if which is None else (which,)
        return {name: [asdict(row) for row in getattr(self, name)] for name in tables}


#: Maps `meshlet maps dump WHICH` accepts, in dump order.
DUMPABLE = ("frontends", "groups", "endpoints", "members", "affinity", "clients", "counters", "names", "health")

#: Maps read for a table whose name is not a map's.
_READ_FOR = {"health": ("health", "ejections")}


# --- reading -----------------------------------------------------------------------------------


def read_raw(bpffs: str) -> dict[str, dict[bytes, bytes] | list]:
    """Raw entries of every pinned map (counters: one list of per-CPU values per index)."""
    from agent.datapath.loader import map_pin, maps_dir  # one home for pin paths

    if not os.path.isdir(maps_dir(bpffs)):
        raise UserError(f"no meshlet maps pinned under {maps_dir(bpffs)}; hint: is the agent running "
                        "here? pass the --bpffs it uses")
    raw: dict = {}
    for name in (m for table in DUMPABLE for m in _READ_FOR.get(table, (table,))):
        path = map_pin(bpffs, name)
        try:
            m = bpfsys.Map.open_pinned(path)
        except bpfsys.BpfError as err:
            raise UserError(f"cannot open the pinned map {path}: {err.strerror}; hint: run as root, "
                            "and pass the --bpffs the agent uses") from None
        with m:
            if name == "counters":
                raw[name] = [m.lookup(bytes(L.U32(i))) for i in range(L.OUT_COUNT)]
            else:
                raw[name] = m.items()
    return raw


def read_maps(bpffs: str) -> MapsView:
    return decode(read_raw(bpffs), now_ns=time.monotonic_ns())


def decode(raw: dict, now_ns: int = 0) -> MapsView:
    """Records from raw entries (pure: the tests feed planned images through it)."""
    names = {int.from_bytes(k, "little"): L.NameValue.from_buffer_copy(v).name.decode(errors="replace")
             for k, v in raw.get("names", {}).items()}
    view = MapsView(names=[NameRow(i, n) for i, n in sorted(names.items())])

    def group_name(gid: int) -> str:
        return names.get(gid, f"{gid:#018x}")

    for k, v in raw.get("frontends", {}).items():
        key, val = L.FeKey.from_buffer_copy(k), L.FeValue.from_buffer_copy(v)
        split, previous = [], 0
        for i in range(min(val.nslots, L.MAX_SLOTS)):
            slot = val.slots[i]
            share = (slot.threshold - previous) / L.THRESHOLD_SCALE
            previous = slot.threshold
            split.append(Share(group_name(slot.group_id) if slot.group_id else "reject", slot.group_id,
                               round(share, 9)))
        view.frontends.append(FrontendRow(
            address=addr_text(bytes(key.addr)), port=socket.ntohs(key.port),
            protocol=L.PROTO_NAMES.get(key.proto, str(key.proto)),
            scope=names.get(key.scope, f"{key.scope:#x}") if key.scope else "",
            verdict=VERDICT_NAMES.get(val.verdict, str(val.verdict)),
            has_scopes=bool(val.flags & L.FE_HAS_SCOPES),
            route=names.get(val.route_id, f"{val.route_id:#x}") if val.route_id else "",
            split=tuple(split)))
    view.frontends.sort(key=lambda f: (f.protocol, _sort_addr(f.address), f.port, f.scope))

    set_owner: dict[int, str] = {}
    for k, v in raw.get("groups", {}).items():
        gid, g = int.from_bytes(k, "little"), L.GroupValue.from_buffer_copy(v)
        set_owner[g.set_id] = group_name(gid)
        view.groups.append(GroupRow(group_name(gid), gid, g.set_id, g.count, g.affinity_timeout_s,
                                    VERDICT_NAMES.get(g.verdict, str(g.verdict)),
                                    bool(g.flags & L.GROUP_PASSIVE_HEALTH)))
    view.groups.sort(key=lambda g: g.group)

    for k, v in raw.get("endpoints", {}).items():
        key, ep = L.EpKey.from_buffer_copy(k), L.EpValue.from_buffer_copy(v)
        view.endpoints.append(EndpointRow(set_owner.get(key.set_id, ""), key.set_id, key.index,
                                          addr_text(bytes(ep.addr)), socket.ntohs(ep.port)))
    view.endpoints.sort(key=lambda e: (e.group, e.set_id, e.index))

    for k, v in raw.get("members", {}).items():
        key = L.MemberKey.from_buffer_copy(k)
        view.members.append(MemberRow(key.set_id, addr_text(bytes(key.addr)), socket.ntohs(key.port),
                                      int.from_bytes(v, "little")))
    view.members.sort(key=lambda m: (m.set_id, m.index))

    for k, v in raw.get("affinity", {}).items():
        key, a = L.AffinityKey.from_buffer_copy(k), L.AffinityValue.from_buffer_copy(v)
        idle = max(0, now_ns - a.last_used_ns) / 1e9 if now_ns else 0.0
        view.affinity.append(AffinityRow(key.netns_cookie, group_name(key.group_id),
                                         format_endpoint(bytes(a.addr), a.port), round(idle, 3)))
    view.affinity.sort(key=lambda a: (a.netns_cookie, a.group))

    for k, v in raw.get("clients", {}).items():
        c = L.ClientValue.from_buffer_copy(v)
        view.clients.append(ClientRow(int.from_bytes(k, "little"), names.get(c.scope, f"{c.scope:#x}"),
                                      c.scope, bool(c.flags & L.CLIENT_SKIP)))
    view.clients.sort(key=lambda c: (c.scope, c.cgroup_id))

    view.health = decode_health(raw, group_name, set_owner, now_ns)

    per_index = raw.get("counters", [])
    for index, outcome in L.OUTCOMES.items():
        values = per_index[index] if index < len(per_index) and per_index[index] else []
        total = sum(int.from_bytes(v, "little") for v in values)
        view.counters.append(CounterRow(outcome, total))
    return view


def decode_health(raw: dict, group_name, set_owner: dict[int, str], now_ns: int) -> list[HealthRow]:
    """Health records joined with the sets that skip them now (through the endpoints map)."""
    endpoint_of = {}  # (set_id, index) -> "addr:port"
    for k, v in raw.get("endpoints", {}).items():
        key, ep = L.EpKey.from_buffer_copy(k), L.EpValue.from_buffer_copy(v)
        endpoint_of[(key.set_id, key.index)] = format_endpoint(bytes(ep.addr), ep.port)
    skipped: dict[str, list[str]] = {}
    for k, v in raw.get("ejections", {}).items():
        sid = int.from_bytes(k, "little")
        for slot in L.SetEjections.from_buffer_copy(v).slot:
            endpoint = endpoint_of.get((sid, slot.index))
            if slot.until_ns > now_ns and endpoint and sid in set_owner:
                skipped.setdefault(endpoint, []).append(set_owner[sid])
    rows = []
    for k, v in raw.get("health", {}).items():
        key, h = L.HealthKey.from_buffer_copy(k), L.HealthValue.from_buffer_copy(v)
        endpoint = format_endpoint(bytes(key.addr), key.port)
        left = max(0, h.until_ns - now_ns) / 1e9
        rows.append(HealthRow(endpoint, h.failures, h.ejections, round(left, 3),
                              tuple(sorted(skipped.get(endpoint, ())))))
    rows.sort(key=lambda r: r.endpoint)
    return rows


def _sort_addr(text: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(text)
    return ip.version, ip.packed


# --- canonical text ----------------------------------------------------------------------------


def render(view: MapsView, tables: tuple[str, ...] = ("frontends", "groups", "endpoints", "members",
                                                      "clients", "names")) -> str:
    """A canonical text dump, one line per entry, sorted: golden tests compare it, humans read it."""
    lines: list[str] = []
    for table in tables:
        lines.append(f"{table}:")
        for row in getattr(view, table):
            lines.extend("  " + line for line in _render_row(row))
    return "\n".join(lines) + "\n"


def _render_row(row) -> list[str]:
    if isinstance(row, FrontendRow):
        head = f"{host_port(row.address, row.port)}/{row.protocol.lower()}"
        head += f" scope={row.scope}" if row.scope else ""
        head += f" {row.verdict}" + (" has-scopes" if row.has_scopes else "")
        head += f" via {row.route}" if row.route else ""
        return [head] + [f"  {s.share:.9f} {s.group}" for s in row.split]
    if isinstance(row, GroupRow):
        affinity = f" affinity={row.affinity_timeout}s" if row.affinity_timeout else ""
        health = "" if row.passive_health else " passive-health=off"
        return [f"{row.group} {row.verdict} count={row.count} set={row.set_id:#018x}{affinity}{health}"]
    if isinstance(row, EndpointRow):
        return [f"{row.group or '(stale set)'} #{row.index} {host_port(row.address, row.port)}"]
    if isinstance(row, MemberRow):
        return [f"set={row.set_id:#018x} {host_port(row.address, row.port)} -> #{row.index}"]
    if isinstance(row, ClientRow):
        return [f"cgroup {row.cgroup_id} scope={row.scope}" + (" skip" if row.skip else "")]
    if isinstance(row, NameRow):
        return [f"{row.id:#018x} {row.name}"]
    return [str(row)]
