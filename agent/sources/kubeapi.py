"""The Kubernetes API as raw JSON over HTTP: one transport, the resource table, route discovery.

Role: the thin layer the Kubernetes source, the Lease elector and the Route status writer share.
It speaks HTTP through the official client's connection pool and credentials (TLS settings,
bearer token and its in-cluster refresh all come from the `kubernetes.client.ApiClient` the
runtime built), but never through the generated models: objects stay the plain JSON dicts the
API server sent, so fields this agent does not know survive a read-modify-write.
May touch: the network, through the given ApiClient only.
Invariants: every non-2xx answer raises `ApiError` carrying the HTTP status (0 when the server
could not be reached); a watch response is handed back unread, for the caller to stream.
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator
from urllib.parse import quote, urlencode

import urllib3

from agent.errors import TransientError
from agent.kinds import GATEWAY_GROUP, GATEWAY_VERSIONS, ROUTE_PLURALS

#: Gateway API versions we understand, best first.
ROUTE_VERSION_PREFERENCE = GATEWAY_VERSIONS

#: Connections the client's pool keeps per API server: one long-lived watch per kind (up to ten)
#: plus discovery, the Lease and status writes. A smaller pool (the client's default is 5 per CPU)
#: discards a connection at the end of every watch with a warning.
POOL_SIZE = 32

#: Our connection-level retry: one retry when a pooled connection turned out dead, never a re-read
#: of a response (the callers own every higher-level retry and its backoff).
_POOL_RETRIES = urllib3.Retry(total=1, read=0, status=0, redirect=0, raise_on_status=False)


class ApiError(TransientError):
    """The API server answered with an error, or could not be reached (status 0).

    Transient by type: every caller retries with backoff; `status` tells 404 (gone / not served),
    409 (conflict: re-read), 410 (resourceVersion too old: relist) apart from the rest.
    """

    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_status_object(cls, status: int, body: bytes) -> "ApiError":
        """Build from an error response, whose body is a meta/v1 Status when the server wrote it."""
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return cls(status, str(obj.get("message", "")), str(obj.get("reason", "")))
        return cls(status, body[:200].decode("utf-8", "replace"))


@dataclass(frozen=True)
class ResourceKind:
    """One kind as the API serves it: where to list and watch it, and what to call it."""

    kind: str  #: e.g. "Service"; also the source name handed to the sink
    group: str  #: "" for the core group
    version: str
    plural: str
    field_selector: str = ""  #: server-side filter (Pods on this node, this Node)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        """The list/watch path, across all namespaces unless one is given."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        return f"{base}/{self.plural}"

    def object_path(self, namespace: str | None, name: str) -> str:
        return f"{self.collection_path(namespace)}/{quote(name, safe='')}"


def route_kind(kind: str, version: str) -> ResourceKind:
    return ResourceKind(kind, GATEWAY_GROUP, version, ROUTE_PLURALS[kind])


