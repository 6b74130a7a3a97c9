"""The reconciler without the kernel: write order, incremental == full, overflow, failed writes,
and adoption of maps that drifted (a set with an index missing, entries in a form we never write).

Maps here are `DictMap`s (an in-memory stand-in for kernel hash maps, named as such) sharing one
operation log. The central check replays that log one operation at a time and asserts what a
concurrent connect() could observe after every single write: each frontend has its filter bit
set and names only groups that exist, and each group names a complete endpoint set (and its
members, with affinity).
"""

import random

import pytest

from agent.datapath import entries as E
from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.datapath import reconcile as R
from agent.datapath.reconcile import DictMap, MapFullError, Reconciler, dict_maps
from agent.model import (
    BackendGroup,
    ClientPod,
    DesiredState,
    Endpoint,
    FrontendKey,
    FrontendState,
    GroupKey,
    StateDelta,
    Verdict,
    WeightedGroup,
)


def make_maps(log, **sizes):
    return dict_maps(10_000, log, **sizes)


def contents(maps):
    return {name: dict(m.data) for name, m in maps.items()}


def group(svc, n_endpoints, base=0, affinity=0, family=4, verdict=None):
    key = GroupKey("shop", svc, "http", "TCP", family)
    eps = tuple(sorted(Endpoint(f"10.244.{base}.{i + 1}" if family == 4 else f"fd00:244::{base}:{i + 1}", 8080)
                       for i in range(n_endpoints)))
    if verdict is None:
        verdict = Verdict.FORWARD if eps else Verdict.REJECT
    return BackendGroup(key, eps if verdict == Verdict.FORWARD else (), verdict, affinity)


def frontend(address, *shares, scope=""):
    return FrontendKey(address, 80, "TCP", scope), FrontendState(
        "shop", "web", "http", tuple(WeightedGroup(w, g.key if g else None) for w, g in shares))


def state_of(frontends, groups, clients=()):
    return DesiredState(frontends=dict(frontends), groups={g.key: g for g in groups},
                        clients={c.uid: c for c in clients})


