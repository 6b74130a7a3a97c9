"""Passive health through the real agent (SEMANTICS A17): on by default, `--passive-health off`
turns it off for every Service, the agent exports its metrics, and an ejection outlives the agent
process that saw it (a restart, after SIGTERM or SIGKILL, on the same pins).

Root only (marked `kernel`); safety as in test_runtime_agent.py (the `world` fixture). One of the
Service's two endpoints is the client pod's own address, where nothing listens: its handshakes
end in a reset.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from runtime_agent_helpers import CLUSTER_IP, REPO, manifests, write_atomically

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


#: Ejections to wait for before the restart: back-offs of 1, 2 and then 4 s (doubling), so the
#: endpoint is ejected through most restarts, and re-ejected at once after each back-off.
EJECTIONS_BEFORE_RESTART = 3


def dumped_health(bpffs: str, endpoint: str) -> dict | None:
    """The endpoint's row of `meshlet maps dump health -o json` (the CLI: pins only)."""
    done = subprocess.run([sys.executable, "-m", "agent", "maps", "dump", "health", "--bpffs", bpffs, "-o", "json"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [row for row in json.loads(done.stdout)["health"] if row["endpoint"] == endpoint]
    return rows[0] if rows else None


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_an_agent_restart_keeps_the_ejection_under_traffic(world, stop_signal):
    client = world.pods["default/client"]
    dead = client.ipv4  # nothing listens on the client pod: a reset for every handshake
    dead_endpoint = f"{dead}:8080"
    write_atomically(world.manifests_dir / "echo.yaml", manifests([world.pods["mesh/echo-a"].ipv4, dead]))
    first = world.agent()
    first.wait_ready()
    loop = world.connect_loop()  # connects all along: before, during and after the restart

    deadline = time.monotonic() + 120
    while (before := dumped_health(world.bpffs_dir, dead_endpoint)) is None or \
            before["ejections"] < EJECTIONS_BEFORE_RESTART:
        assert time.monotonic() < deadline, f"not ejected {EJECTIONS_BEFORE_RESTART} times: {before}"
        time.sleep(0.2)  # polling the maps for the kernel's progress, not synchronising
    first.stop(stop_signal)
    assert first.proc.returncode == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
    down = dumped_health(world.bpffs_dir, dead_endpoint)
    assert down is not None and down["ejections"] >= before["ejections"], "with no agent, the pins keep it"

    second = world.agent()  # a new process on the same pins
    second.wait_ready()
    assert "event=datapath.opened adopted=true" in second.log_text(), second.log_text()[-2000:]
    after = dumped_health(world.bpffs_dir, dead_endpoint)
    assert after is not None and after["ejections"] >= before["ejections"], (before, after)
    loop.wait_for(len(loop.lines()) + 100, timeout=60)
    loop.stop()
    final = dumped_health(world.bpffs_dir, dead_endpoint)

    lines = loop.lines()
    errors = [line["error"] for line in lines if "error" in line]
    assert set(errors) <= {"ECONNREFUSED"}, errors
    assert {line["peer"] for line in lines if "peer" in line} == {"echo-a"}
    # F failures ejected it; since then every failure was a re-ejection once a back-off ended.
    # A record lost in the restart would have let F more connections fail before the next one.
    assert final["ejections"] >= after["ejections"]
    assert len(errors) <= F + final["ejections"] - 1, (len(errors), final)
