"""Churn soak: the real agent under continuous Service, endpoint and route churn while lab clients
connect without pause (issue 13). `python -m bench.soak --help`; the CI variant is
tests/kernel/bench/test_bench_soak.py (a few hundred Services for a few seconds).

What runs: one client pod (bench.topology: a network namespace and a pod cgroup below a cgroup
subtree of its own) whose netns holds the whole pod range locally (AnyIP), with an echo server
there answering each connection with the address it reached: the endpoint the connection was
translated to. LIVE_ENDPOINTS of those addresses are the live endpoints. The tests' stand-in API server (not Kubernetes: it speaks the
list/watch wire) holding N Services with their EndpointSlices and N // 100 HTTPRoutes; `meshlet
run --kubeconfig` against it, attached to that subtree only. The first LIVE Services have the
live endpoints; the rest have synthetic endpoints (programmed, never connected to).

The churn (one thread, on an absolute schedule, so its rates are what was asked or reported
short): `endpoint_rate` EndpointSlice changes per second, one in ten on a live Service (one echo
endpoint made not ready, another made ready again: a live Service always keeps one ready endpoint),
the others swapping an endpoint of a synthetic Service; `route_rate` HTTPRoute weight edits per
second. One connect loop per live Service runs in the client pod throughout.

What is checked (the record's `ok` is all of them):
- no connection reached an endpoint that was not usable for its Service at some moment in the
  `sync_delay` seconds before the connection started (SEMANTICS A14/B15: a change reaches new
  connections within 1 s);
- no connection failed (every live Service always has a ready endpoint);
- the agent's RSS and open fds are flat: growth from the first sample after the warm-up
  (a minute, or a quarter of a shorter run) to the largest later one is under 5 %;
- once the churn stops and the agent has caught up, the planned maps hold exactly the number of
  entries a fresh plan of the final objects gives (nothing leaked, nothing missing).

May touch: what its bench.topology.Lab makes (one netns, a cgroup subtree), a bpffs directory /sys/fs/bpf/meshlet-soak-<id> (uninstalled at
the end), loopback (the stand-in server, the agent's listener), child processes it stops by pid.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from bench.controlplane import (
    NODE_NAME,
    PYTHON,
    _free_loopback_port,
    _kubeconfig,
    _standin_apiserver,
    _stop,
    namespace_object,
    objects,
    slice_object,
)
from bench.synth import NAMESPACE, POD_CIDR, SERVICE_PORT, TARGET_PORT, Service, make_services, with_endpoint_replaced
from bench.topology import Lab, run as run_cmd

REPO = Path(__file__).resolve().parent.parent
#: The live endpoints: pod-range addresses no synthetic Service uses (synthetic ones fill the range
#: from its start, and endpoint swaps take from its last quarter).
LIVE_ENDPOINTS = ("10.244.150.1", "10.244.150.2", "10.244.150.3")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

#: Answers each TCP connection on TARGET_PORT with the local address it reached, then closes.
ECHO_SERVER = textwrap.dedent("""
    import socket, socketserver, sys
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(self.request.getsockname()[0].encode() + b"\\n")
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo)
    print("ready", flush=True)
    server.serve_forever()
""")
GATEWAY = "gateway.networking.k8s.io"

#: Prints one JSON line per connection to ADDR:PORT: when it started, the pod that answered or the errno.
CONNECT_LOOP = textwrap.dedent("""
    import errno, json, socket, sys, time
    addr, port = sys.argv[1], int(sys.argv[2])
    while True:
        started = time.time()
        try:
            with socket.create_connection((addr, port), timeout=3) as sock:
                data = b""
                while chunk := sock.recv(256):
                    data += chunk
            line = {"t": started, "peer": data.decode().strip()} if data.strip() else {"t": started, "error": "EOF"}
        except OSError as err:
            line = {"t": started, "error": errno.errorcode.get(err.errno or 0, type(err).__name__)}
        print(json.dumps(line), flush=True)
        time.sleep(0.005)
