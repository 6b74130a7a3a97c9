"""Resolve: Kubernetes objects in, DesiredState and Route status out (SEMANTICS A, B, C).

Role: the pure core of meshlet. `Resolver` holds the objects (as typed records, see `objects`)
and indices by Service, by route parent and by route backend, so that `commit()` recomputes
only what a change can reach:

- an EndpointSlice change recomputes the groups of its Service that something uses;
- a Service change recomputes its own frontends and groups, and the frontends and statuses of
  the routes that name it as parent or backend;
- a Route change recomputes the frontends of its parents (old and new) and the statuses of every
  route on those parents (kind precedence can move, B6);
- a Pod or Namespace change recomputes only the client entries it touches; a change of this
  node's zone label recomputes every group (topology hints, A8).

The rules themselves live in `endpoints` (A3-A9), `routes` (B1-B14) and `frontends` (A1, A2,
B5, B8); this module only decides what to recompute and keeps the published state in step.
`resolve()` is the one-shot form: a Resolver over the objects, committed, frozen.

May touch: nothing but its arguments (pure; imports nothing from bcc, kubernetes, pyroute2 or
prometheus_client; no I/O, no clock), except that commit() and upsert_many() pause the garbage
collector while they run (agent.gcpause).

Invariants (besides agent.model's):
- the same set of objects gives the same state, statuses and problems, whatever the order they
  were given in and whatever sequence of upserts and deletes led to it;
- a group is in the state iff a published frontend names it (a reference count per group);
- two Services claiming the same (address, port, protocol) never share it: the first by
  namespace/name keeps it, and a problem line says so;
- no input raises: a bad object becomes a problem line (and is skipped, or read in part).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

from agent.gcpause import gc_paused
from agent.model import (
    BackendGroup,
    ClientPod,
    DesiredState,
    FrontendKey,
    FrontendState,
    GroupKey,
    RouteId,
    RouteStatus,
    StateDelta,
)
from agent.resolve import objects as o
from agent.resolve.endpoints import backend_group
from agent.resolve.frontends import service_frontends
from agent.resolve.routes import EMPTY_VIEW, ParentView, parent_view, route_status

__all__ = ["Resolution", "Resolver", "render_statuses", "resolve"]

#: A problem's home: (kind, namespace, name) of the object it is about. Objects that cannot be
#: identified use ("<apiVersion> <kind>", namespace, name) as written, so a delete clears them.
ProblemKey = tuple[str, str, str]


class Resolver:
    """Incremental: holds the objects and indices; commit() recomputes only what changed."""

    def __init__(self, node_name: str, passive_health: bool = True):
        self.node_name = node_name
        #: the agent's switch for passive health (A17); a Service can only turn it off further
        self.passive_health = passive_health
        # objects, as records
        self._services: dict[o.ServiceId, o.ServiceRecord] = {}
        self._slices: dict[o.ObjectKey, o.SliceRecord] = {}
        self._routes: dict[RouteId, o.RouteRecord] = {}
        self._pods: dict[o.ObjectKey, o.PodRecord] = {}  #: only pods on this node
        self._skip_namespaces: set[str] = set()
        self._zone: str | None = None
        self._problems: dict[ProblemKey, tuple[str, ...]] = {}
        # indices
        self._slices_by_service: dict[o.ServiceId, tuple[o.ObjectKey, ...]] = {}
        self._routes_by_parent: dict[o.ServiceId, tuple[RouteId, ...]] = {}
        self._routes_by_backend: dict[o.ServiceId, tuple[RouteId, ...]] = {}
        self._pods_by_namespace: dict[str, tuple[o.ObjectKey, ...]] = {}
        self._pods_by_uid: dict[str, tuple[o.ObjectKey, ...]] = {}
        # derived, kept between commits
        self._views: dict[o.ServiceId, ParentView] = {}
        self._own_frontends: dict[o.ServiceId, dict[FrontendKey, FrontendState]] = {}
        self._claims: dict[FrontendKey, tuple[o.ServiceId, ...]] = {}
        self._contested: set[FrontendKey] = set()
        self._group_refs: dict[GroupKey, int] = {}
        self._groups_by_service: dict[o.ServiceId, tuple[GroupKey, ...]] = {}
        # published
        self._frontends: dict[FrontendKey, FrontendState] = {}
        self._groups: dict[GroupKey, BackendGroup] = {}
        self._endpoint_count = 0  #: endpoints over the published groups, kept as they change
        self._clients: dict[str, ClientPod] = {}
        self._statuses: dict[RouteId, RouteStatus] = {}
        self._state = DesiredState(self._frontends, self._groups, self._clients)
        # what the next commit must recompute
        self._dirty_parents: set[o.ServiceId] = set()
        self._dirty_frontends: set[o.ServiceId] = set()
        self._dirty_group_services: set[o.ServiceId] = set()
        self._dirty_routes: set[RouteId] = set()
        self._dirty_uids: set[str] = set()
        self._zone_changed = False

    # --- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> DesiredState:
        """Live view of the published state (read-only by convention; changes at commit())."""
        return self._state

    @property
    def endpoint_count(self) -> int:
        """Endpoints over all published groups (counted as groups change: a sum over every group
        after each commit costs milliseconds at 50k Services)."""
        return self._endpoint_count

    @property
    def statuses(self) -> Mapping[RouteId, RouteStatus]:
        """Live view: the status of every Route with at least one Service parentRef (B14)."""
        return self._statuses

    @property
    def problems(self) -> list[str]:
        """Bad objects skipped or read in part, one human line each, in a stable order."""
        lines = [line for key in sorted(self._problems) for line in self._problems[key]]
        for key in sorted(k for k in self._contested if not k.scope):
            owners = sorted(self._claims[key])
            names = ", ".join(f"{ns}/{name}" for ns, name in owners)
            lines.append(f"Services {names} all claim {key}; {owners[0][0]}/{owners[0][1]} keeps it, "
                         "the others get no frontend there")
        return lines

    # --- changes -----------------------------------------------------------------------------

    def upsert(self, obj: dict) -> None:
        """Add or replace an object (by kind, namespace, name). Never raises on bad input."""
        key, why = o.identify(obj)
        if key is None:
            self._note(_unidentified_key(obj), [why])
            return
        if key.kind == "Service":
            record, notes = o.parse_service(key, obj)
            self._note(_problem_key(key), notes)
            self._set_service((key.namespace, key.name), record)
        elif key.kind == "EndpointSlice":
            record, notes = o.parse_slice(key, obj)
            self._note(_problem_key(key), notes)
            self._set_slice(key, record)
        elif key.kind in o.ROUTE_KINDS:
            record, notes = o.parse_route(key, obj)
            self._note(_problem_key(key), notes)
            self._set_route(record.id, record)
        elif key.kind == "Pod":
            record, notes = o.parse_pod(key, obj)
            ours = record is not None and record.node_name == self.node_name
            self._note(_problem_key(key), notes if ours or record is None else [])
            self._set_pod(key, record if ours else None)
        elif key.kind == "Namespace":
            self._set_namespace_skip(key.name, o.parse_namespace_skip(obj))
        elif key.kind == "Node":
            if key.name == self.node_name:
                self._set_zone(o.parse_node_zone(obj))

    def upsert_many(self, objs: Iterable[dict]) -> None:
        """upsert() each object, with the garbage collector paused (agent.gcpause): the form for a
        whole list (a first sync, a relist), where the collector's passes over the objects being
        read cost more than reading them."""
        with gc_paused():
            for obj in objs:
                self.upsert(obj)

    def delete(self, obj: dict) -> None:
        """Remove an object; only apiVersion, kind and metadata namespace/name are read."""
        key, _why = o.identify(obj)
        if key is None:
            self._problems.pop(_unidentified_key(obj), None)
            return
        self._problems.pop(_problem_key(key), None)
        if key.kind == "Service":
            self._set_service((key.namespace, key.name), None)
        elif key.kind == "EndpointSlice":
            self._set_slice(key, None)
        elif key.kind in o.ROUTE_KINDS:
            self._set_route(RouteId(key.kind, key.namespace, key.name), None)
        elif key.kind == "Pod":
            self._set_pod(key, None)
        elif key.kind == "Namespace":
            self._set_namespace_skip(key.name, False)
        elif key.kind == "Node" and key.name == self.node_name:
            self._set_zone(None)

    def _note(self, key: ProblemKey, lines: list[str]) -> None:
        if lines:
            self._problems[key] = tuple(lines)
        else:
            self._problems.pop(key, None)

    def _set_service(self, sid: o.ServiceId, record: o.ServiceRecord | None) -> None:
        if self._services.get(sid) == record:
            return
        if record is None:
            del self._services[sid]
        else:
            self._services[sid] = record
        self._dirty_parents.add(sid)
        self._dirty_group_services.add(sid)
        for rid in self._routes_by_backend.get(sid, ()):
            self._dirty_routes.add(rid)
            self._dirty_frontends.update(self._routes[rid].parent_services)

    def _set_slice(self, key: o.ObjectKey, record: o.SliceRecord | None) -> None:
        old = self._slices.get(key)
        if old == record:
            return
        if old is not None:
            del self._slices[key]
            _unindex(self._slices_by_service, _slice_service(old), key)
            self._dirty_group_services.add(_slice_service(old))
        if record is not None:
            self._slices[key] = record
            _index(self._slices_by_service, _slice_service(record), key)
            self._dirty_group_services.add(_slice_service(record))

    def _set_route(self, rid: RouteId, record: o.RouteRecord | None) -> None:
        old = self._routes.get(rid)
        if old == record:
            return
        for route in (old, record):
            if route is not None:
                # Every parent, old and new: the route may leave a parent or join one.
                self._dirty_parents.update(route.parent_services)
        if old is not None:
            del self._routes[rid]
            for sid in old.parent_services:
                _unindex(self._routes_by_parent, sid, rid)
            for sid in old.backend_services:
                _unindex(self._routes_by_backend, sid, rid)
        if record is not None:
            self._routes[rid] = record
            for sid in record.parent_services:
                _index(self._routes_by_parent, sid, rid)
            for sid in record.backend_services:
                _index(self._routes_by_backend, sid, rid)
        self._dirty_routes.add(rid)

    def _set_pod(self, key: o.ObjectKey, record: o.PodRecord | None) -> None:
        old = self._pods.get(key)
        if old == record:
            return
        if old is not None:
            del self._pods[key]
            _unindex(self._pods_by_namespace, key.namespace, key)
            _unindex(self._pods_by_uid, old.uid, key)
            self._dirty_uids.add(old.uid)
        if record is not None:
            self._pods[key] = record
            _index(self._pods_by_namespace, key.namespace, key)
            _index(self._pods_by_uid, record.uid, key)
            self._dirty_uids.add(record.uid)

    def _set_namespace_skip(self, namespace: str, skip: bool) -> None:
        if (namespace in self._skip_namespaces) == skip:
            return
        if skip:
            self._skip_namespaces.add(namespace)
        else:
            self._skip_namespaces.discard(namespace)
        for key in self._pods_by_namespace.get(namespace, ()):
            self._dirty_uids.add(self._pods[key].uid)

    def _set_zone(self, zone: str | None) -> None:
        if zone != self._zone:
            self._zone = zone
            self._zone_changed = True

    # --- commit ------------------------------------------------------------------------------

    def commit(self) -> StateDelta:
        """Recompute what the changes since the last commit reach; return what changed."""
        delta = _DeltaBuilder()
        with gc_paused():  # a cold sync builds the whole state here: see agent.gcpause
            self._commit_views()
            self._commit_frontends(delta)
            self._commit_groups(delta)
            self._commit_statuses(delta)
            self._commit_clients(delta)
        return delta.build()

    def _commit_views(self) -> None:
        for sid in self._dirty_parents:
            route_ids = self._routes_by_parent.get(sid, ())
            view = parent_view(self._services.get(sid), (self._routes[rid] for rid in route_ids))
            if view.choices:
                self._views[sid] = view
            else:
                self._views.pop(sid, None)
            # Accepted (B2, B3, B6) of every route on this parent may have moved.
            self._dirty_routes.update(route_ids)
        self._dirty_frontends.update(self._dirty_parents)
        self._dirty_parents = set()

    def _commit_frontends(self, delta: _DeltaBuilder) -> None:
        for sid in self._dirty_frontends:
            view = self._views.get(sid, EMPTY_VIEW)
            new = service_frontends(self._services.get(sid), view, self._services)
            old = self._own_frontends.pop(sid, {})
            if new:
                self._own_frontends[sid] = new
            for key in old.keys() - new.keys():
                _unindex(self._claims, key, sid)
            for key in new.keys() - old.keys():
                _index(self._claims, key, sid)
            for key in old.keys() | new.keys():
                self._publish_frontend(key, delta)
        self._dirty_frontends = set()

    def _publish_frontend(self, key: FrontendKey, delta: _DeltaBuilder) -> None:
        owners = self._claims.get(key)
        if owners and len(owners) > 1:
            self._contested.add(key)
        else:
            self._contested.discard(key)
        value = self._own_frontends[min(owners)][key] if owners else None
        old = self._frontends.get(key)
        if old == value:
            return
        if old is not None:
            for share in old.split:
                if share.group is not None:
                    self._unref_group(share.group, delta)
        if value is None:
            del self._frontends[key]
        else:
            self._frontends[key] = value
            for share in value.split:
                if share.group is not None:
                    self._ref_group(share.group, delta)
        delta.frontends.add(key)

    def _ref_group(self, group: GroupKey, delta: _DeltaBuilder) -> None:
        count = self._group_refs.get(group, 0)
        self._group_refs[group] = count + 1
        if count == 0:
            _index(self._groups_by_service, (group.namespace, group.service), group)
            delta.groups_touched.add(group)

    def _unref_group(self, group: GroupKey, delta: _DeltaBuilder) -> None:
        count = self._group_refs[group] - 1
        if count:
            self._group_refs[group] = count
            return
        del self._group_refs[group]
        _unindex(self._groups_by_service, (group.namespace, group.service), group)
        delta.groups_touched.add(group)

    def _commit_groups(self, delta: _DeltaBuilder) -> None:
        todo = set(delta.groups_touched)
        if self._zone_changed:
            todo.update(self._group_refs)
        else:
            for sid in self._dirty_group_services:
                todo.update(self._groups_by_service.get(sid, ()))
        for key in todo:
            value = None
            if key in self._group_refs:
                sid = (key.namespace, key.service)
                slices = [self._slices[k] for k in self._slices_by_service.get(sid, ())]
                value = backend_group(key, self._services.get(sid), slices, self.node_name, self._zone,
                                      self.passive_health)
            old = self._groups.get(key)
            if _publish(self._groups, key, value, delta.groups):
                self._endpoint_count += (len(value.endpoints) if value else 0) - (len(old.endpoints) if old else 0)
        self._dirty_group_services = set()
        self._zone_changed = False

    def _commit_statuses(self, delta: _DeltaBuilder) -> None:
        for rid in self._dirty_routes:
            route = self._routes.get(rid)
            value = route_status(route, self._services, self._views) if route is not None else None
            _publish(self._statuses, rid, value, delta.routes)
        self._dirty_routes = set()

    def _commit_clients(self, delta: _DeltaBuilder) -> None:
        for uid in self._dirty_uids:
            keys = self._pods_by_uid.get(uid)
            value = None
            if keys:
                pod = self._pods[min(keys)]  # two pods with one uid: a broken input; be stable
                skip = pod.skip_annotation or pod.namespace in self._skip_namespaces
                value = ClientPod(uid, pod.namespace, pod.name, skip)  # C1, C2
            _publish(self._clients, uid, value, delta.clients)
        self._dirty_uids = set()


class _DeltaBuilder:
    def __init__(self):
        self.frontends: set[FrontendKey] = set()
        self.groups: set[GroupKey] = set()
        self.groups_touched: set[GroupKey] = set()  #: gained their first or lost their last user
        self.clients: set[str] = set()
        self.routes: set[RouteId] = set()

    def build(self) -> StateDelta:
        return StateDelta(frozenset(self.frontends), frozenset(self.groups), frozenset(self.clients),
                          frozenset(self.routes))


def _publish(table: dict, key, value, changed: set) -> bool:
    """Set (or, for None, remove) `table[key]`; True, and `key` added to `changed`, if it changed."""
    if table.get(key) == value:
        return False
    if value is None:
        del table[key]
    else:
        table[key] = value
    changed.add(key)
    return True


# The indices map a key to a tuple of members, not a set: nearly every key has one member (a
# Service's slice, its groups, a frontend's claimant) and a one-item tuple is a fifth of the size
# of a set (7 MiB per 10k Services). Adding and removing are linear in the members, which stay
# few (pods per namespace on one node are the most). Readers never depend on the members' order.


def _index(index: dict, key, member) -> None:
    members = index.get(key, ())
    if member not in members:
        index[key] = members + (member,)


def _unindex(index: dict, key, member) -> None:
    members = index.get(key)
    if members is not None and member in members:
        rest = tuple(m for m in members if m != member)
        if rest:
            index[key] = rest
        else:
            del index[key]


def _slice_service(record: o.SliceRecord) -> o.ServiceId:
    # A slice without the service-name label belongs to no Service: index it under "" so that
    # its removal is as cheap as its arrival.
    return (record.namespace, record.service or "")


def _problem_key(key: o.ObjectKey) -> ProblemKey:
    return (key.kind, key.namespace, key.name)


def _unidentified_key(obj: object) -> ProblemKey:
    if not isinstance(obj, dict):
        return (f"? {type(obj).__name__}", "", repr(obj)[:80])
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return (f"{obj.get('apiVersion')} {obj.get('kind')}", str(meta.get("namespace") or ""), str(meta.get("name")))


# --- one-shot ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """A frozen snapshot: the state, every Route status, and the problem lines."""

    state: DesiredState
    statuses: Mapping[RouteId, RouteStatus]
    problems: tuple[str, ...]


def resolve(objects: Iterable[dict], node_name: str) -> Resolution:
    """Resolve a whole set of objects at once (tests, `meshlet explain`, the benchmark)."""
    resolver = Resolver(node_name)
    resolver.upsert_many(objects)
    resolver.commit()
    state = resolver.state
    return Resolution(
        DesiredState(MappingProxyType(dict(state.frontends)), MappingProxyType(dict(state.groups)),
                     MappingProxyType(dict(state.clients))),
        MappingProxyType(dict(resolver.statuses)),
        tuple(resolver.problems),
    )


def render_statuses(statuses: Mapping[RouteId, RouteStatus]) -> str:
    """A canonical text dump of Route statuses, sorted, one line per condition (golden tests)."""
    lines = []
    for rid in sorted(statuses):
        status = statuses[rid]
        lines.append(f"route {rid} generation={status.generation}")
        for parent in status.parents:
            ref = ", ".join(f"{k}={v!r}" for k, v in parent.parent_ref)
            lines.append(f"  parent {{{ref}}}")
            for cond in parent.conditions:
                lines.append(f"    {cond.type}={cond.status} {cond.reason}: {cond.message}")
    return "\n".join(lines) + ("\n" if lines else "")
