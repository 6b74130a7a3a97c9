"""Pausing Python's cyclic garbage collector around bulk builds of long-lived, acyclic data.

Role: one context manager, `gc_paused()`, used by the steps of a sync that build or write the
whole state at once (Resolver.commit, plan.plan, Reconciler.full).

Why: the agent holds the cluster as several Python objects per endpoint (millions at 50k
Services). CPython runs a full collection, visiting every tracked object, each time the number
of objects has grown by about a quarter; during a cold sync those passes were about half of
resolve's and reconcile's time and freed nothing (the records hold no reference cycles, and
what is built is kept). Pausing loses nothing: objects without cycles are freed by reference
counting anyway, and a cycle made meanwhile is found by the next collection after the pause.

May touch: the interpreter's gc switch only, restored on exit (also on error). Nesting and
concurrent use from several threads are safe: only the outermost pause that found the
collector enabled turns it back on, and a collector disabled by someone else stays disabled.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
