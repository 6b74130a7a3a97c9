"""`meshlet explain`: why a new connection from a pod to an address goes where it goes.

Role: read the pinned maps (no agent needed) and walk them exactly as the connect program in
bpf/sock.c does: the frontend entry of (address, port, protocol), the client's scope (the
consumer view of its namespace when the frontend has one, else the default view), the route
rule, the weighted split over backend groups with each share, each group's endpoints and
affinity, and the verdict. Then cross-check with the agent's /status/routes when an agent
answers, and say so when none does.

The walk (`explain_connection`) is pure: a map image (map name -> {key bytes: value bytes}, the
form the pinned maps hold and agent.datapath.plan's Plan.expand() gives) in, an `Explanation`
out; only `read_pinned_image` and `agent_routes` do I/O. The byte layout comes from
agent.datapath.layout and the namespace -> scope id hash from agent.datapath.plan: one home each.

The client: `--from NS/POD`. The scope is decided by namespace (SEMANTICS B5), so NS alone is
enough to explain the consumer/default choice. When the pod is in a lab that is up (meshlet lab
up), its cgroup is known too and the explanation also checks that the datapath knows the pod
(a pod whose cgroup is not in the clients map is treated as a node process: default view) and
whether it opted out (C2). `--from node` explains a node process.

May touch: the pinned maps (read only), the lab state files (read only), one HTTP GET.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import click

from agent.datapath import layout as L
from agent.datapath.entries import addr16
from agent.datapath.plan import scope_id
from agent.errors import UserError
from agent.model import SKIP_KEY

DEFAULT_AGENT = "http://127.0.0.1:9966"
DEFAULT_BPFFS = "/sys/fs/bpf/meshlet"
NODE = "node"

Image = dict[str, dict[bytes, bytes]]


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    protocol: str  #: TCP | UDP

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{addr}:{self.port}/{self.protocol.lower()}"


@dataclass(frozen=True)
class Client:
    namespace: str | None  #: None: a node process
    name: str | None
    cgroup_id: int | None = None  #: known when the pod is in a lab that is up

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else "a node process"


def parse_target(text: str) -> Target:
    """ADDR:PORT[/tcp|udp], IPv6 as [ADDR]:PORT."""
    hint = "hint: write it as 10.96.0.10:80/tcp or [fd00::a]:53/udp"
    rest, _, proto = text.partition("/")
    protocol = (proto or "tcp").upper()
    if protocol not in ("TCP", "UDP"):
        raise UserError(f"--to {text}: protocol {proto!r} is neither tcp nor udp; {hint}")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise UserError(f"--to {text} is not ADDR:PORT; {hint}") from None
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped  # an AF_INET6 socket to ::ffff:v4 takes the IPv4 rules (A13)
    return Target(str(address), number, protocol)


def parse_client(text: str, lab_pods: dict[str, "object"] | None = None) -> Client:
    if text == NODE:
        return Client(None, None)
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise UserError(f"--from {text} is not NAMESPACE/POD; hint: e.g. --from web/web-client, "
                        "or --from node for a process outside every pod")
    pod = (lab_pods or {}).get(text)
    cgroup_id = None
    if pod is not None:
        try:
            cgroup_id = os.stat(pod.cgroup).st_ino
        except OSError:
            cgroup_id = None
    return Client(namespace, name, cgroup_id)


# --- the walk (pure) ---------------------------------------------------------------------------


@dataclass
class EndpointLine:
    endpoint: str
    share: float  #: of this group's connections
    ejected_seconds: float = 0.0  #: passive health (A17): skipped for this much longer, 0 = not


@dataclass
class GroupLine:
    share: float  #: of the frontend's new connections
    group: str  #: the group's name, or "reject" for a rejected share
    verdict: str  #: forward | reject | unreachable
    affinity_timeout: int = 0
    endpoints: list[EndpointLine] = field(default_factory=list)


@dataclass
class Explanation:
    client: str
    target: str
    frontend: bool  #: is the target a frontend at all
    client_note: str = ""
    scope: str = ""  #: "default" or the consumer namespace
    route: str | None = None
    groups: list[GroupLine] = field(default_factory=list)
    verdict: str = ""
    agent_note: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def _name(image: Image, ident: int) -> str | None:
    raw = image.get("names", {}).get(bytes(L.U64(ident)))
    if raw is None:
        return None
    return L.from_bytes(L.NameValue, raw).name.decode(errors="replace")


def _address(raw16, port_be: int) -> str:
    data = bytes(raw16)
    ip = ipaddress.ip_address(data)
    if ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    port = socket.ntohs(port_be)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _frontend_key(target: Target, scope: int) -> bytes:
    key = L.FeKey(port=socket.htons(target.port), proto=L.PROTO_NUMBERS[target.protocol], scope=scope)
    key.addr[:] = addr16(target.address)
    return bytes(key)


def explain_connection(image: Image, client: Client, target: Target) -> Explanation:
    """What the connect program does with a new connection from `client` to `target`."""
    out = Explanation(client=str(client), target=str(target), frontend=False)
    fe_raw = image.get("frontends", {}).get(_frontend_key(target, 0))
    if fe_raw is None:
        out.verdict = "untouched: not a Service frontend, the connection goes to the address as given"
        return out
    out.frontend = True

    # The client's scope, as find_client() decides it in the kernel.
    scope = 0
    if client.namespace is None:
        out.client_note = "a node process: no pod, so the default view (B5)"
    elif client.cgroup_id is not None:
        raw = image.get("clients", {}).get(bytes(L.U64(client.cgroup_id)))
        if raw is None:
            out.client_note = (f"pod cgroup {client.cgroup_id} is not in the datapath's clients "
                               "map: treated as a node process (default view)")
        else:
            value = L.from_bytes(L.ClientValue, raw)
            if value.flags & L.CLIENT_SKIP:
                out.client_note = f"pod known (cgroup {client.cgroup_id}), opted out with {SKIP_KEY}"
                out.scope = "default"
                out.verdict = "untouched: the client opted out (C2), it reaches the frontend address itself"
                return out
            scope = value.scope
            out.client_note = f"pod known to the datapath (cgroup {client.cgroup_id}), namespace {client.namespace}"
    else:
        scope = scope_id(client.namespace)
        out.client_note = (f"namespace {client.namespace} (scope id {scope:#010x}); the pod's cgroup "
                           "is unknown here, so it is assumed known to the datapath and not opted out")

    fe = L.from_bytes(L.FeValue, fe_raw)
    out.scope = "default"
    if fe.flags & L.FE_HAS_SCOPES and scope:
        scoped = image.get("frontends", {}).get(_frontend_key(target, scope))
        if scoped is not None:
            fe = L.from_bytes(L.FeValue, scoped)
            out.scope = _name(image, scope) or client.namespace or f"scope {scope:#x}"
    if fe.route_id:
        out.route = _name(image, fe.route_id) or f"route {fe.route_id:#x} (name not in the names map)"

    if fe.verdict != L.VERDICT_FORWARD or fe.nslots == 0:
        out.verdict = "reject: ECONNREFUSED for every new connection (empty split, B13)"
        return out
    previous = 0
    for slot in list(fe.slots)[: fe.nslots]:
        share = (slot.threshold - previous) / L.THRESHOLD_SCALE
        previous = slot.threshold
        out.groups.append(_group_line(image, slot.group_id, share))

    refused = sum(g.share for g in out.groups if g.verdict == "reject")
    unreachable = sum(g.share for g in out.groups if g.verdict == "unreachable")
    forwarded = 1.0 - refused - unreachable
    parts = []
    if forwarded > 1e-9:
        parts.append(f"forward {forwarded:.0%} to the endpoints above")
    if refused > 1e-9:
        parts.append(f"reject {refused:.0%} with ECONNREFUSED")
    if unreachable > 1e-9:
        parts.append(f"fail {unreachable:.0%} with EHOSTUNREACH (no endpoint usable on this node)")
    out.verdict = "; ".join(parts)
    return out


def _group_line(image: Image, group_id: int, share: float) -> GroupLine:
    if group_id == 0:
        return GroupLine(share, "an invalid backendRef's share", "reject")
    name = _name(image, group_id) or f"group {group_id:#x}"
    raw = image.get("groups", {}).get(bytes(L.U64(group_id)))
    if raw is None:
        return GroupLine(share, name + " (missing from the groups map: left untouched)", "miss")
    group = L.from_bytes(L.GroupValue, raw)
    verdict = {L.VERDICT_FORWARD: "forward", L.VERDICT_REJECT: "reject",
               L.VERDICT_UNREACHABLE: "unreachable"}.get(group.verdict, f"verdict {group.verdict}")
    if verdict == "forward" and group.count == 0:
        verdict = "reject"
    line = GroupLine(share, name, verdict, group.affinity_timeout_s)
    if verdict == "forward":
        ejected = _ejected(image, group) if group.flags & L.GROUP_PASSIVE_HEALTH else {}
        each = 1 / (group.count - len(ejected))
        for index in range(group.count):
            ep_raw = image.get("endpoints", {}).get(bytes(L.EpKey(set_id=group.set_id, index=index)))
            if ep_raw is None:
                line.endpoints.append(EndpointLine(f"(endpoint {index} missing)", each))
                continue
            ep = L.from_bytes(L.EpValue, ep_raw)
            left = ejected.get(index, 0.0)
            line.endpoints.append(EndpointLine(_address(ep.addr, ep.port), 0.0 if left else each, left))
    return line


def _ejected(image: Image, group: L.GroupValue) -> dict[int, float]:
    """Index -> seconds left, for the endpoints passive health skips in the group's set now
    (as the connect program counts them: at most half the set)."""
    raw = image.get("ejections", {}).get(bytes(L.U64(group.set_id)))
    if raw is None:
        return {}
    now = time.monotonic_ns()  # the programs' clock (bpf_ktime_get_ns)
    out = {}
    for slot in L.from_bytes(L.SetEjections, raw).slot:
        if slot.until_ns > now and slot.index < group.count:
            out[slot.index] = round((slot.until_ns - now) / 1e9, 3)
    return out if 2 * len(out) <= group.count else {}


def render(ex: Explanation) -> list[str]:
    lines = [f"connection from {ex.client} to {ex.target}"]
    if not ex.frontend:
        return lines + [f"  verdict   {ex.verdict}"]
    lines.append(f"  frontend  {ex.target} (matched)")
    lines.append(f"  client    {ex.client_note}")
    scope = ("default view (no consumer route of the client's namespace)" if ex.scope == "default"
             else f"consumer view of namespace {ex.scope} (its route replaces the producer's, B5)")
    lines.append(f"  scope     {scope}")
    lines.append(f"  route     {ex.route or 'none: the Service balances over its own endpoints'}")
    for i, group in enumerate(ex.groups):
        label = "split" if i == 0 else ""
        state = "" if group.verdict == "forward" else f"  ({group.verdict})"
        lines.append(f"  {label:<9} {group.share:>6.1%}  {group.group}{state}")
        if group.verdict == "forward":
            affinity = (f"ClientIP affinity {group.affinity_timeout} s: a client netns keeps its "
                        "first pick" if group.affinity_timeout else "uniform per new connection")
            lines.append(f"  {'':<9} {'':>6}    endpoints: {affinity}")
            for ep in group.endpoints:
                ejected = (f"  (ejected by passive health: skipped for {ep.ejected_seconds:.1f} s more)"
                           if ep.ejected_seconds else "")
                lines.append(f"  {'':<9} {'':>6}    {ep.share:>6.1%}  {ep.endpoint}{ejected}")
    lines.append(f"  verdict   {ex.verdict}")
    if ex.agent_note:
        lines.append(f"  agent     {ex.agent_note}")
    return lines


# --- I/O ---------------------------------------------------------------------------------------


def read_pinned_image(bpffs: str) -> Image:
    """The planned maps' contents, read from their pins (agent not needed)."""
    from agent.datapath.bpfsys import BpfError, Map
    from agent.datapath.loader import map_pin, maps_dir

    directory = maps_dir(bpffs)
    if not os.path.isdir(directory):
        raise UserError(f"no pinned maps in {directory}; hint: is `meshlet run --bpffs {bpffs}` "
                        "running (or was it)? pass the same --bpffs here")
    image: Image = {}
    for name in (*L.PLANNED_MAPS, "ejections"):  # ejections: passive health's skips (A17)
        path = map_pin(bpffs, name)
        try:
            with Map.open_pinned(path) as pinned:
                image[name] = pinned.items()
        except (BpfError, OSError) as err:
            raise UserError(f"cannot read the pinned map {path}: {err}; hint: run as root, with the "
                            "--bpffs the agent uses") from None
    return image


