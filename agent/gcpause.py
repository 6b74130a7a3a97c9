"""Keeping Python's cyclic garbage collector off the long-lived, acyclic data of the agent.

Role: one context manager, `gc_paused()`, used by the steps of a sync that build or write the
whole state at once (Resolver.commit, plan.plan, Reconciler.full); `pause_collector()` /
`resume_collector()`, the same pause spanning many steps: the sync loop holds it through the
agent's start-up (every source's first list, the first sync); `freeze_long_lived()`, called
once by the sync loop after the first full sync is written; and `release_free_heap()`, called
after every full sync.

Why: the agent holds the cluster as several Python objects per endpoint (millions at 50k
Services). CPython runs a full collection, visiting every tracked object, each time the number
of objects has grown by about a quarter; during a cold sync those passes were about half of
resolve's and reconcile's time and freed nothing (the records hold no reference cycles, and
what is built is kept). Pausing loses nothing: objects without cycles are freed by reference
counting anyway, and a cycle made meanwhile is found by the next collection after the pause.

Start-up: the first lists arrive as JSON, millions of container objects parsed while the
resolver's records pile up; each collection the parsing triggers walks the records built so far.
At 50k Services those passes cost more than the parsing itself (1.3 s of 2 s). The JSON holds no
cycles and is freed by reference counting as soon as the resolver has read it.

Freezing: after the first full sync, nearly every object in the process is the cluster as the
resolver holds it, and stays. Left in the collector's oldest generation, each full collection
(triggered by later churn) would walk all of them again to free none; `gc.freeze()` moves them
to the permanent generation, which collections skip. Frozen objects are still freed by reference
counting when the resolver drops them; only a reference cycle among them would never be freed,
and the records hold none. One collection first frees what cycles the start-up left (a few, from
the HTTP layer), so that nothing is frozen as garbage.

Releasing: a full sync builds its plan and reads every map at once (tens of MiB at 50k Services)
and drops them when done; glibc's malloc keeps such freed memory mapped for reuse, so the
agent's resident size would stay at the sync's peak for good. `malloc_trim(0)` hands the free
pages back to the kernel (at 50k Services, ~130 MiB after the first sync). Not glibc: nothing.

May touch: the interpreter's gc switch, restored on exit (also on error), its permanent
generation (freeze), and the C heap's free pages (release). Nesting and concurrent use from several threads are safe: only the
outermost pause that found the collector enabled turns it back on, and a collector disabled by
someone else stays disabled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


def pause_collector() -> bool:
    """Turn the collector off until `resume_collector(<the value returned>)`: a pause spanning
    many steps, where `with gc_paused()` cannot. Returns whether it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    return was_enabled


def resume_collector(was_enabled: bool) -> None:
    """End a `pause_collector()`; a collector that was off before it stays off."""
    if was_enabled:
        gc.enable()


def freeze_long_lived() -> tuple[int, int]:
    """Collect once, then move every object still tracked out of the collector's reach (see the
    module docstring). Returns (unreachable objects the collection found, objects now frozen)."""
    found = gc.collect()
    gc.freeze()
    return found, gc.get_freeze_count()


@functools.cache
def _malloc_trim():
    # Looked up once: find_library runs `ldconfig -p`, not something to do every full sync.
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the kernel (see the module docstring). True when
    this libc could (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
