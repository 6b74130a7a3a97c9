"""Upgrade across a map layout change, under load (SEMANTICS D1, D2): the previous release's agent
serves, the current one takes over with zero failed connections and without a flush.

Root only (marked `kernel`). Safety: see runtime_agent_helpers.py (lab namespaces and cgroup
subtree, our own bpffs directory, every agent stopped by pid and uninstalled by the `world`
fixture, also on failure). The previous release is the real one: its tree, taken from this
checkout's history with `git archive` into the test's temporary directory, runs its own agent
and compiles its own bpf/sock.c. When its layout version equals the current one (no layout
change since that release yet), the copy's version is set one lower, so the current agent always
meets pins of another layout, as a user upgrading across a layout change does.

What a user would check: clients connecting in a loop through the whole upgrade never fail and
never see a Service missing (the old maps serve until the new programs, with their maps already
written, replace the old ones in place); afterwards only the current layout's pins are left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from runtime_agent_helpers import REPO, manifests, write_atomically

from agent.datapath import layout

pytestmark = pytest.mark.kernel

#: The last release: the commit the layout version is counted from (PREAMBLE: "release commit").
PREVIOUS_RELEASE = "e0da696"


def previous_release(tmp_path) -> tuple[str, int]:
    """The previous release's tree (a copy) and the layout version its agent pins under."""
    tree = tmp_path / "previous-release"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS_RELEASE, "agent", "bpf"],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE} is not in this checkout's history "
                    f"({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    layout_py = tree / "agent" / "datapath" / "layout.py"
    text = layout_py.read_text()
    old = int(re.search(r"^LAYOUT_VERSION = (\d+)", text, re.M).group(1))
    if old == layout.LAYOUT_VERSION:
        old = layout.LAYOUT_VERSION - 1
        layout_py.write_text(re.sub(r"^LAYOUT_VERSION = \d+", f"LAYOUT_VERSION = {old}", text, flags=re.M))
    return str(tree), old


def test_upgrade_across_a_layout_change_under_load_loses_no_connection(world, tmp_path):
    old_tree, old_version = previous_release(tmp_path)
    pods = world.pods
    write_atomically(world.manifests_dir / "echo.yaml",
                     manifests([pods["mesh/echo-a"].ipv4, pods["mesh/echo-b"].ipv4]))
    old_agent = world.agent(cwd=old_tree)
    old_agent.wait_ready()
    old_maps = os.path.join(world.bpffs_dir, f"v{old_version}", "maps")
    assert os.path.isdir(old_maps) and "frontends" in os.listdir(old_maps)

    loops = [world.connect_loop(), world.connect_loop()]
    for loop in loops:
        loop.wait_for(20)
    # A rolling update: the old pod stops (detaching nothing), the new one starts on its pins.
    assert old_agent.stop(signal.SIGTERM) == 0
    new_agent = world.agent()
    new_agent.wait_ready()
    log = new_agent.log_text()
    assert "event=datapath.opened adopted=false" in log, log[-2000:]
    switched_at = time.time()
    for loop in loops:
        loop.wait_for(len(loop.lines()) + 50, timeout=60)
        loop.stop()

    lines = [line for loop in loops for line in loop.lines()]
    errors = [line for line in lines if "error" in line]
    assert not errors, f"{len(errors)} of {len(lines)} connections failed across the upgrade: {errors[:5]}"
    after = [line for line in lines if line["t"] > switched_at]
    assert len(after) >= 100 and {line["peer"] for line in after} == {"echo-a", "echo-b"}
    # Only the current layout's pins are left; the links now run the current programs.
    assert sorted(e for e in os.listdir(world.bpffs_dir) if e.startswith("v")) == [f"v{layout.LAYOUT_VERSION}"]


def affinity_manifests(endpoint_ips: list[str]) -> str:
    return manifests(endpoint_ips).replace(
        "  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]",
        "  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]\n  sessionAffinity: ClientIP")


def test_session_affinity_survives_an_upgrade_across_a_layout_change(world, tmp_path):
    from agent.datapath import bpfsys

    old_tree, old_version = previous_release(tmp_path)
    pods = world.pods
    text = affinity_manifests([pods["mesh/echo-a"].ipv4, pods["mesh/echo-b"].ipv4])
    assert "sessionAffinity: ClientIP" in text
    write_atomically(world.manifests_dir / "echo.yaml", text)
    old_agent = world.agent(cwd=old_tree)
    old_agent.wait_ready()
    before = world.connect_loop()
    before.wait_for(20)
    before.stop()
    chosen = {line.get("peer") for line in before.lines()}
    assert len(chosen) == 1 and None not in chosen, before.lines()[:5]
    with bpfsys.Map.open_pinned(os.path.join(world.bpffs_dir, f"v{old_version}", "maps", "affinity")) as old:
        remembered = old.items()
    assert len(remembered) == 1

    assert old_agent.stop(signal.SIGTERM) == 0
    new_agent = world.agent()
    new_agent.wait_ready()
    assert "carried=affinity:1" in new_agent.log_text(), new_agent.log_text()[-2000:]
    with bpfsys.Map.open_pinned(os.path.join(world.bpffs_dir, f"v{layout.LAYOUT_VERSION}", "maps", "affinity")) as new:
        assert new.items() == remembered  # before any new connection: carried, not re-learnt
    after = world.connect_loop()
    after.wait_for(20)
    after.stop()
    assert {line.get("peer") for line in after.lines()} == chosen, after.lines()[:5]
