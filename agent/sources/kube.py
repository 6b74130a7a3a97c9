"""The Kubernetes source: list, then watch, every kind the agent needs, into the Sink.

Role: one thread per kind keeps the sink equal to what the API server holds (Services,
EndpointSlices, this node's Pods, Namespaces, this Node, and every Gateway API route kind the
cluster serves), and one more thread re-reads API discovery so that a route CRD installed,
removed or upgraded later is followed without a restart.
May touch: the API server through the given ApiClient (GET only), and the sink.

The watch protocol, per kind (the reflector pattern):
1. list, paged with limit/continue, each page handed on as it arrives (`sink.list_begin(kind)`,
   `sink.list_page(kind, items)` per page, `sink.list_end(kind)`, which deletes what the list no
   longer holds); the first time, `sink.synced`;
2. watch from the list's resourceVersion with bookmarks; each event is upserted or deleted and
   advances the resourceVersion, a BOOKMARK only advances it;
3. the server ending the stream (its timeoutSeconds) -> watch again from the last resourceVersion;
   a dropped connection or an error -> the same, after a capped, jittered backoff; no relist;
4. 410 Gone (HTTP 410, or an ERROR event carrying a Status with code 410) -> relist (step 1),
   at once the first time, after the backoff when it repeats without a healthy watch between.

Invariants:
- objects reach the sink as the API server's JSON dicts, with apiVersion and kind filled in
  (list items may lack them); nothing is converted or dropped, and nothing is kept: a page is
  handed on and forgotten, so a list of any size never sits here whole;
- a kind's `synced` is called exactly once, after its first complete list; a route kind the
  cluster does not serve counts as listed and empty (a missing CRD is not an error), so every
  name in `KubeSource.kinds` is eventually synced, whatever discovery finds;
- a route kind that discovery stops listing is emptied only when two rounds in a row agree, so
  one bad discovery answer never takes every Route out of the datapath;
- once a kind's watcher is stopped it never calls the sink again (a lock guards each call), so a
  kind whose CRD went away can be emptied without a late event bringing objects back;
- the sink is called from several threads: it must be thread-safe (the runtime's Store is).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import urllib3

from agent.kinds import CLUSTER_KINDS, ROUTE_KINDS
from agent.logs import get_logger
from agent.sources.kubeapi import (
    ApiError,
    ApiHttp,
    Backoff,
    ResourceKind,
    discover_route_kinds,
    interrupt,
    route_kind,
    stream_lines,
)

if TYPE_CHECKING:
    from agent.sources import Sink

log = get_logger("kube")

#: The kinds every cluster serves, in the order their watchers start.
CORE_KINDS = tuple(CLUSTER_KINDS)

#: A quiet watch that the server ended after this long was still a healthy one (no backoff before
#: the next); one that ended sooner without an event hints at a broken server, so we back off.
_HEALTHY_WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class KubeSettings:
    """Tunables of the Kubernetes source; the defaults suit a real cluster, tests shrink them."""

    page_size: int = 500
    """Items per list page (limit/continue): bounds the memory of one answer on big clusters."""

    watch_timeout: float = 300.0
    """timeoutSeconds asked of the server for one watch; each watch draws from [1x, 2x) of it so
    that many agents do not all reconnect in the same second."""

    watch_read_margin: float = 30.0
    """Seconds the client waits past the watch's timeoutSeconds before calling it dead."""

    request_timeout: float = 30.0
    """Connect timeout, and read timeout of lists and discovery."""

    backoff_initial: float = 0.8
    """First wait after a failed list or watch; doubles per consecutive failure."""

    backoff_max: float = 30.0
    """Cap on the wait between retries."""

    discovery_interval: float = 60.0
    """Seconds between two reads of the Gateway API discovery documents."""


def core_kinds(node_name: str) -> dict[str, ResourceKind]:
    """The built-in kinds, with the field selectors that keep this node's share small."""
    selectors = {"Node": f"metadata.name={node_name}", "Pod": f"spec.nodeName={node_name}"}
    return {kind: ResourceKind(kind, k.group, k.version, k.plural, selectors.get(kind, ""))
            for kind, k in CLUSTER_KINDS.items()}


class _Stopped(Exception):
    """The watcher was stopped while it worked."""


