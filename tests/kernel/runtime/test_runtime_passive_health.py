"""Passive health through the real agent (SEMANTICS A17): on by default, `--passive-health off`
turns it off for every Service, and the agent exports its metrics.

Root only (marked `kernel`); safety as in test_runtime_agent.py (the `world` fixture). One of the
Service's two endpoints is the client pod's own address, where nothing listens: its handshakes
end in a reset.
"""

from __future__ import annotations

import pytest
from runtime_agent_helpers import CLUSTER_IP, manifests, write_atomically

from agent.datapath import dump
from agent.datapath import layout as L

pytestmark = pytest.mark.kernel

F = L.HEALTH_FAILURES


@pytest.mark.parametrize("flags, on", [([], True), (["--passive-health", "off"], False)], ids=["default", "off"])
def test_the_agent_switch_decides_whether_failing_endpoints_are_ejected(world, flags, on):
    client = world.pods["default/client"]
    dead = client.ipv4  # nothing listens on the client pod: a reset for every handshake
    write_atomically(world.manifests_dir / "echo.yaml", manifests([world.pods["mesh/echo-a"].ipv4, dead]))
    agent = world.agent(extra=flags)
    agent.wait_ready()

    result = client.client("tcp", CLUSTER_IP, 80, 60)
    refused = result["errors"].get("ECONNREFUSED", 0)
    assert set(result["errors"]) <= {"ECONNREFUSED"} and result["peers"].get("echo-a", 0) == 60 - refused, result
    view = dump.read_maps(world.bpffs_dir)
    assert [g.passive_health for g in view.groups] == [on]
    records = [h for h in view.health if h.endpoint == f"{dead}:8080"]
    if on:
        assert len(records) == 1, view.health
        # F failures eject it; any later one is a re-ejection after its back-off ended.
        assert refused <= F + records[0].ejections - 1, (result, records)
    else:
        # Uniform picks: ~30 of 60 go to the dead endpoint; with passive health at most a few.
        assert refused > F + 3 and records == [], (result, records)
    code, metrics = agent.get("/metrics")
    assert code == 200 and "meshlet_passive_health_ejected_endpoints" in metrics
