"""Bench: how fast live sockets leave an endpoint that went away, and what the check costs (issue 15).

    python -m bench.stale_sockets                          # 1,000 sockets over 100 pod netns
    python -m bench.stale_sockets --sockets 100 --pods 10  # small
    python -m bench.stale_sockets --json out.json

Two rows, both through the real programs and the agent's own sweep (agent/runtime/stale.py):

- termination latency: P client pods (each its own netns and kubelet-style cgroup) hold S connected
  UDP sockets in all to a DNS-like Service of two endpoints; one endpoint is removed (the full
  reconcile the agent would do, then its sweep). Measured per socket from the moment the change
  is handed to the datapath to the moment the application sees its socket fail (CLOCK_MONOTONIC,
  one clock for the machine), plus the sweep's own time.
- sticky-path cost: one unconnected UDP socket sends D datagrams to the frontend after its first
  pick; the sendmsg4 program's own time per datagram from the kernel's run-time counters
  (BPF_ENABLE_STATS, on only while this bench holds it). A datagram to an address that is no
  frontend (one hash lookup, the floor every datagram pays) is measured the same way.

Needs root. Everything lives in a lab (agent.lab.pods) and a bpffs directory of its own, removed
at the end, also on failure; the datapath attaches to the lab's cgroup subtree only.
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

FRONTEND = "10.96.0.53"
NOT_A_FRONTEND = "10.96.0.54"
PORT = 8080

#: Runs in a client pod: K connected UDP sockets to the frontend, one query each (so each knows
#: its endpoint), then prints when each one fails, until stdin closes.
HOLDER = textwrap.dedent("""
    import json, select, socket, sys, time
    k, addr = int(sys.argv[1]), sys.argv[2]
    socks = []
    for _ in range(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((addr, 53))
        s.settimeout(5)
        s.send(b"q")
        socks.append((s, s.recv(100).decode().strip()))
    print(json.dumps({"ready": [peer for _, peer in socks]}), flush=True)
    alive = {s.fileno(): (s, peer) for s, peer in socks}
    while alive:
        ready, _, _ = select.select(list(alive) + [sys.stdin], [], [])
        now = time.monotonic()
        if sys.stdin in ready:
            break
        for fd in ready:
            s, peer = alive.pop(fd)
            try:
                s.recv(100, socket.MSG_DONTWAIT)
                alive[fd] = (s, peer)  # a late answer, not an end
            except OSError as err:
                print(json.dumps({"t": now, "peer": peer, "errno": err.errno}), flush=True)
""")

#: Runs in a client pod: one unconnected UDP socket, D datagrams to ADDR:53 (none read back).
SENDER = textwrap.dedent("""
    import socket, sys
    d, addr = int(sys.argv[1]), sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(d):
        try:
            s.sendto(b"q", (addr, 53))
        except OSError:
            pass
""")


class _EnableStatsAttr(ct.Structure):  # bpf_attr: enable_stats
    _fields_ = [("type", ct.c_uint32)]


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel counts program run time while the fd is open."""
    from agent.datapath import bpfsys

    return bpfsys._bpf(32, _EnableStatsAttr(type=0), "enable BPF run-time stats")


def program_time(fd: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":" in line)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def state(lab, servers: list[str]):
    from agent.model import (BackendGroup, ClientPod, DesiredState, Endpoint, FrontendKey, FrontendState, GroupKey,
                             Verdict, WeightedGroup)

    key = GroupKey("kube-system", "dns", "dns", "UDP", 4)
    eps = tuple(sorted(Endpoint(lab.pods[f"kube-system/{s}"].ipv4, PORT) for s in servers))
    return DesiredState(
        frontends={FrontendKey(FRONTEND, 53, "UDP"): FrontendState("kube-system", "dns", "dns", (WeightedGroup(1, key),))},
        groups={key: BackendGroup(key, eps, Verdict.FORWARD)},
        clients={p.uid: ClientPod(p.uid, p.namespace, p.name) for p in lab.pods.values()})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(sockets: int, pods: int, datagrams: int) -> dict:
    from agent.datapath import Datapath, MapSizes, uninstall
    from agent.lab.pods import Lab, unique_lab_name
    from agent.runtime.stale import StaleSockets

    per_pod = max(1, sockets // pods)
    bpffs = f"/sys/fs/bpf/meshlet-bench-stale-{uuid.uuid4().hex[:8]}"
    holders: list[tuple[subprocess.Popen, Path]] = []
    with Lab(unique_lab_name("bst")) as lab, tempfile.TemporaryDirectory(prefix="meshlet-bench-stale-") as tmp:
        for name in ("dns-a", "dns-b"):
            lab.add_pod("kube-system", name, echo_ports=(PORT,))
        clients = [lab.add_pod("bench", f"c{i}", echo_ports=()) for i in range(pods)]
        cgroups = {p.uid: p.cgroup_id for p in lab.pods.values()}
        dp = Datapath.open(bpffs, lab.cgroup_root, MapSizes(affinity=1024, clients=1024, udp_flows=4 * sockets))
        stale = None
        stats_fd = None
        try:
            dp.reconcile(state(lab, ["dns-a", "dns-b"]), cgroups)
            dp.attach()
            stale = StaleSockets.open(bpffs, Path(lab.cgroup_root))
            workdir = Path(tmp)
            for pod in clients:
                out = workdir / f"{pod.name}.jsonl"
                with open(out, "w") as f:
                    proc = pod.popen([sys.executable, "-c", HOLDER, str(per_pod), FRONTEND], stdin=subprocess.PIPE,
                                     stdout=f, stderr=subprocess.STDOUT)
                holders.append((proc, out))
            peers: list[str] = []
            for proc, out in holders:
                peers += wait_line(out, "ready", proc)["ready"]
            on_a = peers.count("dns-a")

            # The change: dns-a leaves. Timed as the agent's loop does it: write, then sweep.
            changed_at = time.monotonic()
            dp.reconcile(state(lab, ["dns-b"]), cgroups)
            written_at = time.monotonic()
            done = stale.sweep(state(lab, ["dns-b"]))
            swept_at = time.monotonic()
            deadline = time.monotonic() + 30
            while True:
                ends = [e for _, out in holders for e in read(out) if "t" in e]
                if len(ends) >= on_a or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            latencies = [e["t"] - changed_at for e in ends]

            # Sticky-path cost: after the first datagram, every one reuses the socket's pick.
            stats_fd = enable_run_time_stats()
            sender = clients[0]
            sendmsg = dp.programs.fds["sendmsg4"]
            costs = {}
            for label, addr in (("sticky", FRONTEND), ("not_a_frontend", NOT_A_FRONTEND)):
                before = program_time(sendmsg)
                done_run = sender.run([sys.executable, "-c", SENDER, str(datagrams), addr], timeout=300)
                if done_run.returncode != 0:
                    raise RuntimeError(done_run.stderr)
                after = program_time(sendmsg)
                runs = after[1] - before[1]
                costs[label] = round((after[0] - before[0]) / runs, 1) if runs else None
            return {
                "sockets": per_pod * pods, "pods": pods, "on_removed_endpoint": on_a,
                "terminated": sum(done.values()), "ended_seen": len(ends),
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
            if stale is not None:
                stale.close()
            dp.close()
            uninstall(bpffs)


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
    result = run(args.sockets, args.pods, args.datagrams)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
