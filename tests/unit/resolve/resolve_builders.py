"""Builders of Kubernetes objects (plain dicts, as the API returns them) and readers of a
Resolution, so each rule test reads as the rule: objects in, the facts a user checks out."""

from __future__ import annotations

from agent.model import FrontendKey, RouteId, Verdict
from agent.resolve import Resolution, resolve

NODE = "node-a"
NS = "mesh"
GATEWAY = "gateway.networking.k8s.io"


def namespace(name, skip=False):
    labels = {"meshlet.io/skip": "true"} if skip else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def node(name=NODE, zone=None):
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def pod(name, ns=NS, uid=None, on=NODE, skip=False):
    meta = {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}"}
    if skip:
        meta["annotations"] = {"meshlet.io/skip": "true"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": on}}


def port(number, name="", protocol="TCP", target=None):
    entry = {"port": number, "protocol": protocol}
    if name:
        entry["name"] = name
    if target is not None:
        entry["targetPort"] = target
    return entry


def service(name, ip="10.96.0.10", ns=NS, ports=None, ips=None, labels=None, status=None, **spec):
    body = {"clusterIP": ip, "ports": ports if ports is not None else [port(80, "http")]}
    if ips is not None:
        body["clusterIPs"] = ips
    body.update(spec)
    obj = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": body}
    if status is not None:
        obj["status"] = status
    return obj


def ep(address, ready=None, serving=None, terminating=None, on=None, for_nodes=None, for_zones=None):
    entry = {"addresses": [address]}
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    if conditions:
        entry["conditions"] = conditions
    if on is not None:
        entry["nodeName"] = on
    hints = {}
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if hints:
        entry["hints"] = hints
    return entry


def slice_(name, svc, endpoints, ns=NS, family="IPv4", ports=None):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


def parent(name, ns=None, port=None, section=None, group="", kind="Service"):
    ref = {"group": group, "kind": kind, "name": name}
    if ns is not None:
        ref["namespace"] = ns
    if port is not None:
        ref["port"] = port
    if section is not None:
        ref["sectionName"] = section
    return ref


def backend(name, port=80, weight=None, ns=None, **extra):
    ref = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    if ns is not None:
        ref["namespace"] = ns
    ref.update(extra)
    return ref


def rule(*backends, **fields):
    return {"backendRefs": list(backends), **fields}


def route(kind, name, parents, rules, ns=NS, created=None, generation=1, version="v1"):
    meta = {"name": name, "namespace": ns, "generation": generation}
    if created is not None:
        meta["creationTimestamp"] = created
    return {"apiVersion": f"{GATEWAY}/{version}", "kind": kind, "metadata": meta,
            "spec": {"parentRefs": parents, "rules": rules}}


def http_route(name, parents, rules, **kw):
    return route("HTTPRoute", name, parents, rules, **kw)


# --- the standard scene: Service mesh/echo (10.96.0.10:80 http) and two versions -------------


def echo_scene():
    """mesh/echo and mesh/echo-v1, mesh/echo-v2: one ready endpoint each."""
    return [
        service("echo", "10.96.0.10"),
        slice_("echo-a", "echo", [ep("10.244.0.10")]),
        service("echo-v1", "10.96.0.11"),
        slice_("echo-v1-a", "echo-v1", [ep("10.244.0.11")]),
        service("echo-v2", "10.96.0.12"),
        slice_("echo-v2-a", "echo-v2", [ep("10.244.0.12")]),
    ]


# --- reading a Resolution ---------------------------------------------------------------------


def run(objects, node_name=NODE) -> Resolution:
    return resolve(objects, node_name)


def fe_key(text: str, scope: str = "") -> FrontendKey:
    """'10.96.0.10:80/tcp' or '[fd00::10]:80/udp' -> FrontendKey."""
    hostport, protocol = text.rsplit("/", 1)
    host, number = hostport.rsplit(":", 1)
    return FrontendKey(host.strip("[]"), int(number), protocol.upper(), scope)


def split(res: Resolution, frontend: str, scope: str = ""):
    """The split of a frontend as [(weight, 'ns/svc:port/tcp/v4' or 'reject')], None if absent."""
    state = res.state.frontends.get(fe_key(frontend, scope))
    if state is None:
        return None
    return [(s.weight, str(s.group) if s.group else "reject") for s in state.split]


def via(res: Resolution, frontend: str, scope: str = ""):
    state = res.state.frontends[fe_key(frontend, scope)]
    return str(state.route) if state.route else None


def group(res: Resolution, key: str):
    """(verdict name, ['ip:port', ...], affinity) of a group by its text, None if absent."""
    for gk, g in res.state.groups.items():
        if str(gk) == key:
            return g.verdict.name, [str(e) for e in g.endpoints], g.affinity_timeout
    return None


def endpoints(res: Resolution, key: str):
    found = group(res, key)
    assert found is not None, f"no group {key}; groups: {[str(k) for k in res.state.groups]}"
    return found[1]


def verdict(res: Resolution, key: str) -> str:
    found = group(res, key)
    assert found is not None, f"no group {key}"
    return found[0]


def conditions(res: Resolution, kind: str, name: str, ns: str = NS):
    """[{type: (status, reason, message)}] per parent entry of a route's status."""
    status = res.statuses[RouteId(kind, ns, name)]
    return [{c.type: (c.status, c.reason, c.message) for c in p.conditions} for p in status.parents]


def accepted(res: Resolution, kind: str, name: str, ns: str = NS, index: int = 0):
    status, reason, _ = conditions(res, kind, name, ns)[index]["Accepted"]
    return status, reason


FORWARD, REJECT, UNREACHABLE = Verdict.FORWARD.name, Verdict.REJECT.name, Verdict.UNREACHABLE.name
