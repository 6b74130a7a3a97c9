"""Health and readiness: what /healthz and /readyz answer, computed from the loop's facts.

Role: the sync loop reports what happened (programs attached, a sync written, a write failed);
the HTTP listener asks for a verdict. The rules, in one place:

- /readyz is 200 only once the programs are attached AND the first full sync is written
  (DESIGN.md); before that it names what it waits for (sources still listing, attach, first write).
- /healthz is 503 when a change seen after the first sync has waited longer than
  `stale_change_threshold` to reach the maps, or when `failing_writes_threshold` writes in a row
  failed. Waiting for the sources' first list is not unhealthy (that is readiness): a liveness
  probe must not kill an agent that is listing a large cluster or waiting out an API outage.
- Route status writes that fail (an API server away, a grant missing from the RBAC) are named in
  /healthz's body (`routeStatusError`) but never fail it: the datapath does not depend on them,
  and a restart would not mend them.

May touch: nothing but its own fields (under a lock; the loop writes, HTTP threads read).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"status": "ok" if self.ok else "failing", "reasons": list(self.reasons), **self.details}


class Health:
    def __init__(self, stale_change_threshold: float, failing_writes_threshold: int,
                 unapplied_since: Callable[[], float | None] = lambda: None,
                 waiting_for: Callable[[], list[str]] = lambda: [],
                 clock: Callable[[], float] = time.monotonic):
        self.stale_change_threshold = stale_change_threshold
        self.failing_writes_threshold = failing_writes_threshold
        self._unapplied_since = unapplied_since
        self._waiting_for = waiting_for
        self._clock = clock
        self._lock = threading.Lock()
        self._attached = False
        self._first_sync_written = False
        self._consecutive_failures = 0
        self._last_error = ""
        self._route_status_error = ""

    # --- facts, from the loop ------------------------------------------------------------

    def programs_attached(self) -> None:
        with self._lock:
            self._attached = True

    def sync_written(self) -> None:
        with self._lock:
            self._first_sync_written = True
            self._consecutive_failures = 0
            self._last_error = ""

    def write_failed(self, error: str) -> None:
        with self._lock:
            self._consecutive_failures += 1
            self._last_error = error

    def route_status_written(self, error: str = "") -> None:
        """The outcome of the last pass of Route status writes ("" when it succeeded)."""
        with self._lock:
            self._route_status_error = error

    # --- verdicts, for the listener --------------------------------------------------------

    def healthz(self) -> Verdict:
        with self._lock:
            written, failures, last_error = self._first_sync_written, self._consecutive_failures, self._last_error
            route_status_error = self._route_status_error
        since = self._unapplied_since()
        age = self._clock() - since if since is not None else 0.0
        reasons = []
        if written and age > self.stale_change_threshold:
            reasons.append(f"a change has waited {age:.1f}s to reach the maps "
                           f"(threshold {self.stale_change_threshold:g}s)")
        if failures >= self.failing_writes_threshold:
            reasons.append(f"{failures} map writes in a row failed; last: {last_error}")
        details = {"oldestUnappliedSeconds": round(age, 3), "consecutiveFailures": failures}
        if last_error:
            details["lastError"] = last_error
        if route_status_error:
            details["routeStatusError"] = route_status_error
        return Verdict(not reasons, tuple(reasons), details)

    def readyz(self) -> Verdict:
        with self._lock:
            attached, written = self._attached, self._first_sync_written
        reasons = []
        waiting = self._waiting_for()
        if waiting:
            reasons.append("waiting for the first list of: " + ", ".join(waiting))
        if not written:
            reasons.append("first sync not written yet")
        if not attached:
            reasons.append("programs not attached yet")
        return Verdict(attached and written, tuple(reasons), {"attached": attached, "firstSyncWritten": written})
