"""Maps changed behind the running agent's back are repaired by its periodic check.

Root only (marked `kernel`). Safety: see runtime_agent_helpers.py (own lab subtree, own bpffs
directory, the agent stopped by its pid and uninstalled, also on failure). The test writes only
to the pinned maps of its own agent's bpffs directory.

What a user would check: an endpoint entry rewritten in place, a frontend entry deleted and the
frontend's bit of the frontend filter cleared (as another tool could do) come back to what the agent wrote, on their own, within the check
period (`--map-check-period`, 2 s here: how soon is not bounded, only that it happens); new
connections then reach the Service's endpoint again; `meshlet_map_drift` counts it, by map.
"""

from __future__ import annotations

import time

import pytest
from runtime_agent_helpers import manifests, write_atomically

from agent.datapath import bpfsys, loader
from agent.datapath import entries as E

pytestmark = pytest.mark.kernel

#: Generous: the check compares every entry within 2 s here; a loaded CI machine is slow.
REPAIR_TIMEOUT = 60.0


def ip(world, name):
    return world.pods[f"mesh/{name}"].ipv4


def wait_for_value(m: bpfsys.Map, key: bytes, value: bytes, agent) -> float:
    """Poll the map until `key` holds `value` again; returns when that was seen."""
    deadline = time.monotonic() + REPAIR_TIMEOUT
    while time.monotonic() < deadline:
        if m.lookup(key) == value:
            return time.time()
        agent._alive()
        time.sleep(0.05)
    raise AssertionError(f"map {m.name} not repaired within {REPAIR_TIMEOUT}s:\n{agent.log_text()[-3000:]}")


def test_entries_changed_or_deleted_behind_the_agents_back_are_repaired_by_the_periodic_check(world):
    write_atomically(world.manifests_dir / "echo.yaml", manifests([ip(world, "echo-a")]))
    agent = world.agent(extra=["--map-check-period", "2"])
    agent.wait_ready()
    loop = world.connect_loop()
    loop.wait_for(10)
    assert {line.get("peer") for line in loop.lines()} == {"echo-a"}, loop.lines()[:5]

    with bpfsys.Map.open_pinned(loader.map_pin(world.bpffs_dir, "endpoints")) as endpoints, \
            bpfsys.Map.open_pinned(loader.map_pin(world.bpffs_dir, "frontends")) as frontends:
        (ep_key, ep_value), = endpoints.items().items()
        (fe_key, fe_value), = frontends.items().items()

        # 1. The endpoint rewritten in place to echo-b's address: new connections would go there.
        endpoints.update(ep_key, E.addr16(ip(world, "echo-b")) + ep_value[16:])
        repaired_at = wait_for_value(endpoints, ep_key, ep_value, agent)
        loop.wait_for(len(loop.lines()) + 20, timeout=30)
        after = [line for line in loop.lines() if line["t"] > repaired_at]
        assert after and {line.get("peer") for line in after} == {"echo-a"}, after[:5]

        # 2. The frontend deleted: connections to the Service would not be translated.
        assert frontends.delete(fe_key)
        repaired_at = wait_for_value(frontends, fe_key, fe_value, agent)
        loop.wait_for(len(loop.lines()) + 20, timeout=30)
        after = [line for line in loop.lines() if line["t"] > repaired_at]
        assert after and {line.get("peer") for line in after} == {"echo-a"}, after[:5]

        # 3. The frontend's bit of the frontend filter cleared: connects would skip the lookup.
        with bpfsys.Map.open_pinned(loader.map_pin(world.bpffs_dir, "fe_filter")) as fe_filter:
            word_key = E.U32.pack(E.fe_filter_bit(fe_key) >> 6)
            word = fe_filter.lookup(word_key)
            fe_filter.update(word_key, bytes(8))
            repaired_at = wait_for_value(fe_filter, word_key, word, agent)
        loop.wait_for(len(loop.lines()) + 20, timeout=30)
        after = [line for line in loop.lines() if line["t"] > repaired_at]
        assert after and {line.get("peer") for line in after} == {"echo-a"}, after[:5]

    code, metrics = agent.get("/metrics")
    for name in ("endpoints", "frontends", "fe_filter"):
        assert f'meshlet_map_drift_total{{map="{name}"}}' in metrics, name
    assert "event=check.drift" in agent.log_text()
    code, health = agent.get("/healthz")
    assert code == 200, health