""")


class ClientPod:
    """A netns holding the whole pod range locally (AnyIP), and a pod cgroup under `root`."""

    def __init__(self, lab: Lab, root: Path):
        self.netns = lab.netns(f"mlb{lab.run_id}-soak")
        run_cmd("ip", "-n", self.netns, "route", "add", "local", POD_CIDR, "dev", "lo")
        pod = lab.child_cgroup(root, f"kubepods-pod{uuid.uuid4().hex}.slice")
        self.container = lab.child_cgroup(pod, "container.scope")

    def popen(self, argv: list[str], in_cgroup: bool = True, **kw) -> subprocess.Popen:
        procs, netns = self.container / "cgroup.procs", f"/run/netns/{self.netns}"

        def enter():  # the cgroup first, then the netns (as a container runtime does)
            if in_cgroup:
                procs.write_text(str(os.getpid()))
            fd = os.open(netns, os.O_RDONLY)
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                os._exit(97)
            os.close(fd)

        return subprocess.Popen(argv, preexec_fn=enter, **kw)


def route_object(index: int, parent: Service, backends: tuple[Service, Service], weights: tuple[int, int]) -> dict:
    return {"apiVersion": f"{GATEWAY}/v1", "kind": "HTTPRoute",
            "metadata": {"name": f"route-{index:04d}", "namespace": NAMESPACE, "generation": 1,
                         "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent.name, "port": SERVICE_PORT}],
                     "rules": [{"backendRefs": [{"name": b.name, "port": SERVICE_PORT, "weight": w}
                                                for b, w in zip(backends, weights)]}]}}


def live_slice(svc: Service, ready: dict[str, bool], generation: int) -> dict:
    """The live Service's slice: every echo pod listed, `ready` saying which are."""
    obj = slice_object(svc, generation)
    obj["endpoints"] = [{"addresses": [ip], "conditions": {"ready": up, "serving": up, "terminating": False},
                         "nodeName": NODE_NAME} for ip, up in sorted(ready.items())]
    return obj


class Sampler(threading.Thread):
    """The agent's VmRSS (MiB) and open fds every `interval` seconds: (seconds since start, rss, fds)."""

    def __init__(self, pid: int, interval: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, int]] = []
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                rss = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except (OSError, StopIteration):
                return
            self.samples.append((time.monotonic() - self.started_at, round(rss, 1), fds))
            self.stop_event.wait(self.interval)


def growth(samples: list[tuple[float, float, int]], warmup: float, column: int) -> float | None:
    """Largest relative growth over the first sample at or after `warmup` seconds."""
    later = [s for s in samples if s[0] >= warmup]
    if len(later) < 2:
        return None
    base = later[0][column]
    return round(max(s[column] for s in later) / base - 1, 4) if base else None


def judge_connections(lines: list[dict], timeline: list[tuple[float, frozenset]], names: dict[str, str],
                      sync_delay: float) -> tuple[list[dict], list[dict]]:
    """(failed, wrong): a wrong connection reached a pod not usable for its Service at any moment of
    [start - sync_delay, start]; it gets `late_s`, how long before its start the endpoint stopped
    being usable (None: it never was). timeline: (time the change was sent, usable pod IPs from
    then on), sorted; names: what a connection's `peer` says -> the endpoint IP."""
    failed = [line for line in lines if "error" in line]
    wrong = []
    for line in lines:
        if "peer" not in line:
            continue
        ip = names.get(line["peer"])
        t = line["t"]
        usable, last_usable = set(), None
        for i, (since, ips) in enumerate(timeline):
            until = timeline[i + 1][0] if i + 1 < len(timeline) else float("inf")
            if since <= t and until >= t - sync_delay:
                usable |= ips
            if ip in ips and since <= t:
                last_usable = min(until, t)
        if ip not in usable:
            wrong.append({**line, "late_s": None if last_usable is None else round(t - last_usable, 3)})
    return failed, wrong


