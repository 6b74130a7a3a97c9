"""The Route status writer: our `status.parents[]` entries on the Route objects (SEMANTICS B14).

Role: `merge_parents` (pure) decides the new `status.parents` list from the one on the object and
the RouteStatus the resolver computed; `StatusWriter` reads each Route, merges, and writes
through the status subresource. Calling it only while this agent holds the leader Lease, off the
sync loop's thread, and retrying a failed `write` is the runtime's business (cli.StatusPublisher).
May touch: Route objects of the Gateway API group, through the given ApiClient, and only their
status subresource.

Invariants (B14):
- an entry whose controllerName is not ours is never changed, moved or removed;
- exactly one entry of ours per parentRef the resolver reports (the parentRef copied verbatim);
  ours for parentRefs that are gone are removed;
- a condition's lastTransitionTime is kept while its status stays the same;
- every write carries the resourceVersion it was computed from (409 Conflict -> re-read, merge
  again); nothing is written when the merge changes nothing;
- a status computed for another generation of the Route than the one read is not written: the
  resolver sends the one for the new generation once the watch brings it.
"""

from __future__ import annotations

import time
from typing import Mapping

from agent.errors import TransientError
from agent.kinds import GATEWAY_GROUP
from agent.logs import get_logger
from agent.model import CONTROLLER_NAME, RouteId, RouteStatus
from agent.sources.kubeapi import (
    ApiError,
    ApiHttp,
    discover_route_kinds,
    format_time,
    route_kind,
)

log = get_logger("status")

#: What an omitted parentRef group and kind mean (the Gateway API schema defaults).
_DEFAULT_PARENT_GROUP = GATEWAY_GROUP
_DEFAULT_PARENT_KIND = "Gateway"


def parent_ref_identity(ref: dict, route_namespace: str) -> tuple:
    """Which parent a parentRef names, whatever optional fields it spells out."""
    return (
        ref.get("group", _DEFAULT_PARENT_GROUP),
        ref.get("kind", _DEFAULT_PARENT_KIND),
        ref.get("namespace") or route_namespace,
        ref.get("name"),
        ref.get("sectionName"),
        ref.get("port"),
    )


def merge_parents(existing: list, status: RouteStatus, now: str) -> list:
    """The new status.parents: `existing` with our entries replaced by `status`'s (B14).

    Other controllers' entries stay where they are, untouched; ours are updated in place, ours for
    parentRefs no longer reported are dropped, new ones are appended in the resolver's order.
    `now` is the lastTransitionTime of a condition whose status changed (or that is new).
    """
    namespace = status.route.namespace
    wanted = {}
    for entry in status.as_json()["parents"]:
        wanted.setdefault(parent_ref_identity(entry["parentRef"], namespace), entry)
    placed: set[tuple] = set()
    merged = []
    for entry in existing:
        if not isinstance(entry, dict) or entry.get("controllerName") != CONTROLLER_NAME:
            merged.append(entry)
            continue
        ref = entry.get("parentRef")
        identity = parent_ref_identity(ref, namespace) if isinstance(ref, dict) else None
        if identity in wanted and identity not in placed:
            placed.add(identity)
            merged.append(_with_transition_times(wanted[identity], entry, now))
        # else: ours, for a parentRef that is gone (or a duplicate): removed
    for identity, entry in wanted.items():
        if identity not in placed:
            merged.append(_with_transition_times(entry, None, now))
    return merged


def _with_transition_times(entry: dict, previous: dict | None, now: str) -> dict:
    """`entry` with each condition's lastTransitionTime: the previous one while the status holds."""
    before = {}
    if previous is not None:
        for cond in previous.get("conditions") or []:
            if isinstance(cond, dict):
                before.setdefault(cond.get("type"), cond)
    conditions = []
    for cond in entry["conditions"]:
        old = before.get(cond["type"])
        kept = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        conditions.append({**cond, "lastTransitionTime": kept or now})
    return {**entry, "conditions": conditions}


#: Said with a 403: the API server's message names the verb and resource; this says where to grant it.
FORBIDDEN_HINT = ("; hint: the agent's ServiceAccount lacks that grant: the ClusterRole meshlet in "
                  "daemonset/rbac.yaml grants update and patch on each route kind's /status")


