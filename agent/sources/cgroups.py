"""The pod cgroups source: which pod (by uid) owns which cgroup on this node (SEMANTICS C1).

Role: scan the cgroup tree below `--cgroup-root` every fraction of a second for the kubelet's pod
cgroups, in both layouts and for every QoS class (the names: agent/kubelet.py),
and report `sink.pod_cgroups({uid: cgroup id})` when the set changes (and once after the first
scan, which is this source's "synced"). The cgroup id the BPF programs see
(`bpf_get_current_ancestor_cgroup_id`) is the inode number of the cgroup's directory on cgroup2.

May touch: the cgroup tree, read only (directory listings and stat). Invariants: a pod directory's
subtree (its containers) is never walked, so a scan costs one listing per non-pod cgroup; the
kubepods parents may sit at any depth below the root (nested runtimes, test labs).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.kubelet import pod_uid_of
from agent.runtime.logs import get_logger
from agent.sources import Sink

log = get_logger("cgroups")

#: Deeper than any real layout (root/kubepods.slice/qos/pod is 3); stops a walk through a loop.
MAX_DEPTH = 12


def scan_pod_cgroups(root: Path) -> dict[str, int]:
    """Pod uid -> cgroup id (inode) of every kubelet pod cgroup below `root`."""
    found: dict[str, int] = {}

    def walk(path: str, depth: int, under_kubepods: bool) -> None:
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return  # removed while we looked: the next scan settles it
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                uid = pod_uid_of(entry.name, under_kubepods)
                if uid is not None:
                    found[uid] = entry.stat(follow_symlinks=False).st_ino
                elif depth < MAX_DEPTH:
                    walk(entry.path, depth + 1, under_kubepods or entry.name.startswith("kubepods"))
            except FileNotFoundError:
                continue

    walk(str(root), 0, False)
    return found


class CgroupsSource:
    """Scans for pod cgroups in a thread; reports the full mapping when it changes."""

    def __init__(self, cgroup_root: Path, sink: Sink, interval: float = 0.25):
        self.cgroup_root = Path(cgroup_root)
        self.sink = sink
        self.interval = interval
        self._last: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cgroups", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception as err:  # a source never dies: report and scan again
                log.error("cgroups.error", root=str(self.cgroup_root), error=repr(err))
            self._stop.wait(self.interval)

    def scan_once(self) -> bool:
        """Scan; report to the sink if the mapping changed (or on the first scan). True if reported."""
        mapping = scan_pod_cgroups(self.cgroup_root)
        if mapping == self._last:
            return False
        before = self._last or {}
        added = sum(1 for uid in mapping if uid not in before)
        removed = sum(1 for uid in before if uid not in mapping)
        self.sink.pod_cgroups(mapping)
        log.info("cgroups.changed", pods=len(mapping), added=added, removed=removed,
                 changed=sum(1 for uid in mapping if uid in before and before[uid] != mapping[uid]))
        self._last = mapping
        return True