class KindWatcher:
    """Keeps one kind in the sink: list, watch, resume, relist (see the module docstring)."""

    def __init__(self, http: ApiHttp, resource: ResourceKind, sink: "Sink", settings: KubeSettings,
                 on_first_list, on_api_error):
        self.resource = resource
        self._on_api_error = on_api_error
        self._http = http
        self._sink = sink
        self._settings = settings
        self._on_first_list = on_first_list
        self._lock = threading.Lock()  # guards _stopped and every sink call
        self._stopped = False
        self._wake = threading.Event()
        self._response = None  # the open watch, for stop() to interrupt
        self._listed = False
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.resource_version: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kube-{resource.kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop; after this returns the sink is never called again by this watcher."""
        with self._lock:
            self._stopped = True
            response = self._response
        self._wake.set()
        if response is not None:
            interrupt(response)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(join_timeout)

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        kind = self.resource.kind
        while not self._stopped:
            try:
                if self.resource_version is None:
                    self._list()
                if self._watch():
                    continue  # the server ended a healthy stream (its timeoutSeconds): go on at once
                log.debug("kube.watch_ended_early", kind=kind, resourceVersion=self.resource_version or "")
            except _Stopped:
                break
            except ApiError as err:
                if self._stopped:
                    break
                self._on_api_error(kind, api_error_reason(err.status))
                if err.status == 410:
                    self._relist_next()
                    if self._backoff.failures == 0:
                        # The first 410 after a healthy watch relists at once; another one in a row
                        # (a server that keeps expiring us) waits like any other failure.
                        self._backoff.next_delay()
                        continue
                else:
                    log.warning("kube.error", kind=kind, status=err.status, error=err.message,
                                resourceVersion=self.resource_version or "", hint=_hint(err))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
                if self._stopped:
                    break
                self._on_api_error(kind, "connection")
                log.warning("kube.watch_dropped", kind=kind, error=str(err) or type(err).__name__,
                            resourceVersion=self.resource_version or "")
            delay = self._backoff.next_delay()
            log.debug("kube.retry", kind=kind, seconds=round(delay, 3), failures=self._backoff.failures)
            self._wake.wait(delay)

    def _relist_next(self) -> None:
        log.info("kube.relist", kind=self.resource.kind, reason="resourceVersion expired (410 Gone)",
                 resourceVersion=self.resource_version or "")
        self.resource_version = None

    def _list(self) -> None:
        kind = self.resource.kind
        # A list that fails midway leaves its pages in the sink (each object is one the server
        # held) and is begun again; only a complete list may delete what it did not contain.
        self._call_sink(self._sink.list_begin, kind)
        listed = 0
        cont = None
        while True:
            page = self._http.json("GET", self.resource.collection_path(), {
                "limit": self._settings.page_size,
                "continue": cont,
                "fieldSelector": self.resource.field_selector,
            })
            items = [self._typed(item) for item in page.get("items") or []]
            listed += len(items)
            self._call_sink(self._sink.list_page, kind, items)
            meta = page.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                break
        resource_version = str(meta.get("resourceVersion") or "")
        if not resource_version:
            raise ApiError(0, f"the {kind} list carries no resourceVersion")
        self._call_sink(self._sink.list_end, kind)
        self.resource_version = resource_version
        log.info("kube.listed", kind=kind, apiVersion=self.resource.api_version,
                 objects=listed, resourceVersion=resource_version)
        if not self._listed:
            self._listed = True
            self._call_sink(self._on_first_list, self.resource.kind)

    def _watch(self) -> bool:
        """Watch until the stream ends; True when it was healthy (it delivered an event, or it
        stayed open a while): only then may the next watch start without a backoff."""
        timeout = max(1, int(self._settings.watch_timeout * (1 + random.random())))
        started = time.monotonic()
        resp = self._http.open("GET", self.resource.collection_path(), {
            "watch": "true",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout,
            "fieldSelector": self.resource.field_selector,
        }, read_timeout=timeout + self._settings.watch_read_margin)
        with self._lock:
            if self._stopped:
                interrupt(resp)
                raise _Stopped()
            self._response = resp
        events = 0
        try:
            for line in stream_lines(resp):
                self._handle(json.loads(line))
                events += 1
                # the connection is healthy: the next failure starts the backoff from the bottom
                self._backoff.reset()
        finally:
            with self._lock:
                self._response = None
            # A watch connection is never reused: after a drop or a stop it is broken anyway.
            resp.close()
        if self._stopped:
            raise _Stopped()
        return events > 0 or time.monotonic() - started >= _HEALTHY_WATCH_SECONDS

    def _handle(self, event: dict) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event without an object: {str(event)[:200]}")
        if kind == "ERROR":
            # A Status object; code 410 (our resourceVersion is too old) makes _run relist.
            code = obj.get("code")
            raise ApiError(code if isinstance(code, int) else 0, str(obj.get("message", "")),
                           str(obj.get("reason", "")))
        meta = obj.get("metadata")
        resource_version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind in ("ADDED", "MODIFIED"):
            self._call_sink(self._sink.upsert, self._typed(obj))
        elif kind == "DELETED":
            self._call_sink(self._sink.delete, self._typed(obj))
        elif kind != "BOOKMARK":
            log.warning("kube.unknown_event", kind=self.resource.kind, type=str(kind))
            return
        if resource_version:
            self.resource_version = str(resource_version)

    def _typed(self, obj: dict) -> dict:
        # Items of a list come without apiVersion/kind; consumers key objects by both.
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return obj

    def _call_sink(self, fn, *args) -> None:
        with self._lock:
            if self._stopped:
                raise _Stopped()
            fn(*args)


#: The reasons an API error is counted under (a closed set: the `reason` label of
#: meshlet_api_errors). "connection": no HTTP answer, or a stream that broke.
API_ERROR_REASONS = ("expired", "forbidden", "server", "client", "connection")


def api_error_reason(status: int) -> str:
    """The API_ERROR_REASONS entry for an HTTP status (0: no answer)."""
    if status == 410:
        return "expired"
    if status in (401, 403):
        return "forbidden"
    if status >= 500:
        return "server"
    if status == 0:
        return "connection"
    return "client"


def _hint(err: ApiError) -> str:
    if err.status in (401, 403):
        return "check the agent's ServiceAccount and ClusterRole (list/watch on this kind)"
    if err.status == 0:
        return "the API server is unreachable; the datapath keeps its last state meanwhile"
    return ""


class KubeSource:
    """Every kind the agent needs from the Kubernetes API, pushed into `sink`.

    `kinds` names every source this one reports to the sink (each is synced once); `served_kinds`
    maps the kinds being watched now to their API version.
    """

    def __init__(self, api_client, node_name: str, sink: "Sink", on_api_error=None, **settings):
        """on_api_error(kind, reason): called for each failed API request or broken watch, with
        reason one of API_ERROR_REASONS and kind "discovery" for the route-kind discovery."""
        self.settings = KubeSettings(**settings)
        self._on_api_error = on_api_error or (lambda kind, reason: None)
        self.node_name = node_name
        self._sink = sink
        self._http = ApiHttp(api_client, self.settings.request_timeout)
        self._core = core_kinds(node_name)
        self.kinds: list[str] = list(CORE_KINDS) + list(ROUTE_KINDS)
        self._lock = threading.Lock()
        self._watchers: dict[str, KindWatcher] = {}
        self._synced: set[str] = set()
        self._stopping = threading.Event()
        self._discovered = False
        self._unserved_rounds: dict[str, int] = {}  # watched route kind -> discovery rounds without it
        self._discovery = threading.Thread(target=self._discovery_loop, name="kube-discovery", daemon=True)

    @property
    def served_kinds(self) -> dict[str, str]:
        """Kind -> API version of every kind being watched now (routes as discovered)."""
        with self._lock:
            return {kind: w.resource.api_version for kind, w in self._watchers.items()}

    def start(self) -> None:
        for kind in CORE_KINDS:
            self._start_watcher(self._core[kind])
        self._discovery.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            watchers = list(self._watchers.values())
            self._watchers.clear()
        for watcher in watchers:
            watcher.stop()
        if self._discovery.is_alive() and threading.current_thread() is not self._discovery:
            self._discovery.join(5.0)

    # --- internals --------------------------------------------------------------------------

    def _start_watcher(self, resource: ResourceKind) -> None:
        watcher = KindWatcher(self._http, resource, self._sink, self.settings, self._first_list_done,
                              self._on_api_error)
        with self._lock:
            if self._stopping.is_set():
                return
            self._watchers[resource.kind] = watcher
        watcher.start()

    def _first_list_done(self, kind: str) -> None:
        # Called under the watcher's sink lock: a watcher restarted on another version of the same
        # kind must not report the kind synced a second time.
        with self._lock:
            first = kind not in self._synced
            self._synced.add(kind)
        if first:
            self._sink.synced(kind)

    def _discovery_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self._stopping.is_set():
            try:
                served = discover_route_kinds(self._http)
            except ApiError as err:
                self._on_api_error("discovery", api_error_reason(err.status))
                log.warning("kube.discovery_failed", status=err.status, error=err.message, hint=_hint(err))
                # until discovery first succeeds we do not know which route kinds exist: retry
                # soon; afterwards the kinds in hand stay watched and the next round will tell.
                wait = backoff.next_delay() if not self._discovered else self.settings.discovery_interval
                self._stopping.wait(wait)
                continue
            backoff.reset()
            self._apply_discovery(served)
            self._discovered = True
            self._stopping.wait(self.settings.discovery_interval)

    def _apply_discovery(self, served: dict[str, str]) -> None:
        for kind in ROUTE_KINDS:
            if self._stopping.is_set():
                return
            with self._lock:
                current = self._watchers.get(kind)
            version = served.get(kind)
            if current is not None and current.resource.version == version:
                self._unserved_rounds.pop(kind, None)
                continue
            if current is not None and version is None:
                # Dropping a kind empties it in the datapath: make sure discovery did not just
                # hiccup (the next round must agree) before taking its routes away.
                rounds = self._unserved_rounds[kind] = self._unserved_rounds.get(kind, 0) + 1
                if rounds < 2:
                    continue
            self._unserved_rounds.pop(kind, None)
            if current is not None:
                # Stopped before anything else is decided: no late event may follow.
                current.stop()
                with self._lock:
                    self._watchers.pop(kind, None)
            if version is not None:
                log.info("kube.route_kind_served", kind=kind, version=version,
                         previous=current.resource.version if current else "")
                self._start_watcher(route_kind(kind, version))
                continue
            if current is not None:
                log.info("kube.route_kind_gone", kind=kind, version=current.resource.version)
            elif not self._discovered:
                log.info("kube.route_kind_not_served", kind=kind,
                         note="its CRD is not installed; checked again every "
                              f"{self.settings.discovery_interval:g}s")
            if current is not None or not self._discovered:
                # Not served means no objects of this kind exist: say so, and count it as listed.
                self._sink.replace(kind, [])
                self._first_list_done(kind)
