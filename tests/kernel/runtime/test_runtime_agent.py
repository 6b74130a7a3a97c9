"""`meshlet run --manifests` end to end, through the kernel, in a lab of pods.

Root only (marked `kernel`). Safety: the lab (agent.lab.pods) makes its own network namespaces
(no route off the machine) and its own cgroup subtree; the agent runs as a subprocess with
`--cgroup-root` that subtree and its own bpffs directory /sys/fs/bpf/meshlet-test-<random>, and
attaches nowhere else. Every test removes its agent (by pid), detaches and unpins (`meshlet
uninstall` on its own bpffs and subtree), also on failure; the lab removes pods, netns, cgroups.

What a user would check:
- a change of the manifests reaches new connections, and none go back to the old endpoint
  (how fast, SEMANTICS B15, is the benchmark's event-to-map row: no test bounds a real agent's time);
- restarting the agent (SIGTERM, then SIGKILL) while a client connects in a loop costs zero
  failed connections (D1);
- a new agent that is still listing (its first sync held open) changes nothing: the maps keep
  serving the old state, and it is not ready (A15, D2).
"""

from __future__ import annotations

import os
import signal
import re
import time

import pytest
from runtime_agent_helpers import manifests, write_atomically

pytestmark = pytest.mark.kernel


def ip(world, name):
    return world.pods[f"mesh/{name}"].ipv4


def test_manifest_change_reaches_new_connections_and_none_go_back(world):
    write_atomically(world.manifests_dir / "echo.yaml", manifests([ip(world, "echo-a")]))
    agent = world.agent()
    agent.wait_ready()
    loop = world.connect_loop()
    loop.wait_for(10)
    assert {line.get("peer") for line in loop.lines()} == {"echo-a"}, loop.lines()[:5]

    for target in ("echo-b", "echo-a"):
        changed_at = time.time()
        write_atomically(world.manifests_dir / "echo.yaml", manifests([ip(world, target)]))
        after = loop.switched_to(target, changed_at)
        assert not [line for line in after if "error" in line], after
        first = next(i for i, line in enumerate(after) if line["peer"] == target)
        stragglers = [line for line in after[first:] if line["peer"] != target]
        assert not stragglers, stragglers
    code, status = agent.get("/healthz")
    assert code == 200, status
    # The start-up report of the kernel probe: this host has every feature (issue 5).
    assert re.search(r"event=kernel\.features kernel=\S+ enabled=\S+ disabled=- trace_channel=ringbuf$", agent.log_text(), re.M), \
        agent.log_text()[:2000]
    code, metrics = agent.get("/metrics")
    assert 'meshlet_kernel_feature{feature="set_retval"} 1.0' in metrics


def test_restart_with_sigterm_and_sigkill_loses_no_connection(world):
    write_atomically(world.manifests_dir / "echo.yaml", manifests([ip(world, "echo-a"), ip(world, "echo-b")]))
    agent = world.agent()
    agent.wait_ready()
    loop = world.connect_loop()
    loop.wait_for(10)

    assert agent.stop(signal.SIGTERM) == 0, agent.log_text()[-2000:]
    assert "detached=no" in agent.log_text()
    served_while_down = len(loop.lines())
    loop.wait_for(served_while_down + 20, timeout=30)  # no agent at all: the kernel keeps serving
    assert len(loop.lines()) >= served_while_down + 20

    agent = world.agent()
    agent.wait_ready()
    loop.wait_for(len(loop.lines()) + 10, timeout=30)  # connections while this agent serves
    agent.stop(signal.SIGKILL)
    agent = world.agent()
    agent.wait_ready()
    loop.wait_for(len(loop.lines()) + 20, timeout=30)
    lines = loop.lines()
    loop.stop()

    errors = [line for line in lines if "error" in line]
    assert not errors, f"{len(errors)} of {len(lines)} connections failed across restarts: {errors[:5]}"
    assert {line["peer"] for line in lines} == {"echo-a", "echo-b"}
    assert len(lines) > 50


def test_an_agent_still_listing_keeps_the_old_state_serving(world):
    write_atomically(world.manifests_dir / "echo.yaml", manifests([ip(world, "echo-a")]))
    first = world.agent()
    first.wait_ready()
    assert first.stop(signal.SIGTERM) == 0

    # The next agent's manifests directory is moved away as soon as the agent has checked it and
    # listens, while it still compiles its programs (seconds) and before its manifests source
    # first looks: its first list is then held open (a missing directory is not an empty list)
    # until we move the directory back. (A FIFO no longer holds it: a file that is not a regular
    # file is skipped alone, issue 13.)
    held_dir = world.manifests_dir.parent / "held"
    parked = world.manifests_dir.parent / "held-parked"
    held_dir.mkdir()
    write_atomically(held_dir / "echo.yaml", manifests([ip(world, "echo-b")]))
    second = world.agent(held_dir)
    second.wait_listening()
    os.rename(held_dir, parked)
    assert "event=manifests.read" not in second.log_text(), "the source read before the directory moved"
    second.wait_until(lambda: "event=attach.done" in second.log_text(), "adopted maps, programs attached")
    loop = world.connect_loop()
    loop.wait_for(50, timeout=30)
    code, ready = second.get("/readyz")
    assert code == 503 and "manifests" in " ".join(ready["reasons"]), ready
    lines = loop.lines()
    assert lines and all(line.get("peer") == "echo-a" for line in lines), \
        f"the old state stopped serving while the new agent listed: {lines[:5]}"

    # Let it finish: the directory comes back.
    os.rename(parked, held_dir)
    second.wait_until(lambda: second.get("/readyz")[0] == 200, "/readyz 200 after the first list")
    released_at = time.time()
    after = loop.switched_to("echo-b", released_at)
    first = next(i for i, line in enumerate(after) if line.get("peer") == "echo-b")
    assert {line.get("peer") for line in after[first:]} == {"echo-b"}, after[first:first + 5]
    assert not [line for line in loop.lines() if "error" in line]
