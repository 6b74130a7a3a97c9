"""Kubernetes objects (plain dicts) to typed records: the only code in resolve that reads raw fields.

Role: recognise an object's kind and identity, read the fields meshlet needs, apply the API
defaults (weight 1, protocol TCP, parentRef group gateway.networking.k8s.io, ...), and say in one
human line per problem what was wrong and what was done about it.
May touch: nothing but its arguments (pure; no I/O, no clock).
Invariants:
- no function here raises on any input, however malformed (wrong types, missing fields, garbage);
- every record is a frozen, comparable value (a slotted dataclass; EndpointTraits, shared by
  many endpoints, a NamedTuple), so "this update changed nothing" is a plain equality check and
  the incremental resolver can skip it;
- a record keeps only the fields resolve reads, never the raw dict, and what repeats once per
  endpoint (conditions, node name, hints) is interned (EndpointTraits): the resolver holds every
  object of the cluster, so its records are a large part of the agent's memory.
- addresses are in `ipaddress` canonical text (model invariant), ports are 1-65535, protocols are
  one of model.PROTOCOLS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from agent.kinds import ROUTE_KINDS, ObjectKey, identify  # re-exported: resolve reads them as o.*
from agent.model import (
    PASSIVE_HEALTH_KEY,
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_BACKEND_REFS,
    PROTOCOLS,
    SERVICE_PROXY_NAME,
    SKIP_KEY,
    RouteId,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"

#: Gateway API bounds a backendRef weight to 0..1,000,000. A value outside it can only come from
#: a manifest the API server never validated; we reject the whole route (UnsupportedValue naming
#: the field) rather than clamp it, because a clamped weight would silently send traffic in
#: proportions nobody wrote.
MAX_WEIGHT = 1_000_000
MAX_AFFINITY_TIMEOUT = 86400



ServiceId = tuple[str, str]  #: (namespace, name)


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    #: why the Service has no frontend (A1), "" when it is load-balanced
    not_balanced: str
    external_name: bool
    #: frontend addresses (A2): clusterIPs, externalIPs, VIP load-balancer IPs; canonical, unique
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    local_only: bool  #: internalTrafficPolicy Local (A7)
    affinity_timeout: int  #: 0 = no ClientIP affinity (A11)
    passive_health: bool = True  #: False when annotated meshlet.io/passive-health: "off" (A17)

    @property
    def id(self) -> ServiceId:
        return (self.namespace, self.name)

    @property
    def load_balanced(self) -> bool:
        return not self.not_balanced


class EndpointTraits(NamedTuple):
    """Everything resolve reads of a slice endpoint except its address (A5 defaults applied).

    Interned (`_intern_traits`): a cluster has few distinct combinations (conditions x node x
    hints), so the 500k endpoints of 50k Services share a few hundred of these instead of
    holding one record each.
    """

    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    for_nodes: tuple[str, ...] | None  #: None = no hint
    for_zones: tuple[str, ...] | None


#: The intern table of EndpointTraits, keyed by the plain tuple of their fields (a plain tuple is
#: cheaper to build than the NamedTuple, which is then built once per distinct value).
#: Interning only saves memory and time (equal values stay equal), so the table may be dropped at
#: any time: it is, when node churn has made it large.
_TRAITS: dict[tuple, EndpointTraits] = {}
_TRAITS_LIMIT = 65536


#: Intern table of the tuples of records that many objects hold alike: a Service's ports (most
#: Services of a cluster have the same one or two), a slice's ports and its endpoints' traits.
#: Sharing them saves memory, and objects the garbage collector must track: on a cold sync its
#: passes over the objects being built were the biggest cost of resolve. Same rules as _TRAITS.
_SHARED: dict[tuple, tuple] = {}


def _shared(value: tuple) -> tuple:
    """The one instance of a tuple of (hashable, immutable) records equal to `value`."""
    held = _SHARED.get(value)
    if held is None:
        if len(_SHARED) >= _TRAITS_LIMIT:
            _SHARED.clear()
        held = _SHARED[value] = value
    return held


def endpoint_traits(ready: bool, serving: bool, terminating: bool, node_name: str | None,
                    for_nodes: tuple[str, ...] | None, for_zones: tuple[str, ...] | None) -> EndpointTraits:
    """The interned EndpointTraits with these fields."""
    fields = (ready, serving, terminating, node_name, for_nodes, for_zones)
    traits = _TRAITS.get(fields)
    if traits is None:
        if len(_TRAITS) >= _TRAITS_LIMIT:
            _TRAITS.clear()
        traits = _TRAITS[fields] = EndpointTraits(*fields)
    return traits


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str | None  #: the kubernetes.io/service-name label
    family: int | None  #: 4 or 6; None for FQDN slices, which no socket hook can use
    ports: tuple[SlicePort, ...]
    #: Endpoint i is (addresses[i], traits[i]). Two parallel tuples rather than one record per
    #: endpoint: a tuple of strings is one untracked object for the garbage collector, and the
    #: traits are shared (EndpointTraits), so a slice costs a few objects whatever its size.
    addresses: tuple[str, ...]  #: canonical, of `family`, in the slice's order
    traits: tuple[EndpointTraits, ...]


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    node_name: str | None
    skip_annotation: bool


@dataclass(frozen=True, slots=True)
class ParentRefRecord:
    raw: tuple[tuple[str, Any], ...]  #: the parentRef verbatim, items sorted by key
    namespace: str
    name: str
    section_name: str | None
    port: int | None
    problem: str  #: "" when well-formed; else why it can match no parent

    @property
    def service(self) -> ServiceId:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class BackendRefRecord:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None
    weight: int
    problem: str  #: "" when well-formed; else why it names no Service port (B10)


@dataclass(frozen=True, slots=True)
class RuleRecord:
    backend_refs: tuple[BackendRefRecord, ...]


@dataclass(frozen=True, slots=True)
class RouteRecord:
    id: RouteId
    generation: int
    order: tuple  #: B7 sort key: creationTimestamp (missing last), then namespace/name
    protocol: str  #: the Service port protocol this kind attaches to (B3)
    parents: tuple[ParentRefRecord, ...]  #: ours only (B1), duplicates dropped, route order
    rules: tuple[RuleRecord, ...]
    unsupported: str  #: "" or why the whole route is rejected (B9, weights, slot limit)

    @property
    def parent_services(self) -> frozenset[ServiceId]:
        return frozenset(p.service for p in self.parents if not p.problem)

    @property
    def backend_services(self) -> frozenset[ServiceId]:
        return frozenset(
            (ref.namespace, ref.name) for rule in self.rules for ref in rule.backend_refs if ref.name
        )


# --- small readers ----------------------------------------------------------------------------


class _Notes:
    """Collects the problems found while reading one object, each prefixed with what it is.

    `what` is formatted only when there is a problem: most objects have none, and a cold sync
    reads every object of the cluster."""

    def __init__(self, what: object):
        self.what = what
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        self.lines.append(f"{self.what}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value: Any, notes: _Notes | None = None, field: str = "") -> dict:
    if isinstance(value, dict):
        return value
    if value is not None and notes is not None:
        notes.add(f"{field} is not an object; ignored")
    return {}


def _list(value: Any, notes: _Notes | None = None, field: str = "") -> list:
    if isinstance(value, list):
        return value
    if value is not None and notes is not None:
        notes.add(f"{field} is not a list; ignored")
    return []


def _str(value: Any, notes: _Notes | None = None, field: str = "") -> str | None:
    if isinstance(value, str):
        return value
    if value is not None and notes is not None:
        notes.add(f"{field} is not a string; ignored")
    return None


def _flag(value: Any, notes: _Notes, field: str) -> bool | None:
    """An optional boolean; a wrong type counts as unset, and says so."""
    if value is None or isinstance(value, bool):
        return value
    notes.add(f"{field} is not a boolean ({value!r}); treated as unset")
    return None


def _port_number(value: Any) -> int | None:
    return value if _is_int(value) and 1 <= value <= 65535 else None


#: An IPv4 address already in canonical dotted form (no leading zeros): most addresses the API
#: gives. Recognising it without `ipaddress` halves the cost of reading an EndpointSlice.
_CANONICAL_V4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                           r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def canonical_ip(text: Any) -> tuple[str, int] | None:
    """(canonical text, family) of an IP address string, or None when it is not one."""
    if not isinstance(text, str):
        return None
    if _CANONICAL_V4.fullmatch(text):
        return text, 4
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return str(addr), addr.version


def _labels(meta: dict) -> dict:
    return _dict(meta.get("labels"))


def _is_true(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "true"


# --- per kind ---------------------------------------------------------------------------------


def parse_namespace_skip(obj: dict) -> bool:
    """C2: the namespace opted out of translation."""
    return _is_true(_labels(_dict(obj.get("metadata"))).get(SKIP_KEY))


def parse_node_zone(obj: dict) -> str | None:
    zone = _labels(_dict(obj.get("metadata"))).get(ZONE_LABEL)
    return zone if isinstance(zone, str) and zone else None


def parse_pod(key: ObjectKey, obj: dict) -> tuple[PodRecord | None, list[str]]:
    notes = _Notes(key)
    meta = _dict(obj.get("metadata"))
    spec = _dict(obj.get("spec"), notes, "spec")
    uid = _str(meta.get("uid"), notes, "metadata.uid")
    if not uid:
        notes.add("no metadata.uid, so no cgroup can be matched to it; skipped")
        return None, notes.lines
    annotations = _dict(meta.get("annotations"), notes, "metadata.annotations")
    return (
        PodRecord(
            namespace=key.namespace,
            name=key.name,
            uid=uid,
            node_name=_str(spec.get("nodeName"), notes, "spec.nodeName"),
            skip_annotation=_is_true(annotations.get(SKIP_KEY)),
        ),
        notes.lines,
    )


def parse_service(key: ObjectKey, obj: dict) -> tuple[ServiceRecord, list[str]]:
    notes = _Notes(key)
    meta = _dict(obj.get("metadata"))
    spec = _dict(obj.get("spec"), notes, "spec")
    labels = _labels(meta)
    external_name = spec.get("type") == "ExternalName"
    cluster_ips = [ip for ip in _list(spec.get("clusterIPs"), notes, "spec.clusterIPs")]
    if not cluster_ips and spec.get("clusterIP") is not None:
        cluster_ips = [spec.get("clusterIP")]
    not_balanced = _why_not_balanced(spec, labels, cluster_ips, external_name)
    addresses: list[str] = []
    if not not_balanced:
        addresses = _frontend_addresses(spec, cluster_ips, _dict(obj.get("status")), notes)
        if not addresses:
            not_balanced = "has no valid cluster IP"
    return (
        ServiceRecord(
            namespace=key.namespace,
            name=key.name,
            not_balanced=not_balanced,
            external_name=external_name,
            addresses=tuple(addresses),
            ports=_shared(_service_ports(spec, notes)),
            local_only=spec.get("internalTrafficPolicy") == "Local",
            affinity_timeout=_affinity_timeout(spec, notes),
            passive_health=_passive_health(meta, notes),
        ),
        notes.lines,
    )


def _passive_health(meta: dict, notes: _Notes) -> bool:
    """SEMANTICS A17: on unless the Service is annotated meshlet.io/passive-health: "off"."""
    value = _dict(meta.get("annotations"), notes, "metadata.annotations").get(PASSIVE_HEALTH_KEY)
    if value is None:
        return True
    if isinstance(value, str) and value.lower() in ("off", "on"):
        return value.lower() == "on"
    notes.add(f"annotation {PASSIVE_HEALTH_KEY} {value!r} is neither \"off\" nor \"on\"; passive health stays on")
    return True


def _why_not_balanced(spec: dict, labels: dict, cluster_ips: list, external_name: bool) -> str:
    """SEMANTICS A1: "" when the Service is load-balanced, else the reason, for status messages."""
    if external_name:
        return "is of type ExternalName"
    if not cluster_ips or cluster_ips[0] in ("", None):
        return "has no cluster IP"
    if cluster_ips[0] == "None":
        return "is headless (clusterIP None)"
    proxy = labels.get(SERVICE_PROXY_NAME_LABEL)
    if proxy is not None and proxy != SERVICE_PROXY_NAME:
        return f"is labelled {SERVICE_PROXY_NAME_LABEL}={proxy} (another proxy's)"
    if HEADLESS_LABEL in labels:
        return f"is labelled {HEADLESS_LABEL}"
    return ""


def _frontend_addresses(spec: dict, cluster_ips: list, status: dict, notes: _Notes) -> list[str]:
    """SEMANTICS A2: clusterIPs, externalIPs and VIP-mode load-balancer IPs, canonical and unique."""
    found: list[str] = []

    def take(value: Any, field: str) -> None:
        parsed = canonical_ip(value)
        if parsed is None:
            notes.add(f"{field} {value!r} is not an IP address; ignored")
        elif parsed[0] not in found:
            found.append(parsed[0])

    for i, ip in enumerate(cluster_ips):
        take(ip, f"spec.clusterIPs[{i}]")
    for i, ip in enumerate(_list(spec.get("externalIPs"), notes, "spec.externalIPs")):
        take(ip, f"spec.externalIPs[{i}]")
    ingress = _list(_dict(status.get("loadBalancer")).get("ingress"), notes, "status.loadBalancer.ingress")
    for i, entry in enumerate(ingress):
        entry = _dict(entry)
        # ipMode Proxy means the load balancer forwards to the nodes itself: not a VIP to translate.
        if entry.get("ip") is not None and entry.get("ipMode") in (None, "VIP"):
            take(entry.get("ip"), f"status.loadBalancer.ingress[{i}].ip")
    return found


def _service_ports(spec: dict, notes: _Notes) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen: set[tuple[int, str]] = set()
    for i, raw in enumerate(_list(spec.get("ports"), notes, "spec.ports")):
        if not isinstance(raw, dict):
            notes.add(f"spec.ports[{i}] is not an object; ignored")
            continue
        name = raw.get("name")
        name = "" if name is None else name
        number = _port_number(raw.get("port"))
        protocol = raw.get("protocol") or "TCP"  # the API server defaults an empty protocol to TCP
        if not isinstance(name, str) or number is None or protocol not in PROTOCOLS:
            notes.add(f"spec.ports[{i}] needs a string name, a port 1-65535 and protocol TCP, UDP or SCTP; ignored")
            continue
        if (number, protocol) in seen:
            notes.add(f"spec.ports[{i}] repeats {number}/{protocol}; ignored")
            continue
        seen.add((number, protocol))
        ports.append(ServicePort(name, number, protocol))
    return tuple(ports)


def _affinity_timeout(spec: dict, notes: _Notes) -> int:
    """SEMANTICS A11: seconds of ClientIP affinity, 0 without it."""
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    client_ip = _dict(_dict(spec.get("sessionAffinityConfig")).get("clientIP"))
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not _is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        notes.add(
            f"sessionAffinityConfig.clientIP.timeoutSeconds {timeout!r} is not 1-{MAX_AFFINITY_TIMEOUT}; "
            f"using the default {DEFAULT_AFFINITY_TIMEOUT}"
        )
        return DEFAULT_AFFINITY_TIMEOUT
    return timeout


def parse_slice(key: ObjectKey, obj: dict) -> tuple[SliceRecord, list[str]]:
    notes = _Notes(key)
    meta = _dict(obj.get("metadata"))
    service = _labels(meta).get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    family = {"IPv4": 4, "IPv6": 6}.get(address_type) if isinstance(address_type, str) else None
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        notes.add(f"addressType {address_type!r} is not IPv4, IPv6 or FQDN; endpoints ignored")
    ports: list[SlicePort] = []
    for i, raw in enumerate(_list(obj.get("ports"), notes, "ports")):
        raw = _dict(raw)
        name = raw.get("name")
        name = "" if name is None else name
        protocol = raw.get("protocol") or "TCP"  # the API server defaults an empty protocol to TCP
        number = _port_number(raw.get("port"))
        # A port without a number means "all ports" to some consumers; kube-proxy skips it too.
        if isinstance(name, str) and protocol in PROTOCOLS and number is not None:
            ports.append(SlicePort(name, protocol, number))
        elif raw.get("port") is not None:
            notes.add(f"ports[{i}] is not a valid named port; ignored")
    addresses: list[str] = []
    traits: list[EndpointTraits] = []
    if family is not None:
        raws = _list(obj.get("endpoints"), notes, "endpoints")
        plain = _plain_slice_endpoints(raws, family)
        if plain is not None:
            addresses, traits = plain
        else:
            for i, raw in enumerate(raws):
                endpoint = _slice_endpoint(_dict(raw), family, notes, f"endpoints[{i}]")
                if endpoint is not None:
                    addresses.append(endpoint[0])
                    traits.append(endpoint[1])
    return (
        SliceRecord(
            namespace=key.namespace,
            name=key.name,
            service=service if isinstance(service, str) and service else None,
            family=family,
            ports=_shared(tuple(ports)),
            addresses=tuple(addresses),
            traits=_shared(tuple(traits)),
        ),
        notes.lines,
    )


def _plain_slice_endpoints(raws: list, family: int) -> tuple[list[str], list[EndpointTraits]] | None:
    """(addresses, traits) of a whole slice whose every endpoint is in the shape the API server
    sends (every field of the right type, no topology hints), read as `_slice_endpoint` reads it;
    None as soon as one is not (the caller then takes the checked path, endpoint by endpoint,
    which says what was wrong).

    Why a second path: a cold sync reads every endpoint of the cluster (500k at 50k Services);
    the checked path's helper calls per field and the traits lookup per endpoint (endpoints of a
    slice nearly always share their conditions and node) were half of resolve's time.
    test_resolve_fast_path compares the two.
    """
    addresses: list[str] = []
    traits: list[EndpointTraits] = []
    seen: dict[tuple, EndpointTraits] = {}
    canonical = _CANONICAL_V4.fullmatch
    for raw in raws:
        if type(raw) is not dict or "hints" in raw:
            return None
        address_list = raw.get("addresses")
        conditions = raw.get("conditions", {})
        node_name = raw.get("nodeName")
        if type(address_list) is not list or not address_list or type(conditions) is not dict:
            return None
        if node_name is not None and type(node_name) is not str:
            return None
        ready = conditions.get("ready")
        serving = conditions.get("serving")
        terminating = conditions.get("terminating")
        # `in` on a tuple compares with ==, so 1 and 0 would pass for True and False: identity.
        if not (ready is True or ready is False or ready is None) \
                or not (serving is True or serving is False or serving is None) \
                or not (terminating is True or terminating is False or terminating is None):
            return None
        address = address_list[0]
        if not (family == 4 and type(address) is str and canonical(address)):
            parsed = canonical_ip(address)  # the common case above needs no parse
            if parsed is None or parsed[1] != family:
                return None
            address = parsed[0]
        # SEMANTICS A5, as in _slice_endpoint. The key holds only True, False, None and a str,
        # so equal keys are identical conditions.
        key = (ready is not False, serving is not False, terminating is True, node_name)
        shared = seen.get(key)
        if shared is None:
            shared = seen[key] = endpoint_traits(*key, None, None)
        addresses.append(address)
        traits.append(shared)
    return addresses, traits


def _slice_endpoint(raw: dict, family: int, notes: _Notes, where: str) -> tuple[str, EndpointTraits] | None:
    """(address, traits) of one endpoint, or None (with a note) when it has no usable address."""
    addresses = _list(raw.get("addresses"), notes, f"{where}.addresses")
    # The addresses of one endpoint are fungible (API docs); like kube-proxy we use the first.
    parsed = canonical_ip(addresses[0]) if addresses else None
    if parsed is None or parsed[1] != family:
        notes.add(f"{where} has no IPv{family} address first in addresses; ignored")
        return None
    conditions = _dict(raw.get("conditions"), notes, f"{where}.conditions")
    ready = _flag(conditions.get("ready"), notes, f"{where}.conditions.ready")
    serving = _flag(conditions.get("serving"), notes, f"{where}.conditions.serving")
    terminating = _flag(conditions.get("terminating"), notes, f"{where}.conditions.terminating")
    hints = _dict(raw.get("hints"), notes, f"{where}.hints")
    return parsed[0], endpoint_traits(
        # SEMANTICS A5: ready and serving default to true, terminating to false.
        ready=ready is not False,
        serving=serving is not False,
        terminating=terminating is True,
        node_name=_str(raw.get("nodeName"), notes, f"{where}.nodeName"),
        for_nodes=_hint_names(hints.get("forNodes")),
        for_zones=_hint_names(hints.get("forZones")),
    )


def _hint_names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(sorted({h["name"] for h in _list(value) if isinstance(h, dict) and isinstance(h.get("name"), str)}))
    return names or None


# --- routes -----------------------------------------------------------------------------------


def route_order(meta: dict, namespace: str, name: str) -> tuple:
    """SEMANTICS B7: oldest first, a missing or unreadable creationTimestamp last; then ns/name."""
    stamp = _timestamp(meta.get("creationTimestamp"))
    return (stamp is None, stamp or 0.0, namespace, name)


def _timestamp(value: Any) -> float | None:
    # YAML loaders turn an unquoted RFC 3339 time into a datetime; the API gives a string.
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def parse_route(key: ObjectKey, obj: dict) -> tuple[RouteRecord, list[str]]:
    notes = _Notes(key)
    meta = _dict(obj.get("metadata"))
    spec = _dict(obj.get("spec"), notes, "spec")
    generation = meta.get("generation")
    unsupported: list[str] = []
    rules = _route_rules(key, spec, unsupported)
    return (
        RouteRecord(
            id=RouteId(key.kind, key.namespace, key.name),
            generation=generation if _is_int(generation) else 0,
            order=route_order(meta, key.namespace, key.name),
            protocol="UDP" if key.kind == "UDPRoute" else "TCP",
            parents=_our_parent_refs(key.namespace, spec.get("parentRefs"), notes),
            rules=rules,
            unsupported="; ".join(unsupported),
        ),
        notes.lines,
    )


def _our_parent_refs(route_ns: str, value: Any, notes: _Notes) -> tuple[ParentRefRecord, ...]:
    """SEMANTICS B1: the parentRefs naming a core Service, each once, in the Route's order."""
    refs: list[ParentRefRecord] = []
    seen: set = set()
    for i, raw in enumerate(_list(value, notes, "spec.parentRefs")):
        if not isinstance(raw, dict):
            notes.add(f"spec.parentRefs[{i}] is not an object; ignored")
            continue
        # An omitted group is the Gateway API group and an omitted kind is Gateway: not ours.
        if raw.get("kind") != "Service" or raw.get("group") not in ("", "core"):
            continue
        ref = _parent_ref(route_ns, raw)
        identity = (ref.namespace, ref.name, ref.section_name, ref.port) if not ref.problem else repr(ref.raw)
        if identity in seen:
            continue  # a duplicate parentRef gets one status entry (B14)
        seen.add(identity)
        refs.append(ref)
    return tuple(refs)


