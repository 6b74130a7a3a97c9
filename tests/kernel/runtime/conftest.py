"""Fixtures of the runtime's kernel tests: a lab of pods, and a world of agents and clients.

Root only. Safety: see runtime_agent_helpers.py; the `world` fixture stops every agent and
client it started (by pid), runs `meshlet uninstall` on its own bpffs directory and lab subtree,
and removes that directory, also when the test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

import pytest
from runtime_agent_helpers import REPO, AgentProcess, ConnectLoop

from agent.lab.pods import Lab, unique_lab_name


@pytest.fixture(scope="module")
def lab():
    with Lab(unique_lab_name("rt")) as lab:
        lab.add_pod("default", "client", echo_ports=())
        lab.add_pod("mesh", "echo-a")
        lab.add_pod("mesh", "echo-b")
        yield lab


@pytest.fixture
def world(lab, tmp_path):
    """A manifests dir, a bpffs dir of our own, and cleanup of every agent and connect loop."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:10]}"
    started: list = []

    class World:
        manifests_dir = directory
        bpffs_dir = bpffs
        pods = lab.pods

        @staticmethod
        def agent(manifests_dir=None, source: list[str] | None = None, extra: list[str] = (),
                  env: dict | None = None, cwd: str = REPO) -> AgentProcess:
            """cwd: the source tree whose agent runs (another release's, for upgrade tests)."""
            log_path = tmp_path / f"agent-{len(started)}.log"
            source = source or ["--manifests", str(manifests_dir or directory)]
            agent = AgentProcess(source, lab.cgroup_root, bpffs, log_path, extra, env, cwd)
            started.append(agent)
            return agent

        @staticmethod
        def connect_loop(**target) -> ConnectLoop:
            """target: address= and port= of ConnectLoop (default the echo Service's)."""
            loop = ConnectLoop(lab.pods["default/client"], tmp_path / f"loop-{len(started)}.jsonl", **target)
            started.append(loop)
            return loop

    try:
        yield World
    finally:
        for thing in reversed(started):
            thing.stop()
        subprocess.run([sys.executable, "-m", "agent", "uninstall", "--bpffs", bpffs,
                        "--cgroup-root", lab.cgroup_root], cwd=REPO, capture_output=True, timeout=60)
        shutil.rmtree(bpffs, ignore_errors=True)