class StatusWriter:
    """Writes RouteStatus values onto the Route objects (see the module docstring).

    `write` is synchronous: it tries every Route, then raises TransientError when any failed
    (the caller retries with backoff; Routes already as wanted are not read again). Routes written
    before and absent from a later `write` get our entries removed. Call `forget` when a new term
    as leader starts: another agent may have written meanwhile.
    """

    def __init__(self, api_client, max_attempts: int = 5, request_timeout: float = 10.0):
        self._http = ApiHttp(api_client, request_timeout)
        self._max_attempts = max_attempts
        self._versions: dict[str, str] | None = None  # route kind -> served version (discovery)
        self._done: dict[RouteId, RouteStatus] = {}  # what we know stands on the API objects

    def forget(self) -> None:
        """Trust nothing remembered: the next write re-reads every Route (a new term as leader,
        during which another writer may have changed things)."""
        self._done.clear()
        self._versions = None

    def write(self, statuses: Mapping[RouteId, RouteStatus]) -> None:
        todo = [s for rid, s in sorted(statuses.items()) if self._done.get(rid) != s]
        # Routes we wrote for before and the resolver no longer reports: remove our entries.
        todo += [RouteStatus(rid, 0, ()) for rid in sorted(self._done) if rid not in statuses]
        counts = {"written": 0, "unchanged": 0, "gone": 0, "stale": 0, "failed": 0}
        first_failure = ""
        for status in todo:
            rid = status.route
            try:
                outcome = self._write_one(status)
            except ApiError as err:
                outcome = "failed"
                first_failure = first_failure or f"{rid}: {err}" + (FORBIDDEN_HINT if err.status == 403 else "")
                log.warning("status.route_failed", route=str(rid), status=err.status, error=err.message)
            counts[outcome] += 1
            if outcome in ("written", "unchanged") and rid in statuses:
                self._done[rid] = status
            elif outcome != "failed":
                # gone, stale, or our entries removed: nothing to remember; a stale one is
                # written when the resolver sends the status for the Route's new generation
                self._done.pop(rid, None)
        if todo:
            log.info("status.pass", routes=len(todo), **counts)
        if counts["failed"]:
            raise TransientError(f"{counts['failed']} of {len(todo)} Route status writes failed "
                                 f"(first: {first_failure}); they are retried")

    def _version_of(self, kind: str, refresh: bool = False) -> str | None:
        if self._versions is None or refresh:
            self._versions = discover_route_kinds(self._http)
        return self._versions.get(kind)

    def _write_one(self, status: RouteStatus) -> str:
        rid = status.route
        version = self._version_of(rid.kind)
        if version is None:
            return "gone"  # the kind is not served: no such Route can exist
        path = route_kind(rid.kind, version).object_path(rid.namespace, rid.name)
        for _ in range(self._max_attempts):
            try:
                obj = self._http.json("GET", path)
            except ApiError as err:
                if err.status != 404:
                    raise
                # The Route is gone, or its kind moved to another version: ask discovery once.
                fresh = self._version_of(rid.kind, refresh=True)
                if fresh is None or fresh == version:
                    return "gone"
                version = fresh
                path = route_kind(rid.kind, version).object_path(rid.namespace, rid.name)
                continue
            generation = (obj.get("metadata") or {}).get("generation")
            if status.parents and status.generation and generation != status.generation:
                log.debug("status.stale", route=str(rid), ours=status.generation, object=generation)
                return "stale"
            current = obj.get("status") if isinstance(obj.get("status"), dict) else {}
            existing = current.get("parents") if isinstance(current.get("parents"), list) else []
            parents = merge_parents(existing, status, format_time(time.time()))
            if parents == existing:
                return "unchanged"
            obj["status"] = {**current, "parents": parents}
            try:
                # PUT carries metadata.resourceVersion as read: the server refuses it (409) when
                # the Route changed since, and we merge again on what is there now.
                self._http.json("PUT", path + "/status", body=obj)
            except ApiError as err:
                if err.status == 409:
                    log.debug("status.conflict", route=str(rid))
                    continue
                if err.status == 404:
                    return "gone"
                raise
            return "written"
        raise ApiError(409, f"the Route kept changing under us: {self._max_attempts} conflicts in a row",
                       "Conflict")