def agent_routes(url: str, timeout: float = 2.0) -> list[dict]:
    with urllib.request.urlopen(url.rstrip("/") + "/status/routes", timeout=timeout) as answer:
        return json.load(answer)


def cross_check(ex: Explanation, routes: list[dict] | None, url: str, error: str = "") -> str:
    """One line comparing the route the maps name with the agent's own status for it."""
    if routes is None:
        return f"could not reach the agent at {url} ({error}): the maps alone are explained above"
    if ex.route is None:
        return f"reachable at {url}; no route applies here, nothing to compare"
    kind, _, rest = ex.route.partition(" ")
    ref = rest.split(" rule ")[0]
    for entry in routes:
        if entry.get("kind") == kind and f"{entry.get('namespace')}/{entry.get('name')}" == ref:
            conditions = sorted({
                f"{c['type']}={c['status']}" + ("" if c["status"] == "True" else f" ({c['reason']})")
                for parent in entry.get("parents", []) for c in parent.get("conditions", [])
            })
            return f"agent at {url} reports {kind} {ref}: {', '.join(conditions) or 'no conditions'}"
    return f"agent at {url} does not list {kind} {ref}: the maps may be older than the agent's view"


def _lab_pods() -> dict:
    """Pods of every lab that is up, by "namespace/name" (the first lab wins on a clash)."""
    from agent.lab.cli import list_labs, load_state
    from agent.lab.pods import Pod

    pods = {}
    for name in list_labs():
        try:
            state = load_state(name)
        except UserError:
            continue
        for data in state.get("pods", []):
            pod = Pod.from_json(data)
            pods.setdefault(pod.ref, pod)
    return pods


