"""The EndpointSlice reader's fast path (objects._plain_slice_endpoint) must read every endpoint it
accepts exactly as the checked path does, and accept only endpoints the checked path reads without
a problem line. Differential test over random, often malformed, endpoints."""

import random

from agent.resolve import objects as o

MISSING = object()
FLAGS = [True, False, None, 1, 0, "true", {}, MISSING]
ADDRESSES = [["10.0.0.1"], ["010.0.0.1"], ["fd00::1"], ["FD00::0001"], [], None, "10.0.0.1", [5],
             ["10.0.0.1", "10.0.0.2"], ["::ffff:10.0.0.1"], [" 10.0.0.1"], MISSING]
NODES = ["n1", None, 5, "", MISSING]
CONDITIONS = ["dict", "dict", "dict", None, [], "x", MISSING]
HINTS = [MISSING] * 8 + [None, {"forZones": [{"name": "z"}]}]


def _put(target: dict, key: str, value) -> None:
    if value is not MISSING:
        target[key] = value


def random_endpoint(rng: random.Random) -> dict:
    raw: dict = {}
    _put(raw, "addresses", rng.choice(ADDRESSES))
    conditions = rng.choice(CONDITIONS)
    if conditions == "dict":
        conditions = {}
        for flag in ("ready", "serving", "terminating"):
            _put(conditions, flag, rng.choice(FLAGS))
    _put(raw, "conditions", conditions)
    _put(raw, "nodeName", rng.choice(NODES))
    _put(raw, "hints", rng.choice(HINTS))
    return raw


def test_fast_path_reads_like_the_checked_path():
    rng = random.Random(6)
    accepted = 0
    for _ in range(3000):
        raw = random_endpoint(rng)
        for family in (4, 6):
            notes = o._Notes("EndpointSlice ns/s")
            checked = o._slice_endpoint(raw, family, notes, "endpoints[0]")
            fast = o._plain_slice_endpoint(raw, family)
            if fast is not None:
                accepted += 1
                assert fast == checked, raw
                assert notes.lines == [], raw
    assert accepted > 100  # the generator does reach the fast path
