"""Terminate the connected sockets whose endpoint went away (SEMANTICS A16), after each sync.

Role: after a sync that changed frontends or groups (and after every full sync), visit the network
namespaces of the pods on this node, list their connected UDP sockets (and, when the agent was
told to, their TCP connections), find what meshlet translated each to (a UDP socket's entry in
the `udp_flows` map by its cookie, a TCP socket's socket storage, which the dump returns), and
destroy those translated to an endpoint no longer offered (agent/datapath/stale.py decides).
The application's next call then fails (ECONNABORTED, or EDESTADDRREQ for a send on a UDP
socket, which the kernel also disconnects) and its reconnect is translated afresh.
Unconnected UDP sockets need nothing here: the programs re-pick their next datagram themselves.

Mechanism: netlink sock_diag (agent/datapath/sockdiag.py), probed at start as the `sock_destroy`
kernel feature; without it this does nothing and the start-up report says what is lost.

May touch: the pinned `udp_flows` and socket-storage maps (read), the pod cgroups (read), the
pods' network namespaces (one netlink socket in each, kept while the namespace has processes:
an open socket keeps its namespace alive, so one whose pods are gone is closed at the next
sweep), and the sockets that the rule picks. Runs on the sync loop's thread only.
Errors never stop the loop: a namespace that cannot be visited is logged and skipped.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

from agent.datapath import sockdiag
from agent.datapath.stale import Judge, translation_of
from agent.logs import get_logger
from agent.model import DesiredState

log = get_logger("stale")

FAMILIES = (socket.AF_INET, socket.AF_INET6)


def pod_network_namespaces(cgroup_root: Path) -> dict[int, str]:
    """The network namespaces the processes of the pods below `cgroup_root` live in: namespace
    inode -> a path that opens it (/proc/PID/ns/net of one of its processes), deduplicated. Reads
    the cgroup.procs of each pod cgroup's subtree (its containers): the PIDs must be the host's
    (hostPID in the DaemonSet). A process gone meanwhile is skipped."""
    from agent.sources.cgroups import walk_pod_cgroups

    found: dict[int, str] = {}
    for _uid, entry in walk_pod_cgroups(cgroup_root):
        for dirpath, _dirs, files in os.walk(entry.path):
            if "cgroup.procs" not in files:
                continue
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids = f.read().split()
            except OSError:
                continue
            for pid in pids:
                path = f"/proc/{pid}/ns/net"
                try:
                    found.setdefault(os.stat(path).st_ino, path)
                except OSError:
                    continue
    return found


class StaleSockets:
    """One per agent. `sweep(state)` after each sync; `close()` at exit."""

    def __init__(self, storage_map_fd: int, udp_flows, namespaces: Callable[[], Mapping[int, str]], *,
                 terminate_tcp: bool = False, on_terminated: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """storage_map_fd: an fd of the pinned `sockets` map (owned by us from here on);
        udp_flows: the pinned `udp_flows` map (a bpfsys.Map, owned by us from here on);
        namespaces: () -> {netns inode: a path that opens it}, the pods' namespaces now;
        on_terminated(protocol name, reason): called once per socket destroyed."""
        self.storage_map_fd = storage_map_fd
        self.udp_flows = udp_flows
        self.namespaces = namespaces
        self.terminate_tcp = terminate_tcp
        self.on_terminated = on_terminated
        self.clock = clock
        self._netlinks: dict[int, sockdiag.Netlink] = {}
        self._failing: set[int] = set()  # namespaces whose failure was logged already

    @classmethod
    def open(cls, bpffs: str, cgroup_root: Path, **kw) -> "StaleSockets":
        from agent.datapath import bpfsys, loader

        fd = bpfsys.obj_get(loader.map_pin(bpffs, "sockets"))
        try:
            flows = bpfsys.Map.open_pinned(loader.map_pin(bpffs, "udp_flows"))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, flows, lambda: pod_network_namespaces(cgroup_root), **kw)

    def sweep(self, state: DesiredState) -> dict[tuple[str, str], int]:
        """Destroy every stale translated socket now. Returns (protocol, reason) -> sockets."""
        started = self.clock()
        judge = Judge(state)
        done: dict[tuple[str, str], int] = {}
        namespaces = dict(self.namespaces())
        for inode in set(self._netlinks) - set(namespaces):
            self._netlinks.pop(inode).close()  # its pods are gone: let the namespace go too
        for inode, path in namespaces.items():
            try:
                netlink = self._netlink(inode, path)
                for sk, reason in self._stale(judge, list(self._listed(netlink))):
                    if netlink.destroy(sk):
                        proto = "tcp" if sk.protocol == socket.IPPROTO_TCP else "udp"
                        done[(proto, reason)] = done.get((proto, reason), 0) + 1
                        if self.on_terminated is not None:
                            self.on_terminated(proto, reason)
                self._failing.discard(inode)
            except OSError as err:
                stale = self._netlinks.pop(inode, None)
                if stale is not None:
                    stale.close()
                if err.errno == errno.ENOENT or inode in self._failing:
                    continue  # the namespace went away while we looked; or said already
                self._failing.add(inode)
                log.warning("stale.netns_failed", netns=path, error=err.strerror or str(err),
                            hint="the agent needs the host's PIDs (hostPID) and CAP_SYS_ADMIN, CAP_SYS_PTRACE")
        if done:
            log.info("stale.terminated", seconds=round(self.clock() - started, 4),
                     **{f"{proto}_{reason}": n for (proto, reason), n in sorted(done.items())})
        return done

    def _stale(self, judge: Judge, listed: list[sockdiag.DiagSocket]) -> list[tuple[sockdiag.DiagSocket, str]]:
        out = []
        for sk in listed:
            flow = self.udp_flows.lookup(sk.cookie.to_bytes(8, "little")) if sk.protocol == socket.IPPROTO_UDP else None
            xlat = translation_of(sk, flow)
            reason = judge.verdict(sk.protocol, xlat) if xlat is not None else None
            if reason is not None:
                out.append((sk, reason))
        return out

    def _listed(self, netlink: sockdiag.Netlink):
        for family in FAMILIES:
            yield from netlink.dump(family, socket.IPPROTO_UDP, (sockdiag.TCP_ESTABLISHED,))
            if self.terminate_tcp:
                yield from netlink.dump(family, socket.IPPROTO_TCP, sockdiag.CLIENT_TCP_STATES, self.storage_map_fd)

    def _netlink(self, inode: int, path: str) -> sockdiag.Netlink:
        netlink = self._netlinks.get(inode)
        if netlink is None:
            netlink = self._netlinks[inode] = sockdiag.Netlink.inside(path, inode)
        return netlink

    def close(self) -> None:
        for netlink in self._netlinks.values():
            netlink.close()
        self._netlinks = {}
        self.udp_flows.close()
        if self.storage_map_fd >= 0:
            os.close(self.storage_map_fd)
            self.storage_map_fd = -1