@click.command()
@click.option("--from", "source", required=True, metavar="NS/POD",
              help="the client pod (its namespace decides its scope), or 'node'")
@click.option("--to", "to", required=True, metavar="ADDR:PORT[/tcp|udp]", help="where it connects")
@click.option("--bpffs", default=DEFAULT_BPFFS, show_default=True, help="where the agent pins its maps")
@click.option("--agent", "agent_url", default=DEFAULT_AGENT, show_default=True,
              help="the agent's listener, for the cross-check with /status/routes")
@click.option("-o", "output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def explain(source, to, bpffs, agent_url, output):
    """Explain where a new connection from a pod to an address goes, from the pinned maps.

    Shows the frontend matched, the scope (consumer or default), the route rule, the weighted
    backend groups with their shares and endpoints, affinity and the verdict; then compares the
    route with the agent's /status/routes when the agent answers.

    \b
    Example:
      meshlet explain --from web/web-client --to 10.96.10.10:80/tcp --bpffs /sys/fs/bpf/meshlet
    """
    target = parse_target(to)
    client = parse_client(source, _lab_pods())
    ex = explain_connection(read_pinned_image(bpffs), client, target)
    if ex.frontend:
        try:
            ex.agent_note = cross_check(ex, agent_routes(agent_url), agent_url)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            ex.agent_note = cross_check(ex, None, agent_url, str(reason))
    if output == "json":
        click.echo(json.dumps(ex.as_json(), indent=1))
    else:
        click.echo("\n".join(render(ex)))
