"""`meshlet lab up/exec/status/down` as a user runs them (subprocesses), and nothing left behind.

Root only (marked `kernel`): real netns, cgroups and echo servers under a fresh lab name.
"""

import json
import os
import subprocess
import sys

import pytest

from agent.lab.cli import state_file
from agent.lab.pods import NETNS_DIR, cgroup2_mount, unique_lab_name

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def meshlet(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_lab_up_exec_status_down_leaves_nothing_behind():
    name = unique_lab_name("c")
    try:
        meshlet("lab", "up", "--name", name, "--layout", "cgroupfs")
        with open(state_file(name)) as f:
            state = json.load(f)
        pids = [pod["echo_pid"] for pod in state["pods"]]
        assert len(pids) == 11 and all(os.path.exists(f"/proc/{pid}") for pid in pids)

        status = json.loads(meshlet("lab", "status", "--name", name, "-o", "json").stdout)
        assert {p["pod"] for p in status[0]["pods"]} >= {"batch/batch-client", "shop/cart-a"}
        assert all(p["echo"].startswith("up") for p in status[0]["pods"])

        # exec: inside the pod's netns and cgroup; the echo servers answer by pod IP
        answer = meshlet("lab", "exec", "--name", name, "batch/batch-client", "--",
                         sys.executable, "-m", "agent.lab.client", "tcp", "10.244.2.12", "8080",
                         "--count", "3").stdout
        assert json.loads(answer)["peers"] == {"cart-b": 3}
        own_cgroup = meshlet("lab", "exec", "--name", name, "cart-a", "--", "cat", "/proc/self/cgroup").stdout
        assert f"/meshlet-lab-{name}/kubepods/besteffort/podc0ffee01-0002-4000-8000-000000000011/" in own_cgroup

        again = meshlet("lab", "up", "--name", name, check=False)
        assert again.returncode == 2 and "already up" in again.stderr and "Traceback" not in again.stderr

        meshlet("lab", "down", "--name", name)
    finally:
        if os.path.exists(state_file(name)):
            meshlet("lab", "down", "--name", name, check=False)

    assert not os.path.exists(state_file(name))
    assert [n for n in os.listdir(NETNS_DIR) if n.startswith(f"meshlet-{name}-")] == []
    assert not os.path.exists(os.path.join(cgroup2_mount(), f"meshlet-lab-{name}"))
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []
    gone = meshlet("lab", "down", "--name", name, check=False)
    assert gone.returncode == 2 and "no lab named" in gone.stderr


def test_lab_exec_names_an_unknown_pod_in_one_line():
    name = unique_lab_name("c")
    manifests = os.path.join(REPO, "examples", "demo")
    try:
        meshlet("lab", "up", "--name", name, "--manifests", manifests)
        wrong = meshlet("lab", "exec", "--name", name, "nosuch", "--", "true", check=False)
        assert wrong.returncode == 2
        assert wrong.stderr.count("\n") == 1 and "no pod 'nosuch'" in wrong.stderr
    finally:
        meshlet("lab", "down", "--name", name, check=False)