#: map_counts/planned_counts entry for the set bits of the frontend filter (fe_filter)
FILTER_BITS = "fe_filter set bits"


def planned_counts(cluster: list[dict]) -> dict[str, int]:
    """Entries per planned map a fresh plan of `cluster` gives (no pods: no client entries), and the
    frontend filter's set bits."""
    from agent.datapath.layout import PLANNED_MAPS
    from agent.datapath.plan import Planner
    from agent.resolve import Resolver

    resolver = Resolver(NODE_NAME)
    resolver.upsert_many(cluster)
    resolver.commit()
    image = Planner().full(resolver.state, {}).expand()
    counts = {name: len(image[name]) for name in PLANNED_MAPS}
    # The frontend filter is a fixed-size array: what can leak or go missing is its set bits.
    counts[FILTER_BITS] = sum(int.from_bytes(word, "little").bit_count() for word in image["fe_filter"].values())
    return counts


def map_counts(bpffs: str, names) -> dict[str, int]:
    """Entries per pinned map in `names`, and the frontend filter's set bits."""
    from agent.datapath import bpfsys, loader

    out = {}
    for name in names:
        with bpfsys.Map.open_pinned(loader.map_pin(bpffs, name)) as m:
            out[name] = sum(len(chunk) for chunk in m.chunks())
    with bpfsys.Map.open_pinned(loader.map_pin(bpffs, "fe_filter")) as m:
        out[FILTER_BITS] = sum(int.from_bytes(v, "little").bit_count() for chunk in m.chunks() for _, v in chunk)
    return out


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def run(services: int = 10_000, seconds: float = 600.0, endpoint_rate: float = 50.0, route_rate: float = 1.0,
        live: int = 3, sync_delay: float = 1.0, ready_timeout: float = 600.0, log=sys.stderr) -> dict:
    from agent.datapath import uninstall
    from agent.datapath.layout import PLANNED_MAPS

    rng = random.Random(13)
    warmup = 60.0 if seconds >= 240 else seconds / 4
    record: dict = {"services": services, "seconds": seconds, "endpoint_rate_asked": endpoint_rate,
                    "route_rate_asked": route_rate, "live_services": live, "sync_delay_s": sync_delay,
                    "warmup_s": warmup}
    bpffs = f"/sys/fs/bpf/meshlet-soak-{uuid.uuid4().hex[:8]}"
    with Lab() as lab, tempfile.TemporaryDirectory() as scratch:
        cgroup_root = lab.cgroup_subtree("soak")
        client = ClientPod(lab, cgroup_root)
        echo = client.popen([PYTHON, "-c", ECHO_SERVER, str(TARGET_PORT)], in_cgroup=False,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        lab.on_close(f"echo server pid {echo.pid}", lambda: _stop(echo))
        if echo.stdout.readline().strip() != "ready":
            raise RuntimeError("the soak's echo server did not start")
        pod_ips = {ip: ip for ip in LIVE_ENDPOINTS}  # the echo server answers with the address reached
        synthetic = make_services(services, k=3, udp_every=0)
        live_services = synthetic[:live]
        ready = {svc.name: {ip: True for ip in pod_ips.values()} for svc in live_services}
        generations = {svc.name: 1 for svc in synthetic}
        n_routes = max(1, services // 100)
        routed = [(i, synthetic[live + 2 * i], (synthetic[live + 2 * i], synthetic[live + 2 * i + 1]))
                  for i in range(n_routes) if live + 2 * i + 1 < len(synthetic)]
        weights = {i: (1, 1) for i, _, _ in routed}
        cluster = [namespace_object()] + objects(synthetic)
        for svc in live_services:
            cluster = [o for o in cluster if not (o["kind"] == "EndpointSlice"
                                                   and o["metadata"]["labels"]["kubernetes.io/service-name"] == svc.name)]
            cluster.append(live_slice(svc, ready[svc.name], 1))
        cluster += [route_object(i, parent, backends, weights[i]) for i, parent, backends in routed]
        server = _standin_apiserver([])
        server.serve_crd("HTTPRoute")
        server.load(cluster)
        procs: list[subprocess.Popen] = []
        try:
            port = _free_loopback_port()
            cmd = [PYTHON, "-m", "agent", "run", "--kubeconfig", str(_kubeconfig(Path(scratch, "kubeconfig"), server.url)),
                   "--node-name", NODE_NAME, "--cgroup-root", str(cgroup_root), "--bpffs", bpffs,
                   "--listen", f"127.0.0.1:{port}", "--log-format", "json"]
            agent_log = open(Path(scratch, "agent.log"), "w")
            agent = subprocess.Popen(cmd, stdout=agent_log, stderr=subprocess.STDOUT, cwd=REPO)
            procs.append(agent)
            deadline = time.monotonic() + ready_timeout
            while _get_ready(port) != 200:
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not become ready: {Path(scratch, 'agent.log').read_text()[-2000:]}")
                time.sleep(0.2)
            print(f"soak: agent ready with {services} Services, {len(routed)} routes", file=log)
            sampler = Sampler(agent.pid, interval=max(1.0, min(5.0, seconds / 20)))
            sampler.start()
            timeline = {svc.name: [(time.time(), frozenset(pod_ips.values()))] for svc in live_services}
            outputs = []
            for svc in live_services:
                out = open(Path(scratch, f"{svc.name}.jsonl"), "w")
                outputs.append((svc, out))
                procs.append(client.popen([PYTHON, "-c", CONNECT_LOOP, svc.vip, str(SERVICE_PORT)],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

            # The churn, on an absolute schedule.
            started = time.monotonic()
            endpoint_changes = route_edits = live_changes = 0
            next_endpoint, next_route = started, started
            synthetic_pool = synthetic[live:]
            while (now := time.monotonic()) < started + seconds:
                if now >= next_endpoint:
                    if endpoint_changes % 10 == 0 and live_services:
                        svc = live_services[live_changes % len(live_services)]
                        state = ready[svc.name]
                        down = [ip for ip, up in state.items() if not up]
                        up_ips = [ip for ip, up in state.items() if up]
                        if down and (len(up_ips) == 1 or rng.random() < 0.5):
                            state[rng.choice(down)] = True
                        else:
                            state[rng.choice(up_ips)] = False
                        generations[svc.name] += 1
                        _update(server, live_slice(svc, state, generations[svc.name]))
                        timeline[svc.name].append((time.time(), frozenset(ip for ip, up in state.items() if up)))
                        live_changes += 1
                    else:
                        index = rng.randrange(len(synthetic_pool))
                        svc = synthetic_pool[index]
                        generations[svc.name] += 1
                        svc = with_endpoint_replaced(svc, generations[svc.name])
                        synthetic_pool[index] = svc
                        _update(server, slice_object(svc, generations[svc.name]))
                    endpoint_changes += 1
                    next_endpoint += 1.0 / endpoint_rate
                if routed and now >= next_route:
                    i, parent, backends = routed[route_edits % len(routed)]
                    weights[i] = (rng.randint(0, 5), rng.randint(1, 5))
                    _update(server, route_object(i, parent, backends, weights[i]))
                    route_edits += 1
                    next_route += 1.0 / route_rate
                time.sleep(max(0.0, min(next_endpoint, next_route if routed else next_endpoint) - time.monotonic()))
            churned = time.monotonic() - started
            record.update(endpoint_changes=endpoint_changes, route_edits=route_edits, live_changes=live_changes,
                          endpoint_rate=round(endpoint_changes / churned, 2), route_rate=round(route_edits / churned, 2))

            # Let the agent catch up, then compare the maps with a fresh plan of the final objects.
            final = [namespace_object()] + objects(synthetic_pool)
            final = [o for o in final if o["kind"] != "EndpointSlice"
                     or o["metadata"]["labels"]["kubernetes.io/service-name"] not in ready]
            final += [server.get("EndpointSlice", NAMESPACE, f"{svc.name}-abcde") for svc in live_services]
            final += [objects([svc])[1] for svc in live_services]  # their Services
            final += [route_object(i, parent, backends, weights[i]) for i, parent, backends in routed]
            expected = planned_counts(final)
            deadline = time.monotonic() + 60
            while (found := map_counts(bpffs, PLANNED_MAPS)) != expected and time.monotonic() < deadline:
                time.sleep(0.5)
            record["maps_expected"], record["maps_found"] = expected, found
            for proc in procs[1:]:
                _stop(proc)
            sampler.stop_event.set()
            sampler.join()
            code, health = _get(port, "/healthz")
            record["healthz"] = code
            record["event_to_map"] = event_to_map(_get(port, "/metrics")[1])
            lines_by_service = {svc.name: _read_lines(out.name) for svc, out in outputs}
            names = dict(pod_ips)
            failed, wrong = [], []
            for svc in live_services:
                f, w = judge_connections(lines_by_service[svc.name], timeline[svc.name], names, sync_delay)
                failed += f
                wrong += w
            record.update(connections=sum(len(v) for v in lines_by_service.values()), failed=len(failed),
                          wrong_endpoint=len(wrong), failed_examples=failed[:3],
                          wrong_examples=sorted(wrong, key=lambda w: -(w["late_s"] or 0))[:3],
                          rss_mib_first=sampler.samples[0][1] if sampler.samples else None,
                          rss_mib_last=sampler.samples[-1][1] if sampler.samples else None,
                          fds_first=sampler.samples[0][2] if sampler.samples else None,
                          fds_last=sampler.samples[-1][2] if sampler.samples else None,
                          rss_growth_after_warmup=growth(sampler.samples, warmup, 1),
                          fds_growth_after_warmup=growth(sampler.samples, warmup, 2),
                          samples=sampler.samples)
            record["ok"] = (record["failed"] == 0 and record["wrong_endpoint"] == 0 and found == expected
                            and code == 200 and (record["rss_growth_after_warmup"] or 0) < 0.05
                            and (record["fds_growth_after_warmup"] or 0) < 0.05)
            return record
        finally:
            for proc in reversed(procs):
                _stop(proc)
            server.stop()
            uninstall(bpffs)


def event_to_map(metrics: str) -> dict:
    """From the agent's /metrics: changes observed, and the share written within 0.5, 1 and 2 s."""
    buckets, count = {}, 0.0
    for line in metrics.splitlines():
        if line.startswith("meshlet_event_to_map_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("meshlet_event_to_map_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    out = {"changes": int(count)}
    for le in ("0.5", "1.0", "2.0"):
        if le in buckets and count:
            out[f"within_{le}s"] = round(buckets[le] / count, 4)
    return out


def _update(server, obj: dict) -> None:
    """Replace the object on the stand-in server, whatever version it holds (no precondition)."""
    obj["metadata"].pop("resourceVersion", None)
    server.update(obj)


def _get_ready(port: int) -> int:
    try:
        return _get(port, "/readyz")[0]
    except OSError:
        return 0


def _read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{") and line.endswith("}\n")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--endpoint-rate", type=float, default=50.0, help="EndpointSlice changes per second")
    p.add_argument("--route-rate", type=float, default=1.0, help="HTTPRoute edits per second")
    p.add_argument("--out", type=Path, help="write the record as JSON here too")
    args = p.parse_args(argv)
    record = run(args.services, args.seconds, args.endpoint_rate, args.route_rate)
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    raise SystemExit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
