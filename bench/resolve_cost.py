"""Cost of one change in resolve, against a full resolve, at 1k / 10k / 50k Services (issue 2).

    .venv/bin/python bench/resolve_cost.py --sizes 1000,10000,50000

For each size N: N Services (one port, one ClusterIP) with one EndpointSlice of 10 endpoints
each, and one HTTPRoute per 100 Services splitting between two of them. Measured, in-process:
- `full_resolve_s`: a fresh Resolver given every object, then commit() (what a restart costs);
- `slice_change_ms`: one EndpointSlice update (an endpoint turns not-ready) plus commit(),
  the median over `--changes` different Services;
- `route_change_ms`: one HTTPRoute update (new weights) plus commit(), the median likewise.
One JSON line per size on stdout. Pure CPU work on in-memory dicts: no I/O, no kernel, no network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a plain script

from agent.resolve import Resolver  # noqa: E402

NODE = "node-a"
NAMESPACE = "bench"
ENDPOINTS = 10
SERVICES_PER_ROUTE = 100


def service(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": NAMESPACE},
            "spec": {"clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(i: int, not_ready: int = -1) -> dict:
    endpoints = []
    for j in range(ENDPOINTS):
        n = i * ENDPOINTS + j
        entry = {"addresses": [f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"], "nodeName": f"node-{j % 3}"}
        if j == not_ready:
            entry["conditions"] = {"ready": False}
        endpoints.append(entry)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-abcde", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


def http_route(r: int, n: int, canary_weight: int = 10) -> dict:
    parent, first, second = r * SERVICES_PER_ROUTE, (r * SERVICES_PER_ROUTE + 1) % n, (r * SERVICES_PER_ROUTE + 2) % n
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": f"route-{r}", "namespace": NAMESPACE, "generation": canary_weight},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": f"svc-{parent}"}],
                     "rules": [{"backendRefs": [{"name": f"svc-{first}", "port": 80, "weight": 100 - canary_weight},
                                                {"name": f"svc-{second}", "port": 80, "weight": canary_weight}]}]}}


def cluster(n: int) -> list[dict]:
    objects = []
    for i in range(n):
        objects += [service(i), endpoint_slice(i)]
    objects += [http_route(r, n) for r in range(max(1, n // SERVICES_PER_ROUTE))]
    return objects


def timed_change(resolver: Resolver, obj: dict) -> float:
    start = time.perf_counter()
    resolver.upsert(obj)
    delta = resolver.commit()
    elapsed = time.perf_counter() - start
    if not delta:
        raise RuntimeError("the change changed nothing: the benchmark would measure a no-op")
    return elapsed


def measure(n: int, changes: int) -> dict:
    objects = cluster(n)
    start = time.perf_counter()
    resolver = Resolver(NODE)
    for obj in objects:
        resolver.upsert(obj)
    resolver.commit()
    full = time.perf_counter() - start
    step = max(1, n // changes)
    # A route's parent (i % 100 == 0) uses the route's backends, not its own endpoints, so a
    # change of its slice rightly changes nothing: time the others.
    used = [i for i in range(1, n, step) if i % SERVICES_PER_ROUTE][:changes]
    slice_times = [timed_change(resolver, endpoint_slice(i, not_ready=3)) for i in used]
    routes = max(1, n // SERVICES_PER_ROUTE)
    route_times = [timed_change(resolver, http_route(r % routes, n, canary_weight=20 + r // routes))
                   for r in range(changes)]
    slice_ms = statistics.median(slice_times) * 1e3
    route_ms = statistics.median(route_times) * 1e3
    return {
        "services": n,
        "endpoints_per_service": ENDPOINTS,
        "routes": routes,
        "frontends": len(resolver.state.frontends),
        "groups": len(resolver.state.groups),
        "full_resolve_s": round(full, 3),
        "slice_change_ms": round(slice_ms, 3),
        "route_change_ms": round(route_ms, 3),
        "full_over_slice_change": round(full * 1e3 / slice_ms),
        "full_over_route_change": round(full * 1e3 / route_ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated Service counts")
    parser.add_argument("--changes", type=int, default=50, help="changes timed per kind and size")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected numbers like 1000,10000")
    if not sizes or min(sizes) < 1 or args.changes < 1:
        parser.error("sizes and --changes must be positive")
    for n in sizes:
        print(json.dumps(measure(n, args.changes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
