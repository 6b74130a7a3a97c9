"""A STAND-IN for a Kubernetes API server, for tests: it is not Kubernetes, it only speaks its wire.

Role: an in-process HTTP/1.1 server that answers the requests meshlet's Kubernetes layer sends
the way a real API server does, so that the list/watch source, the Lease elector and the Route
status writer are tested over real sockets, through the official client's connection pool:
- resourceVersions: one cluster-wide counter, bumped by every write (as etcd's revision);
- lists paged with limit/continue over one snapshot, items without apiVersion/kind (as the real
  server writes them for built-in kinds), `metadata.resourceVersion` of the snapshot;
  fieldSelector `a.b=v`, `a.b==v`, `a.b!=v` on any dotted path (spec.nodeName, metadata.name ...);
- watches as chunked streams of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`
  lines, resumed from any resourceVersion still in the history, a field selector turning an object
  that moves in or out of it into ADDED / DELETED, ended cleanly after timeoutSeconds;
- 410 Gone: a watch (or a continue token, or an Exact list) older than the compacted history gets
  an ERROR event carrying a Status with code 410 (what the real watch cache sends), or an HTTP 410
  when `gone_as_http` is set; `expire_watches()` sends that ERROR event to open watches;
- discovery (/api, /apis, /apis/<group>, /apis/<group>/<version>) for the core, discovery.k8s.io,
  coordination.k8s.io and Gateway API groups; a route CRD is served only once a test installs it;
- create (POST), replace (PUT, with a resourceVersion precondition: 409 Conflict), delete, and the
  status subresource (PUT, and PATCH with application/merge-patch+json), also with 409 on a stale
  resourceVersion; `metadata.generation` bumped when the spec changes, never by a status write;
- RBAC on demand (`rbac=`, tests/standin_rbac.py): every request must carry the bearer `token`
  and is authorized as the policy's ServiceAccount (401 / 403 with the real server's Status
  otherwise); HTTPS on demand (`tls=(certfile, keyfile)`), for clients that insist on it (the
  in-cluster config);
- faults on demand: `drop_watches()` cuts open watch connections without ending the chunked stream
  (the client sees a broken connection), `add_hook()` answers or perturbs chosen requests.
Tests drive it directly (create/update/delete/compact/send_bookmarks) and read `requests`, the log
of every request it received.

Invariants: every mutation holds `_lock`, appends to `_history` and fans out to the open watches
in resourceVersion order; nothing here is imported by the agent.
"""

from __future__ import annotations

import copy
import json
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from standin_rbac import request_attributes

GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class Resource:
    kind: str
    group: str  #: "" for core
    plural: str
    namespaced: bool
    has_status: bool = True  #: whether a /status subresource exists (and PUT keeps status)


#: Every kind the stand-in knows. Route kinds are served only when installed (`serve_crd`).
RESOURCES = {r.kind: r for r in (
    Resource("Namespace", "", "namespaces", False),
    Resource("Node", "", "nodes", False),
    Resource("Service", "", "services", True),
    Resource("Pod", "", "pods", True),
    Resource("EndpointSlice", "discovery.k8s.io", "endpointslices", True, has_status=False),
    Resource("Lease", "coordination.k8s.io", "leases", True, has_status=False),
    Resource("HTTPRoute", GATEWAY_GROUP, "httproutes", True),
    Resource("GRPCRoute", GATEWAY_GROUP, "grpcroutes", True),
    Resource("TLSRoute", GATEWAY_GROUP, "tlsroutes", True),
    Resource("TCPRoute", GATEWAY_GROUP, "tcproutes", True),
    Resource("UDPRoute", GATEWAY_GROUP, "udproutes", True),
)}

#: Built-in groups and the versions they serve.
BUILTIN_VERSIONS = {"": ("v1",), "discovery.k8s.io": ("v1",), "coordination.k8s.io": ("v1",)}