def delta_between(old: DesiredState, new: DesiredState) -> StateDelta:
    def changed(a, b):
        return frozenset(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    return StateDelta(frontends=changed(old.frontends, new.frontends), groups=changed(old.groups, new.groups),
                      clients=changed(old.clients, new.clients))


def reader_problems(data) -> list[str]:
    """What a connect() would trip over in these map contents (empty list = consistent)."""
    problems = []
    words = data["fe_filter"]
    for fkey, fval in data["frontends"].items():
        bit = E.fe_filter_bit(fkey)
        word = words.get(E.U32.pack(bit >> 6))
        if word is None or not (E.U64.unpack(word)[0] >> (bit & 63)) & 1:
            problems.append("a frontend's filter bit is clear: its connects would go untranslated")
        value = L.FeValue.from_buffer_copy(fval)
        for i in range(value.nslots):
            gid = value.slots[i].group_id
            if not gid:
                continue
            graw = data["groups"].get(bytes(L.U64(gid)))
            if graw is None:
                problems.append(f"frontend names missing group {gid:#x}")
                continue
            # connect() picks from the slot's copy of the group value; still_usable() and sockops
            # read the group entry: both must name whole sets.
            for what, g in (("group", L.GroupValue.from_buffer_copy(graw)), ("slot copy of group", value.slots[i])):
                if g.verdict == L.VERDICT_NO_GROUP:
                    problems.append(f"frontend slot has no copy of group {gid:#x}")
                for index in range(g.count):
                    ep = data["endpoints"].get(bytes(L.EpKey(set_id=g.set_id, index=index)))
                    if ep is None:
                        problems.append(f"{what} {gid:#x} names a set missing endpoint #{index}")
                    elif g.affinity_timeout_s and E.member_key_bytes(
                            g.set_id, L.EpValue.from_buffer_copy(ep)) not in data["members"]:
                        problems.append(f"{what} {gid:#x} with affinity misses a member")
    return problems


def replay_and_check(before, log):
    """Apply the logged operations one at a time to `before`, checking the reader's view each time."""
    data = {name: dict(entries) for name, entries in before.items()}
    for op in log:
        if op[0] == "update":
            _, name, key, value = op
            if name == "endpoints" and key in data[name]:
                assert data[name][key] == value, "an endpoint entry of a set was changed in place"
            data[name][key] = value
        else:
            data[op[1]].pop(op[2], None)
        assert reader_problems(data) == [], f"after {op[0]} {op[1]}"


class PlanThenWrite:
    """The facade's order (agent.datapath.Datapath.reconcile): plan first, then hand the plan to
    the writer, over in-memory maps."""

    def __init__(self, maps):
        self.planner, self.writer = P.Planner(), Reconciler(maps)

    def full(self, state, pod_cgroups):
        return self.writer.full(self.planner.full(state, pod_cgroups))

    def apply(self, state, delta, pod_cgroups):
        return self.writer.apply(self.planner.change(state, delta, pod_cgroups))

    def counts(self):
        return self.writer.counts()


A, B, C = group("a", 3), group("b", 2, base=1), group("c", 1, base=2, affinity=30)


def test_a_new_frontend_is_written_after_its_groups_and_their_endpoints():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    state = state_of([frontend("10.96.0.1", (1, A), (3, B))], [A, B])
    rec.full(state, {})
    order = [name for op, name, *_ in log if op == "update" and name != "names"]
    assert order.index("frontends") > max(i for i, n in enumerate(order) if n in ("groups", "endpoints"))
    assert order.index("groups") > max(i for i, n in enumerate(order) if n == "endpoints")
    assert contents(maps) == P.plan(state, {}).expand()


def test_an_endpoint_change_writes_the_new_set_flips_the_group_then_deletes_the_old_set():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    s1 = state_of([frontend("10.96.0.1", (1, A))], [A])
    rec.full(s1, {})
    A2 = group("a", 4)
    s2 = state_of([frontend("10.96.0.1", (1, A2))], [A2])
    before, log[:] = contents(maps), []
    stats = rec.apply(s2, delta_between(s1, s2), {})
    kinds = [(op, name) for op, name, *_ in log if name != "names"]
    # The frontend's slot copies the group's value (struct fe_slot): rewritten after the group
    # flipped and before the old set goes.
    assert kinds == [("update", "endpoints")] * 4 + [("update", "groups"), ("update", "frontends")] \
        + [("delete", "endpoints")] * 3
    assert stats.ops[("frontends", "update")] == 1
    replay_and_check(before, log)
    assert contents(maps) == P.plan(s2, {}).expand()


def test_a_group_change_rewrites_every_frontend_entry_that_copies_it_and_only_those():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    fes = [frontend("10.96.0.1", (1, A)), frontend("10.96.0.1", (1, A), (1, B), scope="team-a"),
           frontend("10.96.0.2", (1, B), (2, A)), frontend("10.96.0.3", (1, B))]
    s1 = state_of(fes, [A, B])
    rec.full(s1, {})
    # 10.96.0.2 stops using A: a later change of A must still leave every entry exact.
    s2 = state_of(fes[:2] + [frontend("10.96.0.2", (1, B))] + fes[3:], [A, B])
    rec.apply(s2, delta_between(s1, s2), {})
    for generation, n in enumerate((4, 1, 0)):  # grow, shrink, empty (rejecting)
        s_old = s2
        A_next = group("a", n, base=10 + generation)
        s2 = state_of(list(s_old.frontends.items()), [A_next, B])
        before, log[:] = contents(maps), []
        rec.apply(s2, delta_between(s_old, s2), {})
        replay_and_check(before, log)
        assert contents(maps) == P.plan(s2, {}).expand(), n  # incremental == full, copies included
        rewritten = sorted((E.FE_KEY.unpack(key)[0][12:], E.frontend_key_scope_id(key))
                           for op, name, key, *_ in log if op == "update" and name == "frontends")
        # 10.96.0.1 and its team-a view; never .2 (no longer A's) or .3
        assert rewritten == [(bytes([10, 96, 0, 1]), 0), (bytes([10, 96, 0, 1]), P.scope_id("team-a"))], n


def filter_has(maps, key) -> bool:
    bit = E.fe_filter_bit(key)
    word = maps["fe_filter"].data.get(E.U32.pack(bit >> 6), bytes(8))
    return bool((E.U64.unpack(word)[0] >> (bit & 63)) & 1)


def test_the_frontend_filter_bit_is_set_before_a_new_frontend_and_cleared_after_the_last_goes():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    s0 = state_of([], [A])
    rec.full(s0, {})
    default, scoped = frontend("10.96.0.1", (1, A)), frontend("10.96.0.1", (1, A), scope="team-a")
    key = P.frontend_key_bytes("10.96.0.1", 80, "TCP", "")
    assert not filter_has(maps, key)
    s1 = state_of([default, scoped], [A])
    before, log[:] = contents(maps), []
    rec.apply(s1, delta_between(s0, s1), {})
    replay_and_check(before, log)  # after every write: no frontend in the map with its bit clear
    assert filter_has(maps, key)
    # Both entries share the bit (same address, port, protocol): it stays while one is left...
    s2 = state_of([default], [A])
    rec.apply(s2, delta_between(s1, s2), {})
    assert filter_has(maps, key)
    # ...and is cleared after the last one is deleted.
    s3 = state_of([], [A])
    before, log[:] = contents(maps), []
    rec.apply(s3, delta_between(s2, s3), {})
    replay_and_check(before, log)
    assert [(op, name) for op, name, *_ in log if name in ("frontends", "fe_filter")] == [
        ("delete", "frontends"), ("update", "fe_filter")]
    assert not filter_has(maps, key) and contents(maps) == P.plan(s3, {}).expand()


def test_the_opt_out_flag_is_on_before_an_opted_out_pod_appears_and_off_when_none_is_left():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    quiet, busy = ClientPod("u1", "quiet", "p1", skip=True), ClientPod("u2", "shop", "p2", skip=False)
    cgroups = {"u1": 1001, "u2": 1002}
    config_key = bytes(L.U32(L.CONFIG_KEY))
    state = state_of([frontend("10.96.0.1", (1, A))], [A], [busy])
    rec.full(state, cgroups)
    assert L.ConfigValue.from_buffer_copy(maps["config"].data[config_key]).flags == 0
    log[:] = []
    new = state_of([frontend("10.96.0.1", (1, A))], [A], [busy, quiet])
    rec.apply(new, delta_between(state, new), cgroups)
    writes = [(op[1], op[2]) for op in log if op[0] == "update"]
    assert writes.index(("config", config_key)) < writes.index(("clients", bytes(L.U64(1001))))
    assert L.ConfigValue.from_buffer_copy(maps["config"].data[config_key]).flags == L.CONFIG_CLIENT_SKIPS
    rec.apply(state, delta_between(new, state), cgroups)
    assert L.ConfigValue.from_buffer_copy(maps["config"].data[config_key]).flags == 0
    assert bytes(L.U64(1001)) not in maps["clients"].data


def test_scoped_entries_are_written_before_the_default_entry_that_announces_them():
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    s1 = state_of([frontend("10.96.0.1", (1, A))], [A, B])
    rec.full(s1, {})
    s2 = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.1", (1, B), scope="team-a")], [A, B])
    log[:] = []
    rec.apply(s2, delta_between(s1, s2), {})
    fe_writes = [L.FeKey.from_buffer_copy(key).scope for op, name, key, *_ in log
                 if op == "update" and name == "frontends"]
    assert fe_writes == [P.scope_id("team-a"), 0]


def random_state(rng: random.Random) -> DesiredState:
    groups = [group(f"s{i}", rng.randint(0, 4), base=rng.randint(0, 3), affinity=rng.choice([0, 0, 10]))
              for i in range(6)]
    frontends = []
    for i in range(5):
        shares = [(rng.randint(0, 5), rng.choice(groups + [None])) for _ in range(rng.randint(0, 3))]
        frontends.append(frontend(f"10.96.0.{i}", *shares))
        if rng.random() < 0.4:
            frontends.append(frontend(f"10.96.0.{i}", (1, rng.choice(groups)), scope=rng.choice(["team-a", "team-b"])))
    used = {share.group for _, fs in frontends for share in fs.split if share.group}
    clients = [ClientPod(f"u{i}", rng.choice(["team-a", "team-b", "default"]), f"p{i}", skip=rng.random() < 0.2)
               for i in range(rng.randint(0, 3))]
    return state_of(frontends, [g for g in groups if g.key in used], clients)


# A chunk of 3 entries makes every set, and the frontends, span several batch calls.
@pytest.mark.parametrize("chunk", [R.WRITE_CHUNK, 3])
@pytest.mark.parametrize("seed", range(25))
def test_incremental_writes_equal_the_full_plan_and_readers_never_see_a_half_change(seed, chunk, monkeypatch):
    monkeypatch.setattr(R, "WRITE_CHUNK", chunk)
    rng = random.Random(seed)
    log = []
    maps = make_maps(log)
    rec = PlanThenWrite(maps)
    cgroups = {f"u{i}": 1000 + i for i in range(3)}
    state = random_state(rng)
    rec.full(state, cgroups)
    for step in range(8):
        new = random_state(rng)
        before, log[:] = contents(maps), []
        if step % 3 == 2:
            rec.full(new, cgroups)
        else:
            rec.apply(new, delta_between(state, new), cgroups)
        replay_and_check(before, log)
        assert contents(maps) == P.plan(new, cgroups).expand(), f"step {step}"
        assert rec.counts() == {name: len(entries) for name, entries in contents(maps).items() if name in L.PLANNED_MAPS}, "room accounting"
        state = new


def test_full_reconcile_adopts_pinned_state_and_writes_nothing_when_it_matches():
    log = []
    maps = make_maps(log)
    state = state_of([frontend("10.96.0.1", (1, A), (1, C))], [A, C])
    PlanThenWrite(maps).full(state, {})
    log[:] = []
    second = PlanThenWrite(maps)  # a restarted agent on the same (pinned) maps
    stats = second.full(state, {})
    assert log == [] and sum(stats.ops.values()) == 0


def test_a_group_that_does_not_fit_keeps_its_old_state_and_so_do_its_frontends():
    log = []
    maps = make_maps(log, endpoints=6)
    rec = PlanThenWrite(maps)
    s1 = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, B))], [A, B])
    rec.full(s1, {})  # 5 endpoints of 6
    before = contents(maps)
    big = group("d", 4, base=3)  # needs 4 more: no room
    B2 = group("b", 1, base=1)
    s2 = state_of([frontend("10.96.0.1", (1, big)), frontend("10.96.0.2", (1, B2))], [big, B2])
    with pytest.raises(MapFullError) as err:
        rec.apply(s2, delta_between(s1, s2), {})
    message = str(err.value)
    assert "map endpoints is full (--map-size endpoints=" in message and "shop/d:http/tcp/v4" in message
    after = contents(maps)
    # The frontend that needed the big group still has its old split; the other one moved on.
    key1 = P.frontend_key_bytes("10.96.0.1", 80, "TCP", "")
    assert after["frontends"][key1] == before["frontends"][key1]
    assert P.group_key_bytes(big.key) not in after["groups"]
    assert after["groups"][P.group_key_bytes(B2.key)] == P.plan_group(B2).value
    assert reader_problems(after) == []
    # The old state of `a` is still in use, so it was not swept.
    assert after["groups"][P.group_key_bytes(A.key)] == before["groups"][P.group_key_bytes(A.key)]


