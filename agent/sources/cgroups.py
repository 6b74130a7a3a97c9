"""The pod cgroups source: which pod (by uid) owns which cgroup on this node (SEMANTICS C1).

Role: find the kubelet's pod cgroups below `--cgroup-root`, in both layouts and for every QoS
class (the names: agent/kubelet.py), and report `sink.pod_cgroups({uid: cgroup id})` when the set
changes (and once after the first look, which is this source's "synced"). The cgroup id the BPF
programs see (`bpf_get_current_ancestor_cgroup_id`) is the inode number of the cgroup's directory
on cgroup2.

How: one walk of the tree at start, then change notifications (inotify) on every directory the
walk listed; a notification re-lists that one directory. An idle node costs nothing: the tree
is not polled. Where notifications cannot be had (no inotify, the watch limit reached), the
source says so once and falls back to walking the whole tree every `interval`.

May touch: the cgroup tree, read only (directory listings, stat, inotify watches). Invariants: a
pod directory's subtree (its containers) is never listed nor watched, so container churn never
wakes us; the kubepods parents may sit at any depth below the root (nested runtimes, test labs);
after every handled notification the reported mapping equals what a full walk would find.
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent.kubelet import pod_uid_of
from agent.logs import get_logger
from agent.sources import Sink
from agent.sources.inotify import IN_IGNORED, IN_Q_OVERFLOW, Inotify, InotifyError

log = get_logger("cgroups")

#: Deeper than any real layout (root/kubepods.slice/qos/pod is 3); stops a walk through a loop.
MAX_DEPTH = 12


def _is_kubepods(name: str) -> bool:
    return name.startswith("kubepods")


def scan_pod_cgroups(root: Path) -> dict[str, int]:
    """Pod uid -> cgroup id (inode) of every kubelet pod cgroup below `root` (one full walk)."""
    return {uid: entry.stat(follow_symlinks=False).st_ino for uid, entry in walk_pod_cgroups(root)}


def walk_pod_cgroups(root: Path) -> list[tuple[str, os.DirEntry]]:
    """(pod uid, directory entry) of every kubelet pod cgroup below `root` (one full walk; a
    directory removed while we look is left out)."""
    found: list[tuple[str, os.DirEntry]] = []

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
                    entry.stat(follow_symlinks=False)  # cached by the DirEntry: gone now => skipped
                    found.append((uid, entry))
                elif depth < MAX_DEPTH:
                    walk(entry.path, depth + 1, under_kubepods or _is_kubepods(entry.name))
            except FileNotFoundError:
                continue

    walk(str(root), 0, False)
    return found


@dataclass
class _Dir:
    """A listed, watched, non-pod directory and what its last listing held."""

    path: str
    depth: int
    under_kubepods: bool  #: this directory or an ancestor below the root is a kubepods one
    wd: int = -1
    inode: int = 0
    subdirs: dict[str, int] = field(default_factory=dict)  #: non-pod child name -> its inode
    pods: dict[str, tuple[str, int]] = field(default_factory=dict)  #: child name -> (uid, cgroup id)


class PodCgroupWatch:
    """The tree below a root as last listed, kept current by inotify one directory at a time.

    `start()` walks and watches; `handle()` applies the queued notifications; `mapping()` is the
    pod uid -> cgroup id found. Raises InotifyError when a watch cannot be added (the caller
    falls back to polling)."""

    def __init__(self, root: Path):
        self.root = str(root)
        self._inotify = Inotify()
        self._dirs: dict[str, _Dir] = {}
        self._by_wd: dict[int, str] = {}

    def fileno(self) -> int:
        return self._inotify.fileno()

    def close(self) -> None:
        self._inotify.close()

    def start(self) -> None:
        self._add(self.root, 0, False)

    def rebuild(self) -> None:
        """Forget everything and walk again (after a queue overflow: events were lost)."""
        for entry in list(self._dirs.values()):
            self._inotify.remove(entry.wd)
        self._dirs.clear()
        self._by_wd.clear()
        self.start()

    def mapping(self) -> dict[str, int]:
        return {uid: cgroup_id for entry in self._dirs.values() for uid, cgroup_id in entry.pods.values()}

    def handle(self) -> int:
        """Apply every queued notification; returns how many directories were listed again."""
        dirty: set[str] = set()
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                log.warning("cgroups.overflow", root=self.root, hint="events were lost; walking the tree again")
                self.rebuild()
                return len(self._dirs)
            path = self._by_wd.get(event.wd)
            if path is None:
                continue  # a watch we already dropped
            if event.mask & IN_IGNORED:
                del self._by_wd[event.wd]  # its directory went; the parent's own event drops the entry
                if path in self._dirs:
                    self._dirs[path].wd = -1
                continue
            dirty.add(path)
        for path in sorted(dirty):  # parents before children: a parent's listing may drop a child
            if path in self._dirs:
                self._list(self._dirs[path])
        return len(dirty)

    def _add(self, path: str, depth: int, under_kubepods: bool) -> None:
        entry = _Dir(path, depth, under_kubepods)
        try:
            # Watch first, then list: a child made in between is in the listing or in an event.
            entry.wd = self._inotify.add(path)
            entry.inode = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            if entry.wd >= 0:
                self._inotify.remove(entry.wd)
            return  # gone already: its parent's next listing forgets it
        self._dirs[path] = entry
        self._by_wd[entry.wd] = path
        self._list(entry)

    def _drop(self, path: str) -> None:
        """Forget `path` and everything listed below it."""
        entry = self._dirs.pop(path, None)
        if entry is None:
            return
        if entry.wd >= 0 and self._by_wd.get(entry.wd) == path:
            del self._by_wd[entry.wd]
            self._inotify.remove(entry.wd)
        for name in entry.subdirs:
            self._drop(os.path.join(path, name))

    def _list(self, entry: _Dir) -> None:
        """List one directory again; add what appeared below it, drop what went."""
        subdirs: dict[str, int] = {}
        pods: dict[str, tuple[str, int]] = {}
        try:
            children = list(os.scandir(entry.path))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            children = []  # removed while we looked: its parent's event drops it
        for child in children:
            try:
                if not child.is_dir(follow_symlinks=False):
                    continue
                uid = pod_uid_of(child.name, entry.under_kubepods)
                if uid is not None:
                    pods[child.name] = (uid, child.stat(follow_symlinks=False).st_ino)
                elif entry.depth < MAX_DEPTH:
                    subdirs[child.name] = child.inode()
            except FileNotFoundError:
                continue
        entry.pods = pods
        before, entry.subdirs = entry.subdirs, subdirs
        for name, inode in before.items():
            if subdirs.get(name) != inode:  # gone, or gone and made again under the same name
                self._drop(os.path.join(entry.path, name))
        for name, inode in subdirs.items():
            path = os.path.join(entry.path, name)
            known = self._dirs.get(path)
            if before.get(name) != inode or known is None or known.wd < 0:
                self._drop(path)
                self._add(path, entry.depth + 1, entry.under_kubepods or _is_kubepods(name))


class CgroupsSource:
    """Watches for pod cgroups in a thread; reports the full mapping when it changes.

    `interval`: seconds between two full walks, used only when change notifications are not
    available (see the module docstring)."""

    def __init__(self, cgroup_root: Path, sink: Sink, interval: float = 0.25):
        self.cgroup_root = Path(cgroup_root)
        self.sink = sink
        self.interval = interval
        self._last: dict[str, int] | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1  #: a pipe that wakes the thread up to stop
        self._thread: threading.Thread | None = None
        #: "inotify" once notifications drive the source, "polling" when it fell back to walks.
        self.mode = "starting"

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="cgroups", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        try:
            watch = PodCgroupWatch(self.cgroup_root)
            try:
                watch.start()
            except BaseException:
                watch.close()
                raise
        except InotifyError as err:
            log.warning("cgroups.polling", root=str(self.cgroup_root), error=str(err),
                        hint=f"no change notifications; walking the tree every {self.interval} s instead "
                             "(raise fs.inotify.max_user_watches if the limit was reached)")
            self._poll()
            return
        self.mode = "inotify"
        try:
            self._report(watch.mapping())
            self._follow(watch)
        finally:
            watch.close()

    def _follow(self, watch: PodCgroupWatch) -> None:
        poller = select.poll()
        poller.register(watch.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            ready = {fd for fd, _ in poller.poll()}
            if watch.fileno() not in ready:
                continue
            try:
                watch.handle()
                self._report(watch.mapping())
            except InotifyError as err:  # a new directory could not be watched: walk from now on
                log.warning("cgroups.polling", root=str(self.cgroup_root), error=str(err),
                            hint=f"walking the tree every {self.interval} s from now on "
                                 "(raise fs.inotify.max_user_watches if the limit was reached)")
                self._poll()
                return
            except Exception as err:  # a source never dies: report and walk again
                log.error("cgroups.error", root=str(self.cgroup_root), error=repr(err))
                try:
                    watch.rebuild()
                    self._report(watch.mapping())
                except Exception as again:
                    log.warning("cgroups.polling", root=str(self.cgroup_root), error=repr(again),
                                hint=f"walking the tree every {self.interval} s from now on")
                    self._poll()
                    return

    def _poll(self) -> None:
        self.mode = "polling"
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception as err:  # a source never dies: report and scan again
                log.error("cgroups.error", root=str(self.cgroup_root), error=repr(err))
            self._stop.wait(self.interval)

    def scan_once(self) -> bool:
        """Walk the whole tree; report to the sink if the mapping changed (or on the first look).
        True if reported."""
        return self._report(scan_pod_cgroups(self.cgroup_root))

    def _report(self, mapping: dict[str, int]) -> bool:
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
