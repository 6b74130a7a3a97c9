"""The resolver's fast paths against the checked paths they stand in for: the EndpointSlice reader's
(objects._plain_slice_endpoints) must read every endpoint it accepts exactly as the checked path
does, and accept only endpoints the checked path reads without a problem line; the backend group's
(endpoints._uniform_endpoints) must select what the candidate path selects. Differential tests over
random, often malformed, input."""

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


def test_fast_path_reads_each_endpoint_like_the_checked_path():
    """One endpoint at a time, of either family."""
    rng = random.Random(6)
    accepted = 0
    for _ in range(3000):
        raw = random_endpoint(rng)
        for family in (4, 6):
            notes = o._Notes("EndpointSlice ns/s")
            checked = o._slice_endpoint(raw, family, notes, "endpoints[0]")
            fast = o._plain_slice_endpoints([raw], family)
            if fast is not None:
                accepted += 1
                assert checked is not None and fast == ([checked[0]], [checked[1]]), raw
                assert notes.lines == [], raw
    assert accepted > 100  # the generator does reach the fast path


# --- the backend group's fast path (endpoints._uniform_endpoints) -----------------------------

from agent.model import GroupKey  # noqa: E402
from agent.resolve import endpoints as e  # noqa: E402

TRAITS = [o.endpoint_traits(ready, serving, terminating, node, for_nodes, for_zones)
          for ready, serving, terminating, node, for_nodes, for_zones in [
              (True, True, False, "n1", None, None), (True, True, False, "n2", None, None),
              (True, True, False, None, None, None), (False, True, True, "n1", None, None),
              (False, False, True, "n2", None, None), (False, True, False, "n1", None, None),
              (True, True, False, "n2", ("n1",), None), (True, True, False, "n2", ("n3",), ("z1",)),
              (True, True, False, "n1", None, ("z2",)), (False, True, True, "n2", None, ("z1",))]]


def random_slice(rng: random.Random, name: str) -> o.SliceRecord:
    family = rng.choice([4, 4, 4, 6])
    addresses = tuple(f"10.0.0.{rng.randrange(6)}" if family == 4 else f"fd00::{rng.randrange(6)}"
                      for _ in range(rng.randrange(4)))
    uniform = rng.random() < 0.6
    first = rng.choice(TRAITS)
    traits = tuple(first if uniform else rng.choice(TRAITS) for _ in addresses)
    ports = tuple(o.SlicePort(rng.choice(["", "http"]), rng.choice(["TCP", "UDP"]), rng.choice([80, 81]))
                  for _ in range(rng.randrange(1, 3)))
    return o.SliceRecord("ns", name, "svc", family, ports, addresses, traits)


def test_group_fast_path_selects_like_the_candidate_path():
    """backend_group (fast path where it applies) against merge_slices + select_endpoints, on
    random slices: uniform traits, mixed ones, duplicates across slices, other ports and families."""
    rng = random.Random(16)
    fast_taken = 0
    for _ in range(4000):
        slices = [random_slice(rng, f"s{i}") for i in range(rng.randrange(4))]
        port_name, protocol, family = rng.choice(["", "http"]), rng.choice(["TCP", "UDP"]), rng.choice([4, 6])
        local_only = rng.random() < 0.3
        node, zone = rng.choice(["n1", "n2"]), rng.choice([None, "z1", "z2"])
        service = o.ServiceRecord("ns", "svc", "", False, ("10.96.0.1",), (), local_only, 0)
        key = GroupKey("ns", "svc", port_name, protocol, family)
        group = e.backend_group(key, service, slices, node, zone)
        candidates = e.merge_slices(slices, port_name, protocol, family)
        assert (group.endpoints, group.verdict) == e.select_endpoints(candidates, local_only, node, zone), slices
        if e._uniform_endpoints(slices, port_name, protocol, family) is not None:
            fast_taken += 1
    assert fast_taken > 300  # the generator does reach the fast path


def test_whole_slice_fast_path_reads_like_the_checked_path():
    """Whole IPv4 slices, mostly plain, against the checked path endpoint by endpoint: the same
    addresses and traits, and taken only when the checked path has nothing to say."""
    rng = random.Random(61)
    plain = {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1"}
    taken = 0
    for _ in range(3000):
        raws = [dict(plain, addresses=[f"10.0.0.{i}"]) if rng.random() < 0.8 else random_endpoint(rng)
                for i in range(rng.randrange(5))]
        fast = o._plain_slice_endpoints(raws, 4)
        if fast is None:
            continue
        taken += 1
        notes = o._Notes("EndpointSlice ns/s")
        checked = [o._slice_endpoint(raw, 4, notes, f"endpoints[{i}]") for i, raw in enumerate(raws)]
        assert notes.lines == [] and None not in checked, raws
        assert fast == ([a for a, _ in checked], [t for _, t in checked]), raws
    assert taken > 500