def test_a_frontend_that_does_not_fit_is_refused_whole_and_named():
    maps = make_maps([], frontends=1)
    rec = PlanThenWrite(maps)
    state = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, A))], [A])
    with pytest.raises(MapFullError, match=r"map frontends is full \(--map-size frontends=\d+\).*10.96.0.2:80/tcp.*hint: .*--map-size frontends=\d+"):
        rec.full(state, {})
    assert len(maps["frontends"].data) == 1 and reader_problems(contents(maps)) == []


class FaultyMap(DictMap):
    """A DictMap whose `fail_on`-th batch update fails half way (as a kernel batch can)."""

    def __init__(self, *args, fail_on: int, **kw):
        super().__init__(*args, **kw)
        self.calls = 0
        self.fail_on = fail_on

    def update_batch(self, entries):
        self.calls += 1
        if self.calls == self.fail_on:
            super().update_batch(entries[: len(entries) // 2])
            raise OSError(12, "injected failure")  # ENOMEM
        super().update_batch(entries)


@pytest.mark.parametrize("failing", ["endpoints", "groups", "frontends"])
def test_a_failed_write_leaves_readers_consistent_and_the_next_full_reconcile_repairs(failing):
    log = []
    maps = make_maps(log)
    maps[failing] = FaultyMap(failing, 10_000, log, fail_on=2)
    rec = PlanThenWrite(maps)
    s1 = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, B))], [A, B])
    rec.full(s1, {})
    A2, B2 = group("a", 2, base=5), group("b", 3, base=6)
    s2 = state_of([frontend("10.96.0.1", (1, A2)), frontend("10.96.0.3", (1, B2), (1, C))], [A2, B2, C])
    before, log[:] = contents(maps), []
    with pytest.raises(OSError, match="injected"):
        rec.apply(s2, delta_between(s1, s2), {})
    replay_and_check(before, log)
    rec.full(s2, {})
    assert contents(maps) == P.plan(s2, {}).expand()


