"""Bench: how fast live sockets leave an endpoint that went away, and what the check costs (issue 15).

    python -m bench.stale_sockets                          # 1,000 sockets over 100 pod netns
    python -m bench.stale_sockets --sockets 100 --pods 10  # small
    python -m bench.stale_sockets --json out.json

Two rows, both through the real programs and the agent's own sweep (agent/runtime/stale.py):

- termination latency: P client pods (each its own netns and kubelet-style cgroup) hold S connected
  UDP sockets in all to a DNS-like Service of two endpoints; one endpoint is removed (the full
  reconcile the agent would do, then its sweep). Measured per socket from the moment the change
  is handed to the datapath to the moment the application sees its socket fail (CLOCK_MONOTONIC,
  one clock for the machine), plus the sweep's own time. About half the sockets were on it.
- sticky-path cost: one unconnected UDP socket sends D datagrams to the frontend after its first
  pick; the sendmsg4 program's own time per datagram from the kernel's run-time counters
  (BPF_ENABLE_STATS, on only while this bench holds it). A datagram to an address that is no
  frontend (one hash lookup, the floor every datagram pays) is measured the same way.

Needs root. Everything lives in network namespaces, a cgroup subtree and a bpffs directory of its
own (bench.topology.Lab), removed at the end, also on failure; the datapath attaches to that
subtree only. The endpoints exist nowhere: each client netns routes them to its loopback, where
the datagrams die, since a socket is translated at connect() and nothing needs an answer.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from bench.progtime import program_stats
from bench.topology import Lab, run

FRONTEND = "10.96.0.53"
NOT_A_FRONTEND = "10.96.0.54"
#: Two endpoints that exist nowhere: the client netns route them to their loopback, where the
#: datagrams die. Nothing needs to answer: a socket is translated at connect() (or first send).
ENDPOINTS = ("10.244.0.10", "10.244.0.11")
PORT = 5353

#: Runs in a client pod: K connected UDP sockets to the frontend, then prints when each one
#: fails (the agent's sweep destroyed it), until stdin closes.
HOLDER = textwrap.dedent("""
    import json, select, socket, sys, time
    k, addr = int(sys.argv[1]), sys.argv[2]
    socks = []
    for _ in range(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((addr, 53))
        socks.append(s)
    print(json.dumps({"ready": k}), flush=True)
    alive = {s.fileno(): s for s in socks}
    while alive:
        ready, _, _ = select.select(list(alive) + [sys.stdin], [], [])
        now = time.monotonic()
        if sys.stdin in ready:
            break
        for fd in ready:
            s = alive.pop(fd)
            try:
                s.recv(100, socket.MSG_DONTWAIT)
                alive[fd] = s  # not an end
            except BlockingIOError:
                alive[fd] = s
            except OSError as err:
                print(json.dumps({"t": now, "errno": err.errno}), flush=True)
""")

#: Runs in a client pod: one unconnected UDP socket, D datagrams to ADDR:53.
SENDER = textwrap.dedent("""
    import socket, sys
    d, addr = int(sys.argv[1]), sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(d):
        try:
            s.sendto(b"q", (addr, 53))
        except OSError:
            pass
""")

_CLONE_NEWNET = 0x40000000
_libc = ct.CDLL(None, use_errno=True)


class _EnableStatsAttr(ct.Structure):  # bpf_attr: enable_stats
    _fields_ = [("type", ct.c_uint32)]


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel counts program run time while the fd is open."""
    from agent.datapath import bpfsys

    return bpfsys._bpf(32, _EnableStatsAttr(type=0), "enable BPF run-time stats")


def state(endpoints):
    from agent.model import DesiredState, Endpoint, FrontendKey, FrontendState, GroupKey, Verdict, WeightedGroup
    from agent.model import BackendGroup

    key = GroupKey("kube-system", "dns", "dns", "UDP", 4)
    eps = tuple(sorted(Endpoint(ip, PORT) for ip in endpoints))
    return DesiredState(
        frontends={FrontendKey(FRONTEND, 53, "UDP"): FrontendState("kube-system", "dns", "dns", (WeightedGroup(1, key),))},
        groups={key: BackendGroup(key, eps, Verdict.FORWARD)})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Pod:
    """A network namespace with a loopback route to the endpoints, and a kubelet-style pod cgroup
    (Guaranteed QoS, systemd names) whose container child runs the pod's processes."""

    def __init__(self, lab: Lab, kubepods: Path, index: int):
        uid = str(uuid.uuid4())
        self.netns = lab.netns(f"mlb{lab.run_id}-p{index}")
        run("ip", "-n", self.netns, "route", "add", "10.244.0.0/16", "dev", "lo")
        pod = lab.child_cgroup(kubepods, f"kubepods-pod{uid.replace('-', '_')}.slice")
        self.container = lab.child_cgroup(pod, "container.scope")

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        procs, netns = self.container / "cgroup.procs", f"/run/netns/{self.netns}"

        def enter():  # the cgroup first, then the netns (as a container runtime does)
            procs.write_text(str(os.getpid()))
            fd = os.open(netns, os.O_RDONLY)
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                os._exit(97)
            os.close(fd)

        return subprocess.Popen(argv, preexec_fn=enter, **kw)


def run_bench(sockets: int, pods: int, datagrams: int) -> dict:
    from agent.datapath import Datapath, MapSizes, uninstall
    from agent.runtime.stale import StaleSockets

    per_pod = max(1, sockets // pods)
    holders: list[tuple[subprocess.Popen, Path]] = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="meshlet-bench-stale-") as tmp:
        root = lab.cgroup_subtree("stale")
        kubepods = lab.child_cgroup(root, "kubepods.slice")
        clients = [Pod(lab, kubepods, i) for i in range(pods)]
        bpffs = Path("/sys/fs/bpf") / f"meshlet-bench-stale-{lab.run_id}"
        lab.directory(bpffs)
        lab.on_close(f"meshlet pins in {bpffs}", lambda: uninstall(str(bpffs)))
        dp = Datapath.open(str(bpffs), str(root), MapSizes(affinity=1024, clients=1024, udp_flows=4 * sockets))
        lab.on_close("meshlet datapath", dp.close)
        stale = StaleSockets.open(str(bpffs), root)
        lab.on_close("stale-socket sweeper", stale.close)
        stats_fd = None
        try:
            dp.reconcile(state(ENDPOINTS), {})
            dp.attach()
            for pod in clients:
                out = Path(tmp) / f"{pod.netns}.jsonl"
                with open(out, "w") as f:
                    proc = pod.popen([sys.executable, "-c", HOLDER, str(per_pod), FRONTEND], stdin=subprocess.PIPE,
                                     stdout=f, stderr=subprocess.STDOUT)
                holders.append((proc, out))
            for proc, out in holders:
                wait_line(out, "ready", proc)

            # The change: the first endpoint leaves. Timed as the agent's loop does it: write, sweep.
            after = state(ENDPOINTS[1:])
            changed_at = time.monotonic()
            dp.reconcile(after, {})
            written_at = time.monotonic()
            done = stale.sweep(after)
            swept_at = time.monotonic()
            terminated = sum(done.values())
            deadline = time.monotonic() + 30
            while True:
                ends = [e for _, out in holders for e in read(out) if "t" in e]
                if len(ends) >= terminated or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            latencies = [e["t"] - changed_at for e in ends]

            # Sticky-path cost: after the first datagram, every one reuses the socket's pick.
            stats_fd = enable_run_time_stats()
            sendmsg = dp.programs.fds["sendmsg4"]
            costs = {}
            for label, addr in (("sticky", FRONTEND), ("not_a_frontend", NOT_A_FRONTEND)):
                before = program_stats(sendmsg)
                sender = clients[0].popen([sys.executable, "-c", SENDER, str(datagrams), addr],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                if sender.wait(timeout=300) != 0:
                    raise RuntimeError(f"the sender failed: {sender.stdout.read()}")
                end = program_stats(sendmsg)
                runs = end[1] - before[1]
                costs[label] = round((end[0] - before[0]) / runs, 1) if runs else None
            return {
                "sockets": per_pod * pods, "pods": pods, "terminated": terminated, "ended_seen": len(ends),
                "reconcile_seconds": round(written_at - changed_at, 4),
                "sweep_seconds": round(swept_at - written_at, 4),
                "latency_p50_seconds": round(statistics.median(latencies), 4) if latencies else None,
                "latency_p99_seconds": round(percentile(latencies, 0.99), 4) if latencies else None,
                "latency_max_seconds": round(max(latencies), 4) if latencies else None,
                "datagrams": datagrams,
                "sendmsg4_ns_per_datagram": costs,
            }
        finally:
            for proc, _ in holders:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
            if stats_fd is not None:
                os.close(stats_fd)


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{") and line.endswith("}\n")]


def wait_line(path: Path, key: str, proc, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in read(path):
            if key in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"a holder exited: {path.read_text()[-500:]}")
        time.sleep(0.02)
    raise RuntimeError(f"no {key!r} line in {path} within {timeout}s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stale_sockets", description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, default=1000, help="connected UDP sockets in all (default 1000)")
    p.add_argument("--pods", type=int, default=100, help="client pods, each its own netns (default 100)")
    p.add_argument("--datagrams", type=int, default=20000, help="datagrams for the sticky-path row")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.stale_sockets: error: run as root (network namespaces, cgroups, BPF)")
    result = run_bench(args.sockets, args.pods, args.datagrams)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
