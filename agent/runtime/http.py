"""The agent's HTTP listener: /healthz, /readyz, /metrics, /status/routes (a contract: DESIGN.md),
and /status/pods.

Role: answer probes and scrapes from a small threaded server beside the sync loop. It reads only
what others publish (health verdicts, the metrics registry, the route status board); it never
touches the resolver or the datapath, so a slow scrape cannot delay a sync.

- /healthz, /readyz: 200 or 503, with a small JSON body saying why (agent.runtime.health);
- /metrics: Prometheus text exposition of the agent's own registry;
- /status/routes: JSON list of `{kind, namespace, name, parents: [RouteParentStatus]}` (each
  condition with `lastTransitionTime`), sorted by kind, namespace, name: the same conditions the
  elected writer puts on the API objects;
- /status/pods: JSON list of `{namespace, name, uid, cgroup_id}`, the pods on this node with a
  cgroup as the last written sync knew them (`meshlet explain` finds a pod's cgroup here).

May touch: one listening TCP socket. Invariant: `lastTransitionTime` of a condition changes only
when its status changes (SEMANTICS B14).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.errors import UserError
from agent.logs import get_logger
from agent.model import RouteId, RouteStatus, host_port
from agent.runtime.health import Health
from agent.runtime.metrics import Metrics
from agent.runtime.status_writer import merge_parents
from agent.sources.kubeapi import format_time

log = get_logger("http")


class RouteStatusBoard:
    """The latest Route statuses as /status/routes serves them, with lastTransitionTime.

    The transition-time rule is the status writer's (`merge_parents`), applied to the entries
    this board served before, so the listener and the API objects agree on it.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[RouteId, dict] = {}

    def publish(self, statuses: Mapping[RouteId, RouteStatus]) -> None:
        now = format_time(self._clock())
        with self._lock:
            entries = {}
            for route_id in sorted(statuses):
                entry = statuses[route_id].as_json()
                before = self._entries.get(route_id, {}).get("parents", [])
                entry["parents"] = merge_parents(before, statuses[route_id], now)
                entries[route_id] = entry
            self._entries = entries

    def as_json(self) -> list[dict]:
        with self._lock:
            return list(self._entries.values())


class PodBoard:
    """The pods on this node the last written sync knew, with their cgroup ids, as /status/pods
    serves them: what `meshlet explain --from NS/POD` needs to find a pod's cgroup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: list[dict] = []

    def publish(self, pods: list[dict]) -> None:
        with self._lock:
            self._pods = list(pods)

    def as_json(self) -> list[dict]:
        with self._lock:
            return list(self._pods)


class AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], health: Health, metrics: Metrics, board: RouteStatusBoard,
                 pods: PodBoard):
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.health = health
        self.metrics = metrics
        self.board = board
        self.pods = pods
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._verdict(self.server.health.healthz())
        elif path == "/readyz":
            self._verdict(self.server.health.readyz())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics.registry))
        elif path == "/status/routes":
            self._json(200, self.server.board.as_json())
        elif path == "/status/pods":
            self._json(200, self.server.pods.as_json())
        else:
            self._json(404, {"error": f"no such endpoint {path}",
                             "endpoints": ["/healthz", "/readyz", "/metrics", "/status/routes", "/status/pods"]})

    def _verdict(self, verdict) -> None:
        self._json(200 if verdict.ok else 503, verdict.as_json())

    def _json(self, code: int, body: object) -> None:
        self._send(code, "application/json", (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass  # probes every few seconds are not events worth a log line


class Listener:
    """The server in a daemon thread; `address` is the bound one (port 0 resolved)."""

    def __init__(self, address: tuple[str, int], health: Health, metrics: Metrics, board: RouteStatusBoard,
                 pods: PodBoard | None = None):
        try:
            self.server = AgentHTTPServer(address, health, metrics, board, pods or PodBoard())
        except OSError as err:
            host, port = address
            raise UserError(f"cannot listen on {host_port(host, port)}: {err.strerror}; hint: pass --listen with a free "
                            "address and port (another meshlet running?)") from None
        self.address = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("http.listening", address=host_port(host, port))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