def _parent_ref(route_ns: str, raw: dict) -> ParentRefRecord:
    namespace = raw.get("namespace", route_ns)
    name = raw.get("name")
    section = raw.get("sectionName")
    port = raw.get("port")
    problems = []
    if not isinstance(namespace, str) or not namespace:
        problems.append(f"namespace {namespace!r} is not a namespace name")
    if not isinstance(name, str) or not name:
        problems.append("name is missing")
    if section is not None and not isinstance(section, str):
        problems.append(f"sectionName {section!r} is not a port name")
    if port is not None and _port_number(port) is None:
        problems.append(f"port {port!r} is not a port number 1-65535")
    return ParentRefRecord(
        raw=tuple(sorted(raw.items(), key=lambda item: str(item[0]))),
        namespace=namespace if isinstance(namespace, str) else "",
        name=name if isinstance(name, str) else "",
        section_name=section if isinstance(section, str) else None,
        port=port if _port_number(port) is not None else None,
        problem="parentRef " + ", ".join(problems) if problems else "",
    )


#: SEMANTICS B9: the fields of a rule that a connection-level route cannot honour, per kind.
_RULE_FIELDS = {
    "HTTPRoute": ("filters", "timeouts", "retry", "sessionPersistence"),
    "GRPCRoute": ("filters", "sessionPersistence"),
}
_MATCH_FIELDS = {
    "HTTPRoute": ("headers", "queryParams", "method"),
    "GRPCRoute": ("method", "headers"),
}
_WHY_L4 = "meshlet routes whole connections, so only rules that match every request can apply"


