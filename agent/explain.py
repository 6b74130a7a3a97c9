"""`meshlet explain`: why a new connection from a pod to an address goes where it goes.

Role: walk the datapath's decoded view of the pinned maps (agent.datapath.dump's MapsView, the
same records `meshlet maps dump` prints) exactly as the connect program in bpf/sock.c walks the
maps: the frontend entry of (address, port, protocol), the client's scope (the consumer view of
its namespace when the frontend has one, else the default view), the route rule, the weighted
split over backend groups with each share, each group's endpoints and affinity, and the
verdict. Then cross-check with the agent's /status/routes when an agent answers, and say so
when none does.

The walk (`explain_connection`) is pure: a MapsView in, an `Explanation` out. `explain_text`
is the whole command (parse, find the pod's cgroup, walk, cross-check); the CLI and the lab's
demo both call it, each with its own way to find a pod's cgroup (`PodCgroups`): the CLI asks
the agent (/status/pods: the pods it knows on this node and their cgroups), the demo asks its
lab. This module never imports the lab.

The client: `--from NS/POD`. The scope is decided by namespace (SEMANTICS B5), so NS alone is
enough to explain the consumer/default choice. When the pod's cgroup is known, the explanation
also checks that the datapath knows the pod (a pod whose cgroup is not in the clients map is
treated as a node process: default view) and whether it opted out (C2). `--from node` explains
a node process.

May touch: the pinned maps (read only, through dump), two HTTP GETs to the agent.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Callable

import click

from agent.datapath import loader
from agent.datapath.dump import FrontendRow, MapsView, read_maps
from agent.datapath.plan import scope_id
from agent.errors import UserError
from agent.model import SKIP_KEY, host_port
from agent.runtime.settings import DEFAULT_LISTEN

DEFAULT_AGENT = f"http://{DEFAULT_LISTEN}"  # the agent's default --listen
NODE = "node"

#: (namespace, pod name) -> the pod's cgroup id on this node, None when unknown.
PodCgroups = Callable[[str, str], "int | None"]


def no_pod_cgroups(namespace: str, name: str) -> None:
    return None


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    protocol: str  #: TCP | UDP

    def __str__(self) -> str:
        return f"{host_port(self.address, self.port)}/{self.protocol.lower()}"


@dataclass(frozen=True)
class Client:
    namespace: str | None  #: None: a node process
    name: str | None
    cgroup_id: int | None = None  #: known when the pod lookup found it

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


def parse_client(text: str, pod_cgroups: PodCgroups = no_pod_cgroups) -> Client:
    if text == NODE:
        return Client(None, None)
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise UserError(f"--from {text} is not NAMESPACE/POD; hint: e.g. --from web/web-client, "
                        "or --from node for a process outside every pod")
    return Client(namespace, name, pod_cgroups(namespace, name))


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
    existing: str = ""  #: what happens to sockets already open when their endpoint goes (A16)

    def as_json(self) -> dict:
        return asdict(self)


def _frontend(view: MapsView, target: Target, scope: str) -> FrontendRow | None:
    for row in view.frontends:
        if (row.address, row.port, row.protocol, row.scope) == (target.address, target.port, target.protocol, scope):
            return row
    return None


def explain_connection(view: MapsView, client: Client, target: Target) -> Explanation:
    """What the connect program does with a new connection from `client` to `target`."""
    out = Explanation(client=str(client), target=str(target), frontend=False)
    default = _frontend(view, target, "")
    if default is None:
        out.verdict = "untouched: not a Service frontend, the connection goes to the address as given"
        return out
    out.frontend = True
    out.existing = existing_sockets(target.protocol)

    # The client's scope, as find_client() decides it in the kernel: its namespace's name in
    # the decoded view (or the id's hex form when the names map lacks it).
    scope_names: tuple[str, ...] = ()
    if client.namespace is None:
        out.client_note = "a node process: no pod, so the default view (B5)"
    elif client.cgroup_id is not None:
        known = next((c for c in view.clients if c.cgroup_id == client.cgroup_id), None)
        if known is None:
            out.client_note = (f"pod cgroup {client.cgroup_id} is not in the datapath's clients "
                               "map: treated as a node process (default view)")
        elif known.skip:
            out.client_note = f"pod known (cgroup {client.cgroup_id}), opted out with {SKIP_KEY}"
            out.scope = "default"
            out.verdict = "untouched: the client opted out (C2), it reaches the frontend address itself"
            return out
        else:
            scope_names = (known.scope, f"{known.scope_id:#x}")
            out.client_note = f"pod known to the datapath (cgroup {client.cgroup_id}), namespace {client.namespace}"
    else:
        sid = scope_id(client.namespace)
        scope_names = (client.namespace, f"{sid:#x}")
        out.client_note = (f"namespace {client.namespace} (scope id {sid:#010x}); the pod's cgroup "
                           "is unknown here, so it is assumed known to the datapath and not opted out")

    fe = default
    out.scope = "default"
    if default.has_scopes:
        scoped = next((row for name in scope_names if (row := _frontend(view, target, name))), None)
        if scoped is not None:
            fe, out.scope = scoped, scoped.scope
    out.route = fe.route or None

    if fe.verdict != "forward" or not fe.split:
        out.verdict = "reject: ECONNREFUSED for every new connection (empty split, B13)"
        return out
    for share in fe.split:
        out.groups.append(_group_line(view, share.group_id, share.group, share.share))

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


def existing_sockets(protocol: str) -> str:
    """What happens to sockets already open to this frontend when their endpoint leaves the
    Service or the frontend is deleted (SEMANTICS A10, A14, A16)."""
    if protocol == "UDP":
        return ("a connected UDP socket whose endpoint leaves (or whose frontend is deleted) is ended within "
                "1 s of the agent's sync: its next call fails and a reconnect picks again; an unconnected one "
                "keeps its endpoint while it stays usable, else its next datagram picks again (A16)")
    if protocol == "TCP":
        return ("established connections keep their endpoint when it leaves (A14), unless the agent runs "
                "with --terminate-tcp=true: then they are ended within 1 s of the sync (A16)")
    return "established connections keep their endpoint when it leaves (A14)"


def _group_line(view: MapsView, group_id: int, name: str, share: float) -> GroupLine:
    if group_id == 0:
        return GroupLine(share, "an invalid backendRef's share", "reject")
    group = next((g for g in view.groups if g.group_id == group_id), None)
    if group is None:
        return GroupLine(share, name + " (missing from the groups map: left untouched)", "miss")
    verdict = group.verdict
    if verdict == "forward" and group.count == 0:
        verdict = "reject"
    line = GroupLine(share, group.group, verdict, group.affinity_timeout)
    if verdict == "forward":
        # Passive health's skips, as the connect program counts them: at most half the set.
        ejected = view.skipped_endpoints(group.group) if group.passive_health else {}
        if 2 * len(ejected) > group.count:
            ejected = {}
        each = 1 / (group.count - len(ejected))
        by_index = {e.index: e for e in view.endpoints if e.set_id == group.set_id}
        for index in range(group.count):
            ep = by_index.get(index)
            if ep is None:
                line.endpoints.append(EndpointLine(f"(endpoint {index} missing)", each))
                continue
            shown = host_port(ep.address, ep.port)
            left = ejected.get(shown, 0.0)
            line.endpoints.append(EndpointLine(shown, 0.0 if left else each, left))
    return line


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
    if ex.existing and ex.verdict and not ex.verdict.startswith("untouched"):
        lines.append(f"  existing  {ex.existing}")
    if ex.agent_note:
        lines.append(f"  agent     {ex.agent_note}")
    return lines


# --- the command: the CLI and the demo run this ----------------------------------------------------


def explain_text(read_view: Callable[[], MapsView], source: str, to: str, pod_cgroups: PodCgroups,
                 agent_url: str | None) -> Explanation:
    """`meshlet explain --from SOURCE --to TO`: read_view gives the decoded maps (read after the
    arguments are checked), pod_cgroups finds the pod's cgroup, agent_url None skips the
    cross-check with the agent."""
    target = parse_target(to)
    client = parse_client(source, pod_cgroups)
    ex = explain_connection(read_view(), client, target)
    if ex.frontend and agent_url is not None:
        try:
            ex.agent_note = cross_check(ex, agent_routes(agent_url), agent_url)
        except (urllib.error.URLError, OSError, ValueError) as err:
            ex.agent_note = cross_check(ex, None, agent_url, str(getattr(err, "reason", err)))
    return ex


# --- I/O ---------------------------------------------------------------------------------------


def _get_json(url: str, path: str, timeout: float = 2.0):
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as answer:
        return json.load(answer)


def agent_routes(url: str, timeout: float = 2.0) -> list[dict]:
    return _get_json(url, "/status/routes", timeout)


def agent_pod_cgroups(url: str) -> PodCgroups:
    """The production lookup: the pods the agent at `url` knows on this node (/status/pods),
    fetched once, on first use. An agent that does not answer knows no pod (the explanation
    then says the pod's cgroup is unknown)."""
    known: dict[tuple[str, str], int] | None = None

    def lookup(namespace: str, name: str) -> int | None:
        nonlocal known
        if known is None:
            try:
                pods = _get_json(url, "/status/pods")
            except (urllib.error.URLError, OSError, ValueError):
                pods = []
            known = {(p.get("namespace"), p.get("name")): p.get("cgroup_id") for p in pods if isinstance(p, dict)}
        return known.get((namespace, name))

    return lookup


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




@click.command()
@click.option("--from", "source", required=True, metavar="NS/POD",
              help="the client pod (its namespace decides its scope), or 'node'")
@click.option("--to", "to", required=True, metavar="ADDR:PORT[/tcp|udp]", help="where it connects")
@click.option("--bpffs", default=loader.DEFAULT_BPFFS, show_default=True, help="where the agent pins its maps")
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
    ex = explain_text(lambda: read_maps(bpffs), source, to, agent_pod_cgroups(agent_url), agent_url)
    if output == "json":
        click.echo(json.dumps(ex.as_json(), indent=1))
    else:
        click.echo("\n".join(render(ex)))
