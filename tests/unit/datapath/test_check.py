"""The periodic check without the kernel: the maps compared with the writer's mirror step by step.

Maps are `DictMap`s (the in-memory stand-in for kernel hash maps, named as such): their batch
read keeps its place between steps and, like the kernel's, does not return an entry deleted
meanwhile. What is asserted: a cycle over maps that only the writer touched finds nothing, also
while the writer changes them between steps; each kind of change made behind the writer's back
is reported naming its map within one cycle after it was made, and a full reconcile then
makes the maps equal the plan again; no step does more than its bounded part.
"""

import random

import pytest
from test_reconcile import PlanThenWrite, contents, delta_between, frontend, group, make_maps, state_of

from agent.datapath import layout as L
from agent.datapath import entries as E
from agent.datapath import plan as P
from agent.datapath.check import MapCheck
from agent.model import ClientPod

CHUNK = 4


def world(affinity=30):
    """Five Services (one with affinity: it has members), a consumer view and a client pod."""
    groups = [group(f"s{i}", 3 + i % 3, base=i, affinity=affinity if i == 0 else 0) for i in range(5)]
    frontends = [frontend(f"10.96.0.{i + 1}", (1, g)) for i, g in enumerate(groups)]
    frontends.append(frontend("10.96.0.1", (1, groups[1]), scope="team"))
    pod = ClientPod("uid-1", "team", "client", False)
    return state_of(frontends, groups, [pod]), {"uid-1": 4242}


def run_cycle(check: MapCheck, between=None, limit=10_000) -> dict[str, int]:
    """Steps until a cycle ends; returns the drift reported per map. `between` runs after each step."""
    drift: dict[str, int] = {}
    for _ in range(limit):
        step = check.step()
        assert step.work <= check.chunk
        for name, n in step.drift.items():
            drift[name] = drift.get(name, 0) + n
        if between is not None:
            between()
        if step.cycle_done:
            return drift
    raise AssertionError("the cycle did not end")


def written(log_maps=None):
    maps = make_maps([] if log_maps is None else log_maps)
    rec = PlanThenWrite(maps)
    state, cgroups = world()
    rec.full(state, cgroups)
    return maps, rec, state, cgroups


def test_a_cycle_over_maps_only_the_writer_touched_finds_nothing_and_reads_every_entry():
    maps, rec, _, _ = written()
    check = MapCheck(rec.writer, chunk=CHUNK)
    assert run_cycle(check) == {}
    # The planned maps' entries (the frontend filter is derived from the frontends mirror, not checked).
    entries = sum(len(m.data) for name, m in maps.items() if name in L.PLANNED_MAPS)
    first = check.step()  # a new cycle begins at once
    assert first.cycle_work >= entries and not first.cycle_done


def test_changes_written_between_steps_are_never_taken_for_drift():
    maps, rec, state, cgroups = written()
    check = MapCheck(rec.writer, chunk=CHUNK)
    rng = random.Random(16)
    current = [state]

    def churn():
        old = current[0]
        groups = dict(old.groups)
        frontends = dict(old.frontends)
        key = rng.choice(sorted(groups, key=str))
        base = rng.randrange(50, 250)
        replaced = group(key.service, rng.randrange(0, 6), base=base,
                         affinity=groups[key].affinity_timeout)
        groups[key] = replaced
        if rng.random() < 0.2:  # now and then a Service comes or goes
            extra = group("extra", 2, base=7)
            fe_key, fe = frontend("10.96.1.1", (1, extra))
            if extra.key in groups:
                del groups[extra.key], frontends[fe_key]
            else:
                groups[extra.key], frontends[fe_key] = extra, fe
        new = state_of(frontends.items(), groups.values(), old.clients.values())
        rec.apply(new, delta_between(old, new), cgroups)
        current[0] = new

    for _ in range(3):
        assert run_cycle(check, between=churn) == {}
    assert contents(maps) == P.plan(current[0], cgroups).expand()


def _first_key(maps, name, pred=lambda k: True):
    return next(k for k in sorted(maps[name].data) if pred(k))


def tamper_frontend_value(maps):
    key = _first_key(maps, "frontends")
    value = bytearray(maps["frontends"].data[key])
    value[-1] ^= 1
    maps["frontends"].data[key] = bytes(value)


def delete_frontend(maps):
    del maps["frontends"].data[_first_key(maps, "frontends")]