ALL_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def status_object(code: int, reason: str, message: str) -> dict:
    """A meta/v1 Status, the body of every error answer and of a watch ERROR event."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class ApiAnswer(Exception):
    """Raised inside a handler to answer with an error Status."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.body = status_object(code, reason, message)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)  #: names in lower case
    at: float = field(default_factory=time.monotonic)

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Event:
    rv: int
    resource: Resource
    type: str  #: ADDED | MODIFIED | DELETED
    old: dict | None
    new: dict


class _Watch:
    """One open watch stream: what it selects, and the queue its handler thread drains."""

    def __init__(self, resource: Resource, version: str, namespace: str | None, selector, bookmarks: bool):
        self.resource = resource
        self.version = version
        self.namespace = namespace
        self.selector = selector
        self.bookmarks = bookmarks
        self.queue: queue.Queue = queue.Queue()

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.selector(obj)


def _get_path(obj: dict, dotted: str):
    value: object = obj
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def parse_field_selector(text: str) -> Callable[[dict], bool]:
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            path, value = term.split("!=", 1)
            terms.append((path, value, False))
        else:
            path, value = term.replace("==", "=").split("=", 1)
            terms.append((path, value, True))

    def selector(obj: dict) -> bool:
        for path, value, equal in terms:
            actual = _get_path(obj, path)
            actual = "" if actual is None else str(actual)
            if (actual == value) != equal:
                return False
        return True

    return selector


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StandInApiServer:
    """The stand-in (see the module docstring). Use as a context manager, or start()/stop()."""

    def __init__(self, page_delay: float = 0.0, rbac=None, token: str = "standin-token",
                 tls: tuple[str, str] | None = None):
        self.rbac = rbac  #: a standin_rbac.Policy, or None: every request allowed (no authentication)
        self.token = token  #: the bearer token that authenticates as `rbac.user`
        self._tls = tls
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> stored object
        self._rv = 100  # a real cluster never starts at 1; nothing may assume small numbers
        self._history: list[_Event] = []
        self._floor = self._rv  # a watch from rv >= floor can be served from the history
        self._watches: list[_Watch] = []
        self._snapshots: dict[str, tuple[int, list[dict]]] = {}
        self._crds: dict[str, tuple[str, ...]] = {}  # route kind -> served versions
        self._hooks: list[Callable] = []
        self._sockets: set[socket.socket] = set()
        self.requests: list[RecordedRequest] = []
        self.gone_as_http = False
        self.page_delay = page_delay
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            standin = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="standin-apiserver", daemon=True)
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        self.url = f"{'https' if self._tls else 'http'}://{host}:{port}"
        return self.url

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        with self._lock:
            for watch in self._watches:
                watch.queue.put(("drop",))
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(5)
        self._httpd = None

    def __enter__(self) -> "StandInApiServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what tests drive ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def serve_crd(self, kind: str, versions: tuple[str, ...] = ("v1",)) -> None:
        """Install (or change the served versions of) a Gateway API route CRD."""
        with self._lock:
            self._crds[kind] = tuple(versions)

    def remove_crd(self, kind: str) -> None:
        """Uninstall a route CRD: its objects go away with it (DELETED events, as in a cluster)."""
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind]:
                self.delete(*key)
            self._crds.pop(kind, None)

    def load(self, objs: list[dict]) -> int:
        """Store many objects at once, as if created long ago and the history compacted since (a
        benchmark's cluster): no events, no copies (the caller hands them over). The new version."""
        with self._lock:
            for obj in objs:
                resource, key = self._identify(obj)
                meta = obj.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now_text())
                meta["generation"] = 1
                meta["resourceVersion"] = str(self._bump())
                obj["apiVersion"] = obj.get("apiVersion") or self._default_api_version(resource)
                self._objects[key] = obj
            self._floor = self._rv
            return self._rv

    def create(self, obj: dict) -> dict:
        with self._lock:
            resource, key = self._identify(obj)
            if key in self._objects:
                raise ApiAnswer(409, "AlreadyExists", f'{resource.plural} "{key[2]}" already exists')
            stored = copy.deepcopy(obj)
            meta = stored.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now_text())
            meta["generation"] = 1
            meta["resourceVersion"] = str(self._bump())
            stored["apiVersion"] = obj.get("apiVersion") or self._default_api_version(resource)
            self._objects[key] = stored
            self._record("ADDED", resource, None, stored)
            return copy.deepcopy(stored)

    def update(self, obj: dict, check_version: bool = False) -> dict:
        """Replace an object (status kept when the kind has a status subresource)."""
        with self._lock:
            resource, key = self._identify(obj)
            current = self._require(key)
            self._precondition(current, obj, check_version)
            stored = copy.deepcopy(obj)
            meta = stored.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp"):
                meta[kept] = current["metadata"].get(kept)
            if resource.has_status:
                stored.pop("status", None)
                if "status" in current:
                    stored["status"] = copy.deepcopy(current["status"])
            generation = current["metadata"].get("generation", 1)
            meta["generation"] = generation + (1 if stored.get("spec") != current.get("spec") else 0)
            return self._replace(resource, key, current, stored)

    def apply(self, obj: dict) -> dict:
        """Create or update, whichever applies (a test's shorthand)."""
        with self._lock:
            _, key = self._identify(obj)
            return self.update(obj) if key in self._objects else self.create(obj)

    def update_status(self, kind: str, namespace: str, name: str, status: dict,
                      resource_version: str | None = None) -> dict:
        with self._lock:
            resource = RESOURCES[kind]
            key = (kind, namespace if resource.namespaced else "", name)
            current = self._require(key)
            if resource_version is not None and resource_version != current["metadata"]["resourceVersion"]:
                raise self._conflict(resource, name)
            stored = copy.deepcopy(current)
            stored["status"] = copy.deepcopy(status)
            return self._replace(resource, key, current, stored)

    def delete(self, kind: str, namespace: str, name: str) -> dict:
        with self._lock:
            resource = RESOURCES[kind]
            key = (kind, namespace if resource.namespaced else "", name)
            current = self._require(key)
            del self._objects[key]
            final = copy.deepcopy(current)
            final["metadata"]["resourceVersion"] = str(self._bump())
            self._record("DELETED", resource, current, final)
            return copy.deepcopy(final)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            resource = RESOURCES[kind]
            obj = self._objects.get((kind, namespace if resource.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def touch_other(self) -> int:
        """Advance the cluster's resourceVersion with a write no test watches (a Lease elsewhere)."""
        with self._lock:
            name = f"tick-{self._rv}"
            self.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                         "metadata": {"namespace": "standin-ticks", "name": name}, "spec": {}})
            return self._rv

    def compact(self) -> int:
        """Forget the event history up to now: a watch or continue from an older version gets 410."""
        with self._lock:
            self._floor = self._rv
            self._history.clear()
            return self._floor

    def send_bookmarks(self, kind: str | None = None) -> int:
        """A BOOKMARK at the current resourceVersion to every open watch that asked for them."""
        with self._lock:
            for watch in self._watches:
                if watch.bookmarks and (kind is None or watch.resource.kind == kind):
                    watch.queue.put(("event", self._bookmark(watch)))
            return self._rv

    def drop_watches(self, kind: str | None = None) -> int:
        """Cut open watch connections mid-stream (no end of the chunked body): a network failure."""
        return self._to_watches(kind, ("drop",))

    def end_watches(self, kind: str | None = None) -> int:
        """End open watch streams cleanly, as the server does when timeoutSeconds runs out."""
        return self._to_watches(kind, ("end",))

    def expire_watches(self, kind: str | None = None) -> int:
        """Send an ERROR event with a 410 Status to open watches, then end them (too old to go on)."""
        body = status_object(410, "Expired", "too old resource version")
        return self._to_watches(kind, ("event", {"type": "ERROR", "object": body}), ("end",))

    def open_watches(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watches if kind is None or w.resource.kind == kind)

    def wait_for_watches(self, kind: str, count: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.open_watches(kind) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} open {kind} watch(es) within {timeout}s "
                                     f"(requests: {self.request_lines()[-10:]})")
            time.sleep(0.01)

    def add_hook(self, hook: Callable[[str, str, dict, object], tuple[int, dict] | None]) -> None:
        """hook(method, path, query, body) runs before each request; an answer it returns is sent
        instead of the normal one. Hooks may call the control methods (the lock is re-entrant)."""
        with self._lock:
            self._hooks.append(hook)

    def remove_hook(self, hook) -> None:
        with self._lock:
            self._hooks.remove(hook)

    def requests_for(self, kind: str, watch: bool | None = None) -> list[RecordedRequest]:
        plural = RESOURCES[kind].plural
        with self._lock:
            return [r for r in self.requests
                    if r.path.rstrip("/").split("/")[-1] == plural and (watch is None or r.is_watch == watch)]

    def requests_for_path(self, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def request_lines(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path} {r.query}" for r in self.requests]

    # --- internals ----------------------------------------------------------------------------

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _identify(self, obj: dict) -> tuple[Resource, tuple[str, str, str]]:
        resource = RESOURCES[obj["kind"]]
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "") if resource.namespaced else ""
        if resource.namespaced and not namespace:
            raise ApiAnswer(400, "BadRequest", f"{resource.kind} needs a namespace")
        return resource, (resource.kind, namespace, meta["name"])

    def _default_api_version(self, resource: Resource) -> str:
        if not resource.group:
            return "v1"
        versions = self._crds.get(resource.kind) or BUILTIN_VERSIONS.get(resource.group) or ("v1",)
        return f"{resource.group}/{versions[0]}"

    def _require(self, key) -> dict:
        current = self._objects.get(key)
        if current is None:
            raise ApiAnswer(404, "NotFound", f'{RESOURCES[key[0]].plural} "{key[2]}" not found')
        return current

    def _conflict(self, resource: Resource, name: str) -> ApiAnswer:
        return ApiAnswer(409, "Conflict",
                         f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been '
                         "modified; please apply your changes to the latest version and try again")

    def _precondition(self, current: dict, body: dict, required: bool) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is None and not required:
            return
        if wanted != current["metadata"]["resourceVersion"]:
            raise self._conflict(RESOURCES[current["kind"]], current["metadata"]["name"])

    def _replace(self, resource: Resource, key, current: dict, stored: dict) -> dict:
        stored["metadata"]["resourceVersion"] = str(self._bump())
        stored["kind"] = resource.kind
        stored["apiVersion"] = current["apiVersion"]
        self._objects[key] = stored
        self._record("MODIFIED", resource, current, stored)
        return copy.deepcopy(stored)

    def _record(self, type_: str, resource: Resource, old: dict | None, new: dict) -> None:
        event = _Event(self._rv, resource, type_, copy.deepcopy(old), copy.deepcopy(new))
        self._history.append(event)
        for watch in self._watches:
            if watch.resource is resource:
                out = self._event_for(watch, event)
                if out is not None:
                    watch.queue.put(("event", out))

    def _event_for(self, watch: _Watch, event: _Event) -> dict | None:
        """The event this watch sees, if any: a field selector turns moves in/out into ADDED/DELETED."""
        was, now = watch.matches(event.old), watch.matches(event.new)
        if event.type == "DELETED":
            type_ = "DELETED" if was else None
        elif event.type == "ADDED":
            type_ = "ADDED" if now else None
        else:
            type_ = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get((was, now))
        if type_ is None:
            return None
        return {"type": type_, "object": self._served(event.new, watch.resource, watch.version)}

    def _served(self, obj: dict, resource: Resource, version: str) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"] = f"{resource.group}/{version}" if resource.group else version
        out["kind"] = resource.kind
        return out

    def _bookmark(self, watch: _Watch) -> dict:
        gv = f"{watch.resource.group}/{watch.version}" if watch.resource.group else watch.version
        return {"type": "BOOKMARK", "object": {"kind": watch.resource.kind, "apiVersion": gv,
                                               "metadata": {"resourceVersion": str(self._rv)}}}

    def _to_watches(self, kind: str | None, *messages) -> int:
        with self._lock:
            chosen = [w for w in self._watches if kind is None or w.resource.kind == kind]
            for watch in chosen:
                for message in messages:
                    watch.queue.put(message)
            return len(chosen)

    def _served_versions(self, group: str) -> tuple[str, ...]:
        if group in BUILTIN_VERSIONS:
            return BUILTIN_VERSIONS[group]
        if group == GATEWAY_GROUP:
            ordered: list[str] = []
            for versions in self._crds.values():
                ordered.extend(v for v in versions if v not in ordered)
            return tuple(ordered)
        return ()

    def _resources_in(self, group: str, version: str) -> list[Resource]:
        if group == GATEWAY_GROUP:
            return [RESOURCES[k] for k, versions in self._crds.items() if version in versions]
        if version not in BUILTIN_VERSIONS.get(group, ()):
            return []
        return [r for r in RESOURCES.values() if r.group == group]

    # --- request handling (called from handler threads) ---------------------------------------

    def handle(self, handler: "_Handler", method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        body = handler.read_body()
        with self._lock:
            self.requests.append(RecordedRequest(method, parts.path, query, {k.lower(): v for k, v in handler.headers.items()}))
            hooks = list(self._hooks)
        try:
            self._authorize(handler, method, parts.path, query)
            for hook in hooks:
                answer = hook(method, parts.path, query, body)
                if answer is not None:
                    handler.send_json(*answer)
                    return
            self._route(handler, method, parts.path.rstrip("/"), query, body)
        except ApiAnswer as answer:
            handler.send_json(answer.code, answer.body)

    def _authorize(self, handler, method: str, path: str, query: dict) -> None:
        """Authentication (the bearer token) and RBAC, before anything else, as in a real server."""
        policy = self.rbac
        if policy is None:
            return
        scheme, _, credential = handler.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or credential.strip() != self.token:  # the scheme is case-insensitive
            raise ApiAnswer(401, "Unauthorized", "Unauthorized")
        attributes = request_attributes(method, path, query)
        if not policy.allows(attributes):
            answer = ApiAnswer(403, "Forbidden", attributes.forbidden_message(policy.user))
            if attributes.resource is not None:
                answer.body["details"] = {"name": attributes.name, "group": attributes.group,
                                          "kind": attributes.resource.split("/")[0]}
            raise answer

    def _route(self, handler, method, path, query, body) -> None:
        segments = [s for s in path.split("/") if s]
        with self._lock:
            if segments == ["api"]:
                return handler.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
            if segments == ["apis"]:
                return handler.send_json(200, self._group_list())
            if len(segments) == 2 and segments[0] == "apis":
                return handler.send_json(200, self._group_document(segments[1]))
            if segments[:2] == ["api", "v1"]:
                group, version, rest = "", "v1", segments[2:]
            elif len(segments) >= 3 and segments[0] == "apis":
                group, version, rest = segments[1], segments[2], segments[3:]
            else:
                raise ApiAnswer(404, "NotFound", f"the server could not find the requested resource ({path})")
            if version not in self._served_versions(group):
                raise ApiAnswer(404, "NotFound", f"the server could not find the requested resource ({path})")
            if not rest:
                return handler.send_json(200, self._resource_list(group, version))
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        with self._lock:
            resource = next((r for r in self._resources_in(group, version) if r.plural == rest[0]), None)
        if resource is None or len(rest) > 3 or (namespace is not None and not resource.namespaced):
            raise ApiAnswer(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else None
        if subresource not in (None, "status") or (subresource and not resource.has_status):
            raise ApiAnswer(404, "NotFound", f"the server could not find the requested resource ({path})")
        if name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                return self._serve_watch(handler, resource, version, namespace, query)
            if method == "GET":
                return handler.send_json(200, self._list(resource, version, namespace, query))
            if method == "POST":
                obj = dict(body or {})
                obj.setdefault("metadata", {})
                if resource.namespaced:
                    obj["metadata"]["namespace"] = namespace
                obj["kind"] = resource.kind
                return handler.send_json(201, self._served(self.create(obj), resource, version))
            raise ApiAnswer(405, "MethodNotAllowed", f"{method} on a collection")
        key = (resource.kind, namespace or "", name)
        with self._lock:
            if method == "GET":
                return handler.send_json(200, self._served(self._require(key), resource, version))
            if method == "DELETE":
                return handler.send_json(200, self._served(self.delete(*key), resource, version))
            if method == "PUT":
                obj = self._body_for(body, resource, key)
                if subresource == "status":
                    current = self._require(key)
                    self._precondition(current, obj, required=False)
                    stored = self.update_status(resource.kind, key[1], name, obj.get("status") or {})
                else:
                    stored = self.update(obj)
                return handler.send_json(200, self._served(stored, resource, version))
            if method == "PATCH":
                if handler.headers.get("Content-Type", "").split(";")[0] != "application/merge-patch+json":
                    raise ApiAnswer(415, "UnsupportedMediaType", "the stand-in only takes merge patches")
                current = self._require(key)
                self._precondition(current, body if isinstance(body, dict) else {}, required=False)
                patched = merge_patch(current, body)
                if subresource == "status":
                    stored = self.update_status(resource.kind, key[1], name, patched.get("status") or {})
                else:
                    patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    stored = self.update(patched)
                return handler.send_json(200, self._served(stored, resource, version))
        raise ApiAnswer(405, "MethodNotAllowed", f"{method} on an object")

    def _body_for(self, body, resource: Resource, key) -> dict:
        if not isinstance(body, dict):
            raise ApiAnswer(400, "BadRequest", "the body is not a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.get("name") not in (None, key[2]) or (resource.namespaced and meta.get("namespace") not in (None, key[1])):
            raise ApiAnswer(400, "BadRequest", "the body names another object than the URL")
        meta["name"] = key[2]
        if resource.namespaced:
            meta["namespace"] = key[1]
        obj["kind"] = resource.kind
        return obj

    def _group_list(self) -> dict:
        groups = []
        for group in [g for g in BUILTIN_VERSIONS if g] + [GATEWAY_GROUP]:
            doc = self._group_document(group, missing_ok=True)
            if doc is not None:
                groups.append(doc)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _group_document(self, group: str, missing_ok: bool = False) -> dict | None:
        versions = self._served_versions(group)
        if not versions:
            if missing_ok:
                return None
            raise ApiAnswer(404, "NotFound", "the server could not find the requested resource")
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
                "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        for r in self._resources_in(group, version):
            resources.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                              "kind": r.kind, "verbs": ALL_VERBS})
            if r.has_status:
                resources.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": r.namespaced,
                                  "kind": r.kind, "verbs": ["get", "patch", "update"]})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    def _list(self, resource: Resource, version: str, namespace: str | None, query: dict) -> dict:
        if self.page_delay:
            time.sleep(self.page_delay)
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._lock:
            if token:
                snapshot = self._snapshots.pop(token, None)
                if snapshot is None:
                    raise ApiAnswer(400, "BadRequest", "unknown continue token")
                rv, items = snapshot
                if rv < self._floor:
                    raise ApiAnswer(410, "Expired", "The provided continue parameter is too old to display a "
                                    "consistent list result. You can start a new list without the continue "
                                    "parameter.")
            else:
                wanted = query.get("resourceVersion")
                if (query.get("resourceVersionMatch") == "Exact" and wanted
                        and int(wanted) < self._floor):
                    raise ApiAnswer(410, "Expired", f"too old resource version: {wanted} ({self._floor})")
                selector = parse_field_selector(query.get("fieldSelector", ""))
                rv = self._rv
                items = []
                for key in sorted(k for k in self._objects if k[0] == resource.kind):
                    obj = self._objects[key]
                    if namespace is not None and key[1] != namespace:
                        continue
                    if selector(obj):
                        # The real server leaves apiVersion/kind out of built-in list items. A
                        # shallow copy is enough: a stored object is replaced, never changed in
                        # place, and a page is only serialized.
                        items.append({k: v for k, v in obj.items() if k not in ("apiVersion", "kind")})
            meta: dict = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                token = uuid.uuid4().hex
                self._snapshots[token] = (rv, items[limit:])
                items = items[:limit]
                meta["continue"] = token
                meta["remainingItemCount"] = len(self._snapshots[token][1])
        gv = f"{resource.group}/{version}" if resource.group else version
        return {"kind": f"{resource.kind}List", "apiVersion": gv, "metadata": meta, "items": items}

    def _serve_watch(self, handler, resource: Resource, version: str, namespace: str | None, query: dict) -> None:
        selector = parse_field_selector(query.get("fieldSelector", ""))
        watch = _Watch(resource, version, namespace, selector, query.get("allowWatchBookmarks") == "true")
        timeout = float(query.get("timeoutSeconds") or 1800)
        wanted = query.get("resourceVersion") or "0"
        with self._lock:
            if wanted == "0":
                # "any version": synthetic ADDED events for what exists, then changes
                for key in sorted(k for k in self._objects if k[0] == resource.kind):
                    obj = self._objects[key]
                    if watch.matches(obj):
                        watch.queue.put(("event", {"type": "ADDED", "object": self._served(obj, resource, version)}))
            elif int(wanted) < self._floor:
                gone = status_object(410, "Expired", f"too old resource version: {wanted} ({self._floor})")
                if self.gone_as_http:
                    raise ApiAnswer(410, "Expired", gone["message"])
                watch.queue.put(("event", {"type": "ERROR", "object": gone}))
                watch.queue.put(("end",))
            else:
                for event in self._history:
                    if event.rv > int(wanted) and event.resource is resource:
                        out = self._event_for(watch, event)
                        if out is not None:
                            watch.queue.put(("event", out))
            self._watches.append(watch)
        try:
            handler.stream_watch(watch, timeout)
        finally:
            with self._lock:
                self._watches.remove(watch)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: StandInApiServer

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without this, Nagle and the client's delayed
        # ACK add 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.standin._lock:
            self.standin._sockets.add(self.connection)

    def finish(self) -> None:
        with self.standin._lock:
            self.standin._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args) -> None:  # quiet: tests read `requests` instead
        pass

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream_watch(self, watch: _Watch, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    message = watch.queue.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                if message[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # no last chunk: a broken stream
                    return
                if message[0] == "end":
                    break
                line = json.dumps(message[1]).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self.standin.handle(self, "GET")

    def do_POST(self) -> None:
        self.standin.handle(self, "POST")

    def do_PUT(self) -> None:
        self.standin.handle(self, "PUT")

    def do_PATCH(self) -> None:
        self.standin.handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.standin.handle(self, "DELETE")



def make(kind: str, namespace: str, name: str, **fields) -> dict:
    """A minimal object of `kind` for tests (apiVersion chosen by the stand-in on create)."""
    resource = RESOURCES[kind]
    meta = {"name": name}
    if resource.namespaced:
        meta["namespace"] = namespace
    obj = {"kind": kind, "metadata": meta}
    if resource.group == GATEWAY_GROUP:
        obj["apiVersion"] = ""  # filled by create() with the first served version
    obj.update(fields)
    return obj
