"""The Kubernetes kinds meshlet reads: their API groups, versions and plurals, and an object's
identity. The one home of these lists (the kube source watches them, the manifests source and
resolve accept them).

Pure: no I/O. `identify` never raises, whatever the input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

GATEWAY_GROUP = "gateway.networking.k8s.io"
#: Every version a cluster may serve the route kinds in, best first (stable before beta and
#: alpha); the fields meshlet reads are the same in all.
GATEWAY_VERSIONS = ("v1", "v1beta1", "v1alpha2", "v1alpha3")
#: Route kinds in precedence order on a TCP port, strongest first (SEMANTICS B6); UDPRoute alone
#: owns UDP ports.
ROUTE_KINDS = ("GRPCRoute", "HTTPRoute", "TLSRoute", "TCPRoute", "UDPRoute")
#: Route kind -> its plural resource name in the Gateway API group.
ROUTE_PLURALS = {kind: kind.lower() + "s" for kind in ROUTE_KINDS}


@dataclass(frozen=True)
class ClusterKind:
    """A kind every cluster serves: its API group ("" for core), version and plural."""

    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


#: The kinds besides the routes, in the order the kube source starts their watchers.
CLUSTER_KINDS = {
    "Namespace": ClusterKind("", "v1", "namespaces"),
    "Node": ClusterKind("", "v1", "nodes"),
    "Service": ClusterKind("", "v1", "services"),
    "EndpointSlice": ClusterKind("discovery.k8s.io", "v1", "endpointslices"),
    "Pod": ClusterKind("", "v1", "pods"),
}
CLUSTER_SCOPED_KINDS = ("Namespace", "Node")

#: The namespace the API server gives a namespaced object that names none (kubectl's default).
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, order=True, slots=True)
class ObjectKey:
    kind: str
    namespace: str  #: "" for cluster-scoped kinds
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


def kind_supported(api_version: str, kind: str) -> bool:
    """Is this apiVersion of this kind one meshlet reads?"""
    cluster_kind = CLUSTER_KINDS.get(kind)
    if cluster_kind is not None:
        return api_version == cluster_kind.api_version
    if kind in ROUTE_KINDS:
        group, _, version = api_version.partition("/")
        return group == GATEWAY_GROUP and version in GATEWAY_VERSIONS
    return False


def identify(obj: Any) -> tuple[ObjectKey | None, str]:
    """The object's key, or None and the reason it cannot be used (unknown kind, no name...)."""
    if not isinstance(obj, dict):
        return None, f"ignored an object that is not a mapping ({type(obj).__name__})"
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    label = f"{kind or '?'} {name or '?'}"
    if not isinstance(kind, str) or not isinstance(api_version, str):
        return None, f"ignored {label}: apiVersion and kind must both be strings"
    if not kind_supported(api_version, kind):
        return None, f"ignored {label}: {api_version} {kind} is not a kind meshlet reads"
    if not isinstance(name, str) or not name:
        return None, f"ignored a {kind} without metadata.name"
    # Kind and namespace interned: a parsed JSON object brings its own copy of each, and the
    # records of every object in a namespace (and the store's keys) would each keep one.
    if kind in CLUSTER_SCOPED_KINDS:
        return ObjectKey(sys.intern(str(kind)), "", name), ""
    namespace = meta.get("namespace")
    if namespace is None or namespace == "":
        namespace = DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        return None, f"ignored {kind} {name}: metadata.namespace is not a string"
    return ObjectKey(sys.intern(str(kind)), sys.intern(str(namespace)), name), ""
