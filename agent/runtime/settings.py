"""Settings of `meshlet run`: one documented dataclass, and the defaults the CLI contract names.

Role: turn flags and the environment into one frozen `Settings` value; every tunable of the runtime
(intervals, thresholds) lives here with a docstring saying what it does and why its default.
May touch: the environment ($NODE_NAME), the host name and /proc/mounts (to find cgroup2), nothing
else. Invariant: a `Settings` value is complete and valid; bad input raises UserError with a hint.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from agent.datapath import loader
from agent.datapath.layout import SIZE_OPTION, SIZED_MAPS, MapSizes
from agent.errors import UserError
from agent.model import host_port
from agent.mounts import PROC_MOUNTS, require_cgroup2_mount

#: Defaults from the CLI contract (DESIGN.md, "The command line").
DEFAULT_BPFFS = Path(loader.DEFAULT_BPFFS)
DEFAULT_LISTEN = "127.0.0.1:9966"

LOG_FORMATS = ("kv", "json")


@dataclass(frozen=True)
class Settings:
    """Everything `meshlet run` needs to know; built once at start, never mutated."""

    node_name: str
    """This node's name: decides local endpoints, topology hints, and which Pods are ours."""

    cgroup_root: Path
    """The cgroup2 directory the programs attach to and below which pod cgroups are scanned."""

    bpffs: Path
    """The bpffs directory holding our pinned maps and program links (versioned below it)."""

    listen: tuple[str, int]
    """Address and port of the HTTP listener (/healthz /readyz /metrics /status/routes)."""

    manifests: Path | None = None
    """A directory of manifests to read instead of a cluster (the embedded default)."""

    kubeconfig: Path | None = None
    """A kubeconfig file; with neither this nor `manifests`, the in-cluster config is used."""

    log_format: str = "kv"
    """`kv` (key=value, one line per event) or `json` (one JSON object per line)."""

    min_sync_interval: float = 0.005
    """Seconds between the starts of two syncs: changes arriving meanwhile (or while a sync runs)
    coalesce into one write. 5 ms caps syncs at 200 a second yet keeps event-to-map latency near
    10 ms under steady churn (the bench's churn row), far under SEMANTICS B15's 1 s; 80 ms, the
    former value, alone put ~40 ms on an average change."""

    map_check_period: float = 60.0
    """Seconds within which the periodic check compares every planned map entry with what the
    agent wrote (`--map-check-period`), a bounded part at a time between syncs; a difference (a
    map changed behind the agent's back) is repaired by a full reconcile at once. A map entry
    changed behind the agent's back is thus repaired within about one period (two at most,
    when the change lands in a part the running check has just read)."""

    retry_initial: float = 0.2
    """First wait after a failed write; doubles on each further failure."""

    retry_max: float = 10.0
    """Cap on the wait between retries of a failing write."""

    stale_change_threshold: float = 30.0
    """/healthz fails when a change seen after the first sync is still unapplied after this long."""

    failing_writes_threshold: int = 5
    """/healthz fails after this many consecutive failed writes (whatever their age)."""

    manifests_poll_interval: float = 0.2
    """Seconds between two stats of the manifests directory; a change is read within this plus
    the read time, well under the 1 s the contract promises."""

    cgroup_scan_interval: float = 0.25
    """Seconds between two walks of the cgroup tree for pod cgroups, only where change
    notifications (inotify) are unavailable; otherwise a new pod is noticed as its cgroup is made
    and an idle tree costs nothing (within 1 s either way, SEMANTICS C1)."""

    stats_interval: float = 5.0
    """Seconds between two reads of the datapath's counters and map fill for /metrics (reading
    the fill of an LRU map walks its keys: not something to do on every sync)."""

    map_sizes: MapSizes = MapSizes()
    """Capacity of each sized map (`--map-size NAME=ENTRIES`); see MapSizes for what each holds
    and costs in kernel memory. Must equal the pinned maps' sizes (a pinned map keeps its size)."""

    passive_health: bool = True
    """Passive health (SEMANTICS A17): the kernel ejects an endpoint whose TCP handshakes fail
    (3 in a row) for a back-off; `--passive-health off` turns it off for every Service (one
    Service: annotation meshlet.io/passive-health: "off")."""

    terminate_tcp: bool = False
    """Also terminate translated TCP connections whose endpoint left their Service (SEMANTICS
    A16). Off by default: established connections are never touched (A14), and connected UDP
    sockets are terminated either way."""

    leader_namespace: str = "kube-system"
    """Namespace of the Lease that elects the one Route status writer (Kubernetes mode)."""

    @property
    def listen_text(self) -> str:
        host, port = self.listen
        return host_port(host, port)


def default_node_name() -> str:
    """$NODE_NAME (set by the DaemonSet from spec.nodeName), else this machine's host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def default_cgroup_root(mounts: str = PROC_MOUNTS) -> Path:
    """The host's cgroup2 mount point (agent.mounts)."""
    return Path(require_cgroup2_mount(mounts))


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT` or `[V6ADDR]:PORT` -> (address, port); port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UserError(f"--listen {text!r} is not ADDR:PORT; e.g. --listen {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--listen {text!r}: {host!r} is not an IP address; e.g. --listen {DEFAULT_LISTEN}") from None
    return host, int(port)


def parse_map_sizes(values: tuple[str, ...] | list[str]) -> MapSizes:
    """`--map-size NAME=ENTRIES` values (repeatable) -> MapSizes; unnamed maps keep their default."""
    sizes: dict[str, int] = {}
    for text in values:
        name, sep, number = text.partition("=")
        name = name.strip()
        if not sep or name not in SIZED_MAPS:
            raise UserError(f"{SIZE_OPTION} {text!r} is not NAME=ENTRIES with NAME one of {', '.join(SIZED_MAPS)}; "
                            f"e.g. {SIZE_OPTION} frontends=262144")
        try:
            sizes[name] = int(number.strip().replace("_", ""))
        except ValueError:
            raise UserError(f"{SIZE_OPTION} {text!r}: {number!r} is not a whole number of entries; "
                            f"e.g. {SIZE_OPTION} {name}={getattr(MapSizes(), name)}") from None
    try:
        return MapSizes(**sizes)
    except ValueError as err:
        raise UserError(f"{SIZE_OPTION}: {err}; hint: `meshlet run --help` lists each map and its cost") from None
