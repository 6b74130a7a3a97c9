"""Leader election on a coordination.k8s.io/v1 Lease: exactly one agent writes Route status.

Role: every agent runs a LeaderElector on the same Lease. The holder renews it every
`renew_seconds`; the others read it every `retry_seconds` and take it over once it has gone
`leaseDurationSeconds` without a change (or was released). `on_start` / `on_stop` tell the
runtime when this agent starts and stops being the writer; they run on the elector's thread and
must return quickly (a slow callback delays renewals).
May touch: one Lease object, through the given ApiClient.

Why the timings are safe (no two leaders):
- expiry is judged on the observer's own monotonic clock, from the moment it saw the Lease
  change, never from the timestamps written in it (node clocks may disagree);
- the holder steps down (on_stop) once it has failed to renew for `lease_seconds -
  renew_seconds`, which is before any other agent can count the Lease as expired: the others
  started counting no earlier than the last successful renewal;
- every write carries the resourceVersion read (optimistic concurrency): of two agents racing
  for an expired Lease, the API server lets exactly one win (the other gets 409 Conflict).
Liveness: when the holder dies, another agent takes over within `lease_seconds + 2 *
retry_seconds` of its last renewal (defaults 11 + 2 * 2 = 15 s: the issue's promise that a
standby takes over within 15 s of the writer dying); when it stops cleanly it releases the Lease and another
agent takes over within `retry_seconds`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from agent.logs import get_logger
from agent.sources.kubeapi import ApiError, ApiHttp, ResourceKind, format_micro_time

log = get_logger("leader")

LEASES = ResourceKind("Lease", "coordination.k8s.io", "v1", "leases")


class LeaderElector:
    def __init__(self, api_client, identity: str, namespace: str, on_start: Callable[[], None],
                 on_stop: Callable[[], None], lease_name: str = "meshlet-status-writer",
                 lease_seconds: float = 11, renew_seconds: float = 5, retry_seconds: float = 2,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < renew_seconds * 2 <= lease_seconds:
            raise ValueError(f"renew_seconds ({renew_seconds}) must be at most half of lease_seconds ({lease_seconds})")
        if not 0 < retry_seconds < lease_seconds - renew_seconds:
            raise ValueError(f"retry_seconds ({retry_seconds}) must be below lease_seconds - renew_seconds")
        self.identity = identity
        self.namespace = namespace
        self.lease_name = lease_name
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_seconds = retry_seconds
        #: The holder steps down when it could not renew for this long (see the module docstring).
        self.renew_deadline = lease_seconds - renew_seconds
        self._clock = clock  #: monotonic seconds (tests drive step() on a clock of their own)
        self._on_start = on_start
        self._on_stop = on_stop
        # Each request is bounded well inside the renew deadline, so a hung API server cannot
        # keep us leading past it.
        self._http = ApiHttp(api_client, request_timeout=max(0.2, min(renew_seconds / 2, 10.0)))
        self._path = LEASES.object_path(namespace, lease_name)
        self._stop = threading.Event()
        self._runner: threading.Thread | None = None
        self._release = True
        self._done = threading.Event()
        self._leader = False
        self._lease: dict | None = None  # the Lease as last read or written
        self._observed_version: str | None = None  # its resourceVersion when we first saw it ...
        self._observed_at = 0.0  # ... and when (our monotonic clock)
        self._renewed_at = 0.0  # when our last successful renewal was sent

    @property
    def is_leader(self) -> bool:
        return self._leader

    def run(self) -> None:
        """Take part in the election until stop(); returns after stepping down."""
        self._runner = threading.current_thread()
        self._done.clear()
        log.info("leader.candidate", identity=self.identity, lease=f"{self.namespace}/{self.lease_name}")
        try:
            while not self._stop.is_set():
                self.step()
                self._stop.wait(self._next_wait())
        finally:
            self.resign(self._release)
            self._done.set()

    def stop(self, release: bool = True, timeout: float = 5.0) -> None:
        """Stop taking part; a leader steps down (on_stop) and, with `release`, frees the Lease so
        that another agent takes over without waiting for it to expire. Waits for run() to end."""
        self._release = release
        self._stop.set()
        runner = self._runner
        if runner is not None and runner is not threading.current_thread():
            self._done.wait(timeout)

    def _next_wait(self) -> float:
        if not self._leader:
            return self.retry_seconds
        now = self._clock()
        due = self._renewed_at + self.renew_seconds - now
        if due <= 0:  # the renewal failed: try again soon, and never sleep past the deadline
            due = min(self.retry_seconds, self._renewed_at + self.renew_deadline - now)
        return max(0.0, due)

    # --- one round --------------------------------------------------------------------------

    def resign(self, release: bool = True) -> None:
        """Step down if leading (on_stop) and, with `release`, free the Lease at once."""
        if self._leader:
            self._step_down("stopping")
            if release:
                self._release_lease()

    def step(self) -> None:
        """One round: try to acquire, or renew when due, or step down past the deadline."""
        try:
            if not self._leader:
                self._try_acquire()
            elif self._clock() - self._renewed_at >= self.renew_seconds:
                self._renew()
        except ApiError as err:
            log.warning("leader.api_error", identity=self.identity, status=err.status, error=err.message)
        if self._leader and self._clock() - self._renewed_at > self.renew_deadline:
            self._step_down(f"could not renew the Lease for {self.renew_deadline:g}s")

    def _try_acquire(self) -> None:
        try:
            lease = self._http.json("GET", self._path)
        except ApiError as err:
            if err.status != 404:
                raise
            self._create()
            return
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and not self._expired(spec):
            return
        # Free, expired, or ours from an earlier run of this identity: take it.
        transitions = int(spec.get("leaseTransitions") or 0) + (1 if holder != self.identity else 0)
        now_text = format_micro_time(time.time())
        lease["spec"] = {**spec, "holderIdentity": self.identity, "leaseDurationSeconds": self._duration(),
                         "acquireTime": now_text, "renewTime": now_text, "leaseTransitions": transitions}
        self._write(lease, taking_over_from=holder)

    def _create(self) -> None:
        now_text = format_micro_time(time.time())
        lease = {
            "apiVersion": LEASES.api_version, "kind": "Lease",
            "metadata": {"name": self.lease_name, "namespace": self.namespace},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self._duration(),
                     "acquireTime": now_text, "renewTime": now_text, "leaseTransitions": 0},
        }
        sent = self._clock()
        try:
            created = self._http.json("POST", LEASES.collection_path(self.namespace), body=lease)
        except ApiError as err:
            if err.status == 409:
                return  # another agent created it first: it leads
            raise
        self._became_leader(created, sent, previous="")

    def _renew(self) -> None:
        lease = dict(self._lease)
        lease["spec"] = {**(lease.get("spec") or {}), "renewTime": format_micro_time(time.time()),
                         "leaseDurationSeconds": self._duration()}
        sent = self._clock()
        try:
            self._lease = self._http.json("PUT", self._path, body=lease)
            self._renewed_at = sent
            return
        except ApiError as err:
            if err.status not in (404, 409):
                raise
        # Someone else wrote the Lease (or deleted it): see who holds it now.
        try:
            current = self._http.json("GET", self._path)
        except ApiError as err:
            if err.status == 404:
                self._step_down("the Lease was deleted")
                return
            raise
        self._observe(current)
        if (current.get("spec") or {}).get("holderIdentity") != self.identity:
            self._step_down(f"the Lease is held by {(current.get('spec') or {}).get('holderIdentity')!r}")
            return
        self._lease = current  # still ours (our earlier write landed after all): renew next round

    def _write(self, lease: dict, taking_over_from: str) -> None:
        sent = self._clock()
        try:
            written = self._http.json("PUT", self._path, body=lease)
        except ApiError as err:
            if err.status in (404, 409):
                return  # another agent was faster; we will read the Lease again next round
            raise
        self._became_leader(written, sent, previous=taking_over_from)

    def _release_lease(self) -> None:
        if self._lease is None:
            return
        lease = dict(self._lease)
        # An empty holder is free for the taking at once (what client-go writes on release too).
        lease["spec"] = {**(lease.get("spec") or {}), "holderIdentity": "", "leaseDurationSeconds": 1,
                         "renewTime": format_micro_time(time.time())}
        try:
            self._http.json("PUT", self._path, body=lease)
            log.info("leader.released", identity=self.identity)
        except ApiError as err:
            log.warning("leader.release_failed", identity=self.identity, status=err.status, error=err.message)

    # --- bookkeeping --------------------------------------------------------------------------

    def _duration(self) -> int:
        return max(1, round(self.lease_seconds))

    def _observe(self, lease: dict) -> None:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version != self._observed_version:
            self._observed_version = version
            self._observed_at = self._clock()

    def _expired(self, spec: dict) -> bool:
        duration = spec.get("leaseDurationSeconds")
        if not isinstance(duration, (int, float)) or duration <= 0:
            duration = self.lease_seconds
        return self._clock() - self._observed_at >= duration

    def _became_leader(self, lease: dict, sent: float, previous: str) -> None:
        self._lease = lease
        self._renewed_at = sent
        self._leader = True
        log.info("leader.elected", identity=self.identity, previous=previous or "",
                 transitions=(lease.get("spec") or {}).get("leaseTransitions", 0))
        try:
            self._on_start()
        except Exception as err:  # noqa: BLE001 - a callback's bug must not break the election
            log.error("leader.on_start_failed", error=repr(err))

    def _step_down(self, why: str) -> None:
        self._leader = False
        log.info("leader.lost", identity=self.identity, reason=why)
        try:
            self._on_stop()
        except Exception as err:  # noqa: BLE001
            log.error("leader.on_stop_failed", error=repr(err))
