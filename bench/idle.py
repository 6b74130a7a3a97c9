"""The idle-cost benchmark: the real agent's CPU on a busy node where nothing changes (issue 16).

`run` builds, in a cgroup subtree of its own, what a kubelet node's cgroup tree holds: `pods` pod
cgroups (the kubelet's systemd-driver names, a mix of QoS classes) with `containers` container
cgroups each, and `system_services` services under system.slice. It starts the real agent
(`meshlet run`, Kubernetes mode against the tests' stand-in API server, as bench.controlplane
does) with `--cgroup-root` that subtree and `services` Services, waits for /readyz and a settling
pause, then reads the agent's utime + stime from /proc/<pid>/stat over `seconds` of nothing
changing: its CPU in % of one core. The window is as long as the agent's map check period by
default, so one whole cycle of its periodic check is inside it, as on a real node.

The record also holds the full reconciles inside the window and their seconds (before the check
ran in steps, one a period: at many Services most of an idle agent's CPU; now none unless the check
found drift), and the check's steps, their seconds and the longest one's bucket. For the analysis it also times one full walk of the same tree (`scan_pod_cgroups`, what the
agent did 4 times a second before it followed change notifications).

May touch: a cgroup subtree and a bpffs directory made by topology.Lab (removed at the end, also
on failure), loopback for /readyz and the stand-in API server, a temp dir.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.agentproc import check_window, full_syncs, start_agent
from bench.synth import make_services
from bench.topology import Lab

#: The issue's busy node: 110 pods of 3 containers and 150 system services.
PODS, CONTAINERS, SYSTEM_SERVICES = 110, 3, 150
#: The agent's Services while it idles (x 10 endpoints).
SERVICES = 1000
#: QoS classes of the pods in turn: mostly burstable, as on a typical node.
QOS_MIX = ("burstable", "burstable", "besteffort", "guaranteed", "burstable")


def build_node_tree(lab: Lab, root: Path, pods: int, containers: int, system_services: int) -> int:
    """Make the node's cgroups below `root` (each removed by the lab at close); returns how many."""
    from agent.kubelet import pod_cgroup_path

    made = 0

    def cgroup(relative: str) -> Path:
        nonlocal made
        path = root
        for part in relative.split("/"):
            path = path / part
            if not path.exists():
                lab.child_cgroup(path.parent, part)
                made += 1
        return path

    for i in range(system_services):
        cgroup(f"system.slice/bench-{i}.service")
    for i in range(pods):
        uid = f"{i:08x}-0000-4000-8000-{i:012x}"
        pod = cgroup(pod_cgroup_path("systemd", QOS_MIX[i % len(QOS_MIX)], uid))
        for c in range(containers):
            cgroup(f"{pod.relative_to(root)}/cri-containerd-{i:04d}{c:02d}.scope")
    return made


def walk_ms(root: Path, repeats: int = 7) -> float:
    """Median milliseconds of one full walk of the tree for pod cgroups."""
    from agent.sources.cgroups import scan_pod_cgroups

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scan_pod_cgroups(root)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run(seconds: float | None = None, pods: int = PODS, containers: int = CONTAINERS,
        system_services: int = SYSTEM_SERVICES, services: int = SERVICES, k: int = 10,
        settle: float = 5.0, ready_timeout: float = 300.0) -> dict:
    """One idle measurement of the real agent; the record's `status` says whether it ran."""
    from agent.runtime.settings import Settings
    from bench import controlplane as cp

    seconds = Settings.map_check_period if seconds is None else seconds
    record = {"pods": pods, "containers": containers, "system_services": system_services,
              "services": services, "endpoints_per_service": k, "seconds": seconds, "status": "ok"}
    with Lab() as lab, tempfile.TemporaryDirectory() as scratch:
        root = lab.cgroup_subtree("idle")
        record["cgroups"] = build_node_tree(lab, root, pods, containers, system_services)
        record["walk_ms"] = round(walk_ms(root), 3)
        cluster = [cp.namespace_object()] + cp.objects(make_services(services, k, udp_every=0))
        agent = start_agent(lab, Path(scratch), cluster, root, "idle", ready_timeout)
        if isinstance(agent, str):
            return record | {"status": "failed", "note": agent}
        time.sleep(settle)  # start-up work (first full sync, collector) is not idle cost
        text_before = agent.metrics_text()
        full_before = full_syncs(text_before)
        cpu_before, start = agent.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        cpu_after, elapsed = agent.cpu_seconds(), time.monotonic() - start
        text_after = agent.metrics_text()
        full_after = full_syncs(text_after)
        record.update(check_window(text_before, text_after))
        record["full_syncs"] = int(full_after[0] - full_before[0])
        record["full_sync_s"] = round(full_after[1] - full_before[1], 3)
        record["cpu_percent"] = round(100 * (cpu_after - cpu_before) / elapsed, 3)
        record["pods_found"] = _pods_found(agent.log_path)
        record["loadavg"] = os.getloadavg()
    return record


def _pods_found(log_path: Path) -> int | None:
    """The pod count of the agent's last `cgroups.changed` line (proves it saw the tree)."""
    found = None
    for line in log_path.read_text().splitlines():
        if "cgroups.changed" in line:
            for part in line.split():
                if part.startswith("pods="):
                    found = int(part.split("=", 1)[1])
    return found