def add_foreign_frontend(maps):
    key = _first_key(maps, "frontends")
    maps["frontends"].data[key[:-1] + bytes([key[-1] ^ 0x5A])] = maps["frontends"].data[key]


def delete_group(maps):
    del maps["groups"].data[_first_key(maps, "groups")]


def delete_name(maps):
    del maps["names"].data[_first_key(maps, "names")]


def tamper_client(maps):
    key = _first_key(maps, "clients")
    maps["clients"].data[key] = bytes(len(maps["clients"].data[key]))


def tamper_endpoint_in_place(maps):
    data = maps["endpoints"].data
    a, b = sorted(data)[:2]
    data[a] = data[b] if data[a] != data[b] else bytes(len(data[a]))


def swap_two_endpoints_of_a_set(maps):
    data = maps["endpoints"].data
    sid = E.key_set_id(sorted(data)[0])
    a, b = E.ep_key_bytes(sid, 0), E.ep_key_bytes(sid, 1)
    data[a], data[b] = data[b], data[a]


def delete_endpoint(maps):
    del maps["endpoints"].data[_first_key(maps, "endpoints")]


def add_endpoint_past_the_set(maps):
    data = maps["endpoints"].data
    key = _first_key(maps, "endpoints")
    data[E.ep_key_bytes(E.key_set_id(key), 9)] = data[key]


def add_foreign_set(maps):
    data = maps["endpoints"].data
    data[E.ep_key_bytes(0x1234, 0)] = next(iter(data.values()))


def tamper_member(maps):
    data = maps["members"].data
    key = _first_key(maps, "members")
    data[key] = (int.from_bytes(data[key], "little") + 1).to_bytes(len(data[key]), "little")


def delete_member(maps):
    del maps["members"].data[_first_key(maps, "members")]


def clear_a_frontends_filter_bit(maps):
    bit = E.fe_filter_bit(_first_key(maps, "frontends"))
    key = E.U32.pack(bit >> 6)
    word = int.from_bytes(maps["fe_filter"].data[key], "little")
    maps["fe_filter"].data[key] = (word & ~(1 << (bit & 63))).to_bytes(8, "little")


DRIFTS = {
    "fe_filter": [clear_a_frontends_filter_bit],
    "frontends": [tamper_frontend_value, delete_frontend, add_foreign_frontend],
    "groups": [delete_group],
    "names": [delete_name],
    "clients": [tamper_client],
    "endpoints": [tamper_endpoint_in_place, swap_two_endpoints_of_a_set, delete_endpoint,
                  add_endpoint_past_the_set, add_foreign_set],
    "members": [tamper_member, delete_member],
}


@pytest.mark.parametrize("name,drift", [(name, f) for name, fs in DRIFTS.items() for f in fs],
                         ids=lambda v: v.__name__ if callable(v) else v)
@pytest.mark.parametrize("when", ["before the cycle", "mid-cycle"])
def test_a_change_behind_the_writers_back_is_found_within_a_cycle_and_a_full_reconcile_repairs(name, drift, when):
    maps, rec, state, cgroups = written()
    check = MapCheck(rec.writer, chunk=CHUNK)
    if when == "before the cycle":
        drift(maps)
        found = run_cycle(check)
    else:
        # Made while the cycle is half way: whether the map was read already or not, the
        # change is found by the end of the next cycle.
        steps = {"n": 0}

        def maybe_drift():
            steps["n"] += 1
            if steps["n"] == 15:
                drift(maps)

        found = run_cycle(check, between=maybe_drift)
        if not found:
            found = run_cycle(check)
    assert set(found) == {name}
    rec.full(state, cgroups)  # what the loop runs when the check reports drift
    check.restart()
    assert contents(maps) == P.plan(state, cgroups).expand()
    assert run_cycle(check) == {}


def test_the_mirror_of_sets_keeps_a_digest_per_endpoint_set_also_after_adoption():
    maps, rec, _, _ = written()
    written_digests = dict(rec.writer.sets["endpoints"].digests)
    assert set(written_digests) == set(rec.writer.sets["endpoints"].complete)
    adopted = PlanThenWrite(maps)  # a restarted agent reads the maps back
    assert adopted.writer.sets["endpoints"].digests == written_digests
    assert run_cycle(MapCheck(adopted.writer, chunk=CHUNK)) == {}