def test_a_changed_group_that_does_not_fit_keeps_its_old_set_and_its_frontends_their_old_split():
    maps = make_maps([], endpoints=5)
    rec = PlanThenWrite(maps)
    s1 = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, B))], [A, B])
    rec.full(s1, {})  # 3 + 2 endpoints: full
    before = contents(maps)
    A2 = group("a", 3, base=7)  # a new set of 3 next to the old one: no room until the old goes
    s2 = state_of([frontend("10.96.0.1", (1, A2), (1, None)), frontend("10.96.0.2", (1, B))], [A2, B])
    with pytest.raises(MapFullError, match="shop/a:http/tcp/v4"):
        rec.apply(s2, delta_between(s1, s2), {})
    assert contents(maps) == before, "nothing of the group or of the frontend needing it was written"


# --- sets: adoption, drift, deletion from the count, overflow per set ---------------------------


def set_id_of(g) -> int:
    return P.plan_group(g).set_id


def set_keys(g) -> set[bytes]:
    return {E.ep_key_bytes(set_id_of(g), i) for i in range(len(g.endpoints))}


def member_keys(g) -> set[bytes]:
    planned = P.plan_group(g)
    return {key for key, _ in E.MEMBER_SETS.entries(planned.set_id, planned.members)}


def test_a_pinned_set_with_an_index_missing_is_rewritten_whole_by_a_full_reconcile():
    log = []
    maps = make_maps(log, endpoints=5, members=2)  # room for the missing entries only
    state = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, C))], [A, C])
    PlanThenWrite(maps).full(state, {})
    planned = P.plan(state, {}).expand()
    sid = set_id_of(A)
    # Drift behind the agent's back: index 1 of a's set gone, a stray index 7 next to it; c's
    # only member gone and a member key with a nonzero pad byte (never written by us) added.
    del maps["endpoints"].data[E.ep_key_bytes(sid, 1)]
    maps["endpoints"].data[E.ep_key_bytes(sid, 7)] = planned["endpoints"][E.ep_key_bytes(sid, 0)]
    (c_member, c_index), = planned["members"].items()
    del maps["members"].data[c_member]
    foreign = c_member[:-1] + b"\x01"
    maps["members"].data[foreign] = c_index
    assert reader_problems(contents(maps)), "the drift is visible to a reader"

    log[:] = []
    rec = PlanThenWrite(maps)  # a restarted agent adopts the drifted maps
    stats = rec.full(state, {})
    assert contents(maps) == planned and reader_problems(contents(maps)) == []
    # The sets were rewritten whole under their own keys (no group flip, nothing else touched),
    # then the keys outside them deleted.
    writes = {(op, name, key) for op, name, key, *_ in log}
    assert writes == ({("update", "endpoints", k) for k in set_keys(A)} | {("update", "members", c_member)}
                      | {("delete", "endpoints", E.ep_key_bytes(sid, 7)), ("delete", "members", foreign)})
    assert stats.ops[("groups", "update")] == 0
    assert rec.counts() == {name: len(entries) for name, entries in contents(maps).items() if name in L.PLANNED_MAPS}


