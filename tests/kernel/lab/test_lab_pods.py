"""Kernel tests for agent.lab.pods: real network namespaces, veths, cgroups and echo servers.

Root only (marked `kernel`). Every lab here has a fresh name; its netns are named
meshlet-<lab>-*, its cgroups live under <cgroup2>/meshlet-lab-<lab>. Nothing is attached to any
cgroup and nothing is sent outside the lab's namespaces.
"""

import os
import subprocess
import sys

import pytest

from agent.lab.pods import NETNS_DIR, Lab, cgroup2_mount, unique_lab_name

pytestmark = pytest.mark.kernel


def netns_inode(name):
    return os.stat(os.path.join(NETNS_DIR, name)).st_ino


def processes_holding(inodes):
    """Pids whose netns, or an open fd, is one of the given netns inodes."""
    wanted = {f"net:[{inode}]" for inode in inodes}
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        links = [f"/proc/{pid}/ns/net"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                if os.readlink(link) in wanted:
                    holders.add(int(pid))
            except OSError:
                pass
    return holders


def leftovers(name, inodes, pids):
    """Everything a lab named `name` could have left: netns, cgroups, processes, netns references."""
    found = []
    found += [f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(f"meshlet-{name}-")]
    root = os.path.join(cgroup2_mount(), f"meshlet-lab-{name}")
    if os.path.exists(root):
        found.append(f"cgroup {root}")
    found += [f"process {pid}" for pid in pids if os.path.exists(f"/proc/{pid}")]
    found += [f"netns held by {pid}" for pid in processes_holding(inodes)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"root-netns link {line}" for line in links.splitlines() if "vpod" in line]
    return found


def test_two_pods_talk_by_pod_ip_over_tcp_and_udp_v4_and_v6():
    with Lab(unique_lab_name()) as lab:
        client = lab.add_pod("default", "client")
        server = lab.add_pod("shop", "server", echo_ports=(8080, 5353))
        for kind, addr, port, extra in [
            ("tcp", server.ipv4, 8080, ()),
            ("tcp", server.ipv6, 8080, ()),
            ("tcp", server.ipv4, 8080, ("--family", "mapped")),
            ("udp", server.ipv4, 5353, ()),
            ("udp", server.ipv6, 5353, ()),
            ("udp", server.ipv4, 8080, ("--unconnected",)),
        ]:
            result = client.client(kind, addr, port, 5, *extra)
            assert result["peers"] == {"server": 5}, (kind, addr, extra, result)
            assert result["errors"] == {}
        # The server sees the client's pod address as the source: no NAT in the lab.
        assert client.client("udp", server.ipv6, 5353, 1)["reply_from"] == [f"[{server.ipv6}]:5353"]


def test_pod_processes_run_in_the_container_cgroup_of_the_kubelet_layout():
    for layout, pod_dir_part in (("systemd", "kubepods-burstable-pod"), ("cgroupfs", "burstable/pod")):
        with Lab(unique_lab_name(), layout=layout) as lab:
            pod = lab.add_pod("default", "web", qos="burstable", uid="0a1b2c3d-0000-4000-8000-000000000001")
            own = pod.run(["cat", "/proc/self/cgroup"]).stdout
            (v2_line,) = [line for line in own.splitlines() if line.startswith("0::")]
            path = os.path.join(cgroup2_mount(), v2_line[3:].lstrip("/"))
            assert path == pod.container_cgroup
            assert os.path.dirname(path) == pod.cgroup
            assert pod.cgroup.startswith(lab.cgroup_root + "/")
            uid = pod.uid.replace("-", "_") if layout == "systemd" else pod.uid
            assert f"{pod_dir_part}{uid}" in pod.cgroup
            assert pod.cgroup_id == os.stat(pod.cgroup).st_ino
            # and the process is in the pod's netns, with its address
            assert pod.ipv4 in pod.run(["ip", "-o", "addr", "show", "eth0"]).stdout


def test_guaranteed_pods_sit_directly_under_kubepods():
    with Lab(unique_lab_name()) as lab:
        pod = lab.add_pod("default", "g", qos="guaranteed", echo_ports=())
        rel = os.path.relpath(pod.cgroup, lab.cgroup_root)
        assert rel == f"kubepods.slice/kubepods-pod{pod.uid.replace('-', '_')}.slice"


def test_node_processes_are_outside_every_pod_cgroup():
    with Lab(unique_lab_name()) as lab:
        pod = lab.add_pod("default", "web")
        node = lab.node_cgroup()
        assert node.startswith(lab.cgroup_root + "/") and "kubepods" not in node
        result = lab.run_on_node([sys.executable, "-m", "agent.lab.client", "tcp", pod.ipv4, "8080"])
        assert '"web": 1' in result.stdout


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_lab_exit_removes_everything_also_when_the_body_raises(failure):
    name = unique_lab_name()
    with pytest.raises(failure):
        with Lab(name) as lab:
            pods = [lab.add_pod("default", f"p{i}") for i in range(3)]
            inodes = [netns_inode(lab.node_netns)] + [netns_inode(p.netns) for p in pods]
            pids = [p.echo_pid for p in pods]
            # a process started by a test inside a pod, left running
            stray = pods[0].popen(["sleep", "300"])
            pids.append(stray.pid)
            assert leftovers(name, inodes, pids)  # the check can see a live lab
            raise failure("body fails")
    stray.wait(5)
    assert leftovers(name, inodes, pids) == []


def test_remove_pod_removes_its_netns_cgroup_and_server_only():
    with Lab(unique_lab_name()) as lab:
        keep = lab.add_pod("default", "keep")
        gone = lab.add_pod("default", "gone")
        lab.remove_pod(gone)
        assert not os.path.exists(os.path.join(NETNS_DIR, gone.netns))
        assert not os.path.exists(gone.cgroup)
        assert not os.path.exists(f"/proc/{gone.echo_pid}")
        assert keep.client("tcp", keep.ipv4, 8080, 1)["peers"] == {"keep": 1}
        assert keep.client("tcp", gone.ipv4, 8080, 1, "--timeout", "0.5")["peers"] == {}