class ApiHttp:
    """Raw JSON requests through an ApiClient's pool and credentials.

    `request_timeout` bounds connecting and every read of a plain request; a watch passes its own
    read timeout (longer than the server-side timeoutSeconds it asked for).
    """

    def __init__(self, api_client, request_timeout: float = 30.0):
        self._client = api_client
        self._config = api_client.configuration
        self._pool = api_client.rest_client.pool_manager
        self.request_timeout = request_timeout
        pool_kw = getattr(self._pool, "connection_pool_kw", None)
        if isinstance(pool_kw, dict) and pool_kw.get("maxsize", 1) < POOL_SIZE:
            pool_kw["maxsize"] = POOL_SIZE
            self._pool.clear()  # pools are made per host on first use: the next one is big enough

    def _headers(self, content_type: str | None) -> dict:
        headers = dict(self._client.default_headers)
        headers["Accept"] = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        # auth_settings() runs the configuration's refresh hook: the in-cluster token is re-read
        # when it rotates.
        for setting in self._config.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def open(self, method: str, path: str, query: dict | None = None, body: object = None,
             content_type: str | None = None, read_timeout: float | None = None):
        """Send one request; return the unread urllib3 response (2xx only), else raise ApiError."""
        url = self._config.host.rstrip("/") + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None and v != ""})
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None and content_type is None:
            content_type = "application/json"
        timeout = urllib3.Timeout(connect=self.request_timeout,
                                  read=read_timeout if read_timeout is not None else self.request_timeout)
        try:
            resp = self._pool.request(method, url, body=payload, headers=self._headers(content_type),
                                      timeout=timeout, retries=_POOL_RETRIES, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, f"API server unreachable at {self._config.host}: {err}") from None
        if not 200 <= resp.status <= 299:
            try:
                data = resp.read()
            except (urllib3.exceptions.HTTPError, OSError):
                data = b""
            finally:
                resp.release_conn()
            raise ApiError.from_status_object(resp.status, data)
        return resp

    def json(self, method: str, path: str, query: dict | None = None, body: object = None,
             content_type: str | None = None) -> dict:
        """One request whose answer is a JSON object."""
        resp = self.open(method, path, query, body, content_type)
        try:
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, f"reading {method} {path} failed: {err}") from None
        finally:
            resp.release_conn()
        try:
            obj = json.loads(data)
        except ValueError:
            raise ApiError(0, f"{method} {path} answered with something that is not JSON") from None
        if not isinstance(obj, dict):
            raise ApiError(0, f"{method} {path} answered with JSON that is not an object")
        return obj


def stream_lines(resp) -> Iterator[bytes]:
    """The newline-separated records of a streamed (chunked) response, as they arrive.

    Raises urllib3 / OS errors when the connection drops mid-stream; ends when the server ends
    the stream cleanly.
    """
    pending = b""
    for chunk in resp.stream(64 * 1024, decode_content=True):
        pending += chunk
        while True:
            line, sep, rest = pending.partition(b"\n")
            if not sep:
                break
            pending = rest
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def interrupt(resp) -> None:
    """Wake a thread blocked reading `resp` (from another thread): shut its socket down.

    Closing a file descriptor does not wake a blocked recv() on Linux; shutdown() does.
    """
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        resp.close()
    except Exception:  # noqa: BLE001 - best effort while another thread may be using it
        pass


def discover_route_kinds(http: ApiHttp) -> dict[str, str]:
    """Which Gateway API route kinds the cluster serves: kind -> the best served version.

    A missing group or version (the CRDs are not installed) is an empty answer, not an error.
    Only versions listed in ROUTE_VERSION_PREFERENCE count, and only resources that can be
    listed and watched.
    """
    try:
        group = http.json("GET", f"/apis/{GATEWAY_GROUP}")
    except ApiError as err:
        if err.status == 404:
            return {}
        raise
    served_versions = {v.get("version") for v in group.get("versions") or [] if isinstance(v, dict)}
    best: dict[str, str] = {}
    for version in ROUTE_VERSION_PREFERENCE:
        if version not in served_versions:
            continue
        try:
            resources = http.json("GET", f"/apis/{GATEWAY_GROUP}/{version}")
        except ApiError as err:
            if err.status == 404:
                continue
            raise
        for res in resources.get("resources") or []:
            kind = res.get("kind")
            verbs = set(res.get("verbs") or [])
            if (kind in ROUTE_PLURALS and kind not in best and res.get("name") == ROUTE_PLURALS[kind]
                    and {"list", "watch"} <= verbs):
                best[kind] = version
    return best


class Backoff:
    """Capped exponential backoff with jitter: initial, 2x, 4x ... up to `maximum`.

    Each delay is drawn uniformly from [d/2, d] so that many agents restarted together (a rolling
    API server upgrade drops every watch at once) do not come back in lockstep.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None):
        self.initial = initial
        self.maximum = maximum
        self._failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self._failures, 30)))
        self._failures += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures


def format_time(epoch: float) -> str:
    """RFC 3339 in UTC with second precision: metav1.Time (condition lastTransitionTime)."""
    return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(epoch: float) -> str:
    """RFC 3339 in UTC with microseconds: metav1.MicroTime (Lease acquireTime, renewTime)."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
