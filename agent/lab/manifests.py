"""What the lab builds from a manifests directory: the same files that drive `meshlet run --manifests`.

Role: read the directory with the agent's own manifests reader (agent.sources.manifests: one
parser for both, so the lab and the agent can never disagree on what the files say) and turn
each Pod into a `PodSpec` (namespace, name, uid, addresses from status.podIPs, QoS class, the
ports its echo server listens on); also a few lookups the demo needs (Service frontends, which
pod backs which Service).

May touch: the files below the directory, read only. Pure apart from `read_objects`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UserError

#: Where the echo server listens when a Pod declares no containerPort.
DEFAULT_ECHO_PORT = 8080

_QOS = {"Guaranteed": "guaranteed", "Burstable": "burstable", "BestEffort": "besteffort"}


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    uid: str
    ipv4: str | None
    ipv6: str | None
    qos: str
    echo_ports: tuple[int, ...]
    node_name: str | None


def read_objects(directory: str | Path) -> list[dict]:
    """Every object in the directory, in the agent's order; a bad document is a UserError here
    (the lab cannot guess which pods a broken file meant)."""
    from agent.sources.manifests import list_manifest_files, order_routes, parse_manifest

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"manifests directory {directory} does not exist; "
                        "hint: pass --manifests DIR (examples/demo is a complete example)")
    objects: list[dict] = []
    listing = list_manifest_files(directory)
    for relpath, (_signature, reason) in listing.broken.items():
        raise UserError(f"{directory / relpath}: {reason}; hint: fix or remove that file")
    for relpath in listing.files:
        with open(directory / relpath) as f:
            contents = parse_manifest(relpath, f.read())
        if contents.bad:
            bad = contents.bad[0]
            raise UserError(f"{directory / bad.file} document {bad.index}: {bad.error}; "
                            "hint: fix or remove that document")
        objects.extend(contents.objects)
    return order_routes(objects)


def pod_specs(objects: list[dict]) -> list[PodSpec]:
    """One PodSpec per Pod object (host-network pods are skipped: they have no netns of their own)."""
    specs = []
    for obj in objects:
        if obj.get("kind") != "Pod":
            continue
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        if spec.get("hostNetwork"):
            continue
        ref = f"{meta['namespace']}/{meta['name']}"
        uid = meta.get("uid")
        if not uid:
            raise UserError(f"Pod {ref} has no metadata.uid; hint: the agent finds pods by uid in "
                            "their cgroup, so the lab needs one (any UUID)")
        ips = [entry.get("ip") for entry in status.get("podIPs") or [] if entry.get("ip")]
        if not ips and status.get("podIP"):
            ips = [status["podIP"]]
        by_family: dict[int, str] = {}
        for ip in ips:
            try:
                version = ipaddress.ip_address(ip).version
            except ValueError:
                raise UserError(f"Pod {ref}: status.podIPs has {ip!r}, not an IP address; "
                                "hint: write addresses like 10.244.1.5") from None
            by_family.setdefault(version, ip)
        ports = sorted({
            int(port["containerPort"])
            for container in spec.get("containers") or []
            for port in container.get("ports") or []
            if port.get("containerPort")
        })
        specs.append(PodSpec(
            namespace=meta["namespace"], name=meta["name"], uid=uid,
            ipv4=by_family.get(4), ipv6=by_family.get(6),
            qos=_QOS.get(status.get("qosClass"), "besteffort"),
            echo_ports=tuple(ports) or (DEFAULT_ECHO_PORT,),
            node_name=spec.get("nodeName"),
        ))
    return specs


def node_names(objects: list[dict]) -> list[str]:
    return [obj["metadata"]["name"] for obj in objects if obj.get("kind") == "Node"]


def find(objects: list[dict], kind: str, namespace: str | None, name: str) -> dict:
    for obj in objects:
        meta = obj["metadata"]
        if obj.get("kind") == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return obj
    where = f"{namespace}/{name}" if namespace else name
    raise UserError(f"no {kind} {where} in the manifests; hint: check the manifests directory")


def backing_services(objects: list[dict]) -> dict[str, set[str]]:
    """Pod "namespace/name" -> the "namespace/service" names whose EndpointSlices list it."""
    pod_by_ip = {}
    for obj in objects:
        if obj.get("kind") == "Pod":
            ref = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            for entry in (obj.get("status") or {}).get("podIPs") or []:
                pod_by_ip[entry.get("ip")] = ref
    backs: dict[str, set[str]] = {}
    for obj in objects:
        if obj.get("kind") != "EndpointSlice":
            continue
        meta = obj["metadata"]
        service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if not service:
            continue
        for endpoint in obj.get("endpoints") or []:
            for address in endpoint.get("addresses") or []:
                if address in pod_by_ip:
                    backs.setdefault(pod_by_ip[address], set()).add(f"{meta['namespace']}/{service}")
    return backs


def default_manifests_dir() -> str:
    """examples/demo of this checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(os.path.dirname(here)), "examples", "demo")


def add_pods(lab, specs: list[PodSpec], progress=None) -> list:
    """Make one lab pod per spec (agent.lab.pods.Lab.add_pod); progress(str) hears each one."""
    pods = []
    for spec in specs:
        pod = lab.add_pod(spec.namespace, spec.name, ipv4=spec.ipv4, ipv6=spec.ipv6, qos=spec.qos,
                          uid=spec.uid, echo_ports=spec.echo_ports)
        if progress:
            progress(f"pod {pod.ref:<24} {pod.ipv4:<15} {pod.ipv6:<16} {spec.qos}")
        pods.append(pod)
    return pods