def _route_rules(key: ObjectKey, spec: dict, unsupported: list[str]) -> tuple[RuleRecord, ...]:
    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        unsupported.append("spec.rules is not a list")
        return ()
    rules: list[RuleRecord] = []
    for i, raw in enumerate(raw_rules or []):
        if not isinstance(raw, dict):
            unsupported.append(f"rule {i}: not an object")
            rules.append(RuleRecord(()))
            continue
        unsupported.extend(l4_problems(key.kind, i, raw))
        rules.append(RuleRecord(_backend_refs(key.namespace, i, raw.get("backendRefs"), unsupported)))
    return tuple(rules)


def l4_problems(kind: str, index: int, rule: dict) -> list[str]:
    """SEMANTICS B9: why rule `index` cannot be expressed per connection (empty when it can)."""
    found = []
    for field in _RULE_FIELDS.get(kind, ()):
        if rule.get(field):
            found.append(f"rule {index}: {field} is not supported ({_WHY_L4})")
    if kind in _MATCH_FIELDS:
        matches = rule.get("matches")
        if matches is not None and not isinstance(matches, list):
            found.append(f"rule {index}: matches is not a list")
        for j, match in enumerate(matches if isinstance(matches, list) else []):
            if not isinstance(match, dict):
                found.append(f"rule {index}: matches[{j}] is not an object")
                continue
            for field in _MATCH_FIELDS[kind]:
                if match.get(field):
                    found.append(f"rule {index}: matches[{j}].{field} is not supported ({_WHY_L4})")
            if kind == "HTTPRoute" and match.get("path") is not None and not _matches_every_path(match["path"]):
                found.append(
                    f"rule {index}: matches[{j}].path {_describe_path(match['path'])} is not supported "
                    f"(only PathPrefix /: {_WHY_L4})"
                )
        for j, ref in enumerate(_list(rule.get("backendRefs"))):
            if isinstance(ref, dict) and ref.get("filters"):
                found.append(f"rule {index}: backendRefs[{j}].filters is not supported ({_WHY_L4})")
    return found