def test_a_pinned_set_whose_content_changed_in_place_is_rewritten_by_a_full_reconcile():
    log = []
    maps = make_maps(log)
    state = state_of([frontend("10.96.0.1", (1, A))], [A])
    rec = PlanThenWrite(maps)
    rec.full(state, {})
    planned = P.plan(state, {}).expand()
    key = E.ep_key_bytes(set_id_of(A), 2)
    maps["endpoints"].data[key] = planned["endpoints"][E.ep_key_bytes(set_id_of(A), 0)]  # same keys, other value
    log[:] = []
    rec.full(state, {})
    assert contents(maps) == planned
    assert {(op, name, k) for op, name, k, *_ in log} == {("update", "endpoints", k) for k in set_keys(A)}


def test_a_drifted_set_no_group_names_is_deleted_whole():
    maps = make_maps([])
    state = state_of([frontend("10.96.0.1", (1, A))], [A])
    PlanThenWrite(maps).full(state, {})
    leftover = group("gone", 4, base=9)
    planned = P.plan_group(leftover)
    entries = dict(E.ENDPOINT_SETS.entries(planned.set_id, planned.endpoints))
    del entries[E.ep_key_bytes(planned.set_id, 2)]  # with a hole, as a crash could leave it
    maps["endpoints"].data.update(entries)
    PlanThenWrite(maps).full(state, {})
    assert contents(maps) == P.plan(state, {}).expand()