def _matches_every_path(path: Any) -> bool:
    # The API server defaults type to PathPrefix and value to "/", so omitted parts match all.
    return isinstance(path, dict) and path.get("type", "PathPrefix") == "PathPrefix" and path.get("value", "/") == "/"


def _describe_path(path: Any) -> str:
    if not isinstance(path, dict):
        return repr(path)
    return f"{path.get('type', 'PathPrefix')} {path.get('value', '/')}"


def _backend_refs(route_ns: str, index: int, value: Any, unsupported: list[str]) -> tuple[BackendRefRecord, ...]:
    if value is not None and not isinstance(value, list):
        unsupported.append(f"rule {index}: backendRefs is not a list")
        return ()
    raw_refs = value or []
    if len(raw_refs) > MAX_BACKEND_REFS:
        unsupported.append(
            f"rule {index}: {len(raw_refs)} backendRefs, at most {MAX_BACKEND_REFS} are supported "
            "(the datapath's split slots per frontend)"
        )
    refs: list[BackendRefRecord] = []
    for j, raw in enumerate(raw_refs):
        if not isinstance(raw, dict):
            unsupported.append(f"rule {index}: backendRefs[{j}] is not an object")
            continue
        weight = raw.get("weight", 1)
        if weight is None:
            weight = 1
        if not _is_int(weight) or not 0 <= weight <= MAX_WEIGHT:
            unsupported.append(f"rule {index}: backendRefs[{j}].weight {weight!r} is not an integer 0-{MAX_WEIGHT}")
            weight = 0
        refs.append(_backend_ref(route_ns, raw, weight))
    return tuple(refs)


def _backend_ref(route_ns: str, raw: dict, weight: int) -> BackendRefRecord:
    # BackendObjectReference defaults: group "" (core), kind Service, the Route's namespace.
    group = raw.get("group", "")
    kind = raw.get("kind", "Service")
    namespace = raw.get("namespace", route_ns)
    name = raw.get("name")
    port = raw.get("port")
    problems = []
    if not isinstance(namespace, str) or not namespace:
        problems.append(f"namespace {namespace!r} is not a namespace name")
    if not isinstance(name, str) or not name:
        problems.append("name is missing")
    if port is None:
        problems.append("port is required for a Service")
    elif _port_number(port) is None:
        problems.append(f"port {port!r} is not a port number 1-65535")
    return BackendRefRecord(
        group="" if group is None else str(group),
        kind="Service" if kind is None else str(kind),
        namespace=namespace if isinstance(namespace, str) and namespace else route_ns,
        name=name if isinstance(name, str) else "",
        port=_port_number(port),
        weight=weight,
        problem=", ".join(problems),
    )