def test_a_stale_set_is_deleted_by_the_keys_its_count_gives_also_after_a_restart():
    log = []
    maps = make_maps(log)
    s1 = state_of([frontend("10.96.0.1", (1, A)), frontend("10.96.0.2", (1, C))], [A, C])
    PlanThenWrite(maps).full(s1, {})
    A2, C2 = group("a", 2, base=5), group("c", 2, base=6, affinity=30)
    s2 = state_of([frontend("10.96.0.1", (1, A2)), frontend("10.96.0.2", (1, C2))], [A2, C2])
    before, log[:] = contents(maps), []
    rec = PlanThenWrite(maps)  # the mirror comes from the maps: each set from its entries
    rec.full(s2, {})
    replay_and_check(before, log)
    deleted = {(name, key) for op, name, key, *_ in log if op == "delete"}
    assert deleted == ({("endpoints", k) for k in set_keys(A) | set_keys(C)}
                       | {("members", k) for k in member_keys(C)})
    # The same through an incremental change: c's set goes when c loses its endpoints.
    C3 = group("c", 0, affinity=30)
    s3 = state_of([frontend("10.96.0.1", (1, A2)), frontend("10.96.0.2", (1, C3))], [A2, C3])
    before, log[:] = contents(maps), []
    rec.apply(s3, delta_between(s2, s3), {})
    replay_and_check(before, log)
    deleted = {(name, key) for op, name, key, *_ in log if op == "delete"}
    assert deleted == {("endpoints", k) for k in set_keys(C2)} | {("members", k) for k in member_keys(C2)}
    assert contents(maps) == P.plan(s3, {}).expand()


def test_overflow_is_counted_per_set_and_a_set_that_does_not_fit_is_not_written_at_all():
    maps = make_maps([], endpoints=5)
    rec = PlanThenWrite(maps)
    a3, b3, c2 = group("a", 3), group("b", 3, base=1), group("c", 2, base=2)
    state = state_of([frontend("10.96.0.1", (1, a3)), frontend("10.96.0.2", (1, b3)),
                      frontend("10.96.0.3", (1, c2))], [a3, b3, c2])
    with pytest.raises(MapFullError, match=r"map endpoints is full.*shop/b:http/tcp/v4") as err:
        rec.full(state, {})
    assert "shop/a" not in str(err.value) and "shop/c" not in str(err.value)
    after = contents(maps)
    # a fit (3 of 5), b's 3 did not (no entry of it written), c's 2 still did after b.
    assert set(after["endpoints"]) == set_keys(a3) | set_keys(c2)
    assert P.frontend_key_bytes("10.96.0.2", 80, "TCP", "") not in after["frontends"]
    assert reader_problems(after) == []

    # Room freed by deleting a: the retry writes b (a's set is deleted only at the end, so the
    # first try after the change still has no room for b).
    state = state_of([frontend("10.96.0.2", (1, b3)), frontend("10.96.0.3", (1, c2))], [b3, c2])
    with pytest.raises(MapFullError, match="shop/b"):
        rec.full(state, {})
    rec.full(state, {})
    assert contents(maps) == P.plan(state, {}).expand()


def test_a_group_whose_set_is_already_in_the_map_needs_no_room_for_it():
    maps = make_maps([], endpoints=3, members=3)
    rec = PlanThenWrite(maps)
    a3 = group("a", 3)
    s1 = state_of([frontend("10.96.0.1", (1, a3))], [a3])
    rec.full(s1, {})  # endpoints map full
    sticky = group("a", 3, affinity=60)  # same set, now with affinity: its members are new
    assert set_id_of(sticky) == set_id_of(a3)
    s2 = state_of([frontend("10.96.0.1", (1, sticky))], [sticky])
    rec.apply(s2, delta_between(s1, s2), {})
    assert contents(maps) == P.plan(s2, {}).expand()


def test_a_group_whose_members_do_not_fit_keeps_its_old_state_and_writes_no_endpoint():
    maps = make_maps([], members=1)
    rec = PlanThenWrite(maps)
    sticky = group("d", 2, base=4, affinity=60)
    state = state_of([frontend("10.96.0.1", (1, sticky)), frontend("10.96.0.2", (1, A))], [sticky, A])
    with pytest.raises(MapFullError, match=r"map members is full \(--map-size members=\d+\).*shop/d"):
        rec.full(state, {})
    after = contents(maps)
    assert set(after["endpoints"]) == set_keys(A) and after["members"] == {}
    assert P.group_key_bytes(sticky.key) not in after["groups"] and reader_problems(after) == []
