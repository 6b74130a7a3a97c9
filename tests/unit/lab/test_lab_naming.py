"""Pure rules of the lab: kubelet cgroup names (SEMANTICS C1), netns names, address pools, client targets."""

import socket

import pytest

from agent.errors import UserError
from agent.lab.client import format_address, target
from agent.kubelet import pod_cgroup_path
from agent.lab.pods import AddressPool, container_cgroup_name, netns_name

UID = "1f2e3d4c-aaaa-4bbb-8ccc-0123456789ab"


@pytest.mark.parametrize("layout,qos,expected", [
    ("systemd", "besteffort",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_aaaa_4bbb_8ccc_0123456789ab.slice"),
    ("systemd", "burstable",
     "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_aaaa_4bbb_8ccc_0123456789ab.slice"),
    ("systemd", "guaranteed", "kubepods.slice/kubepods-pod1f2e3d4c_aaaa_4bbb_8ccc_0123456789ab.slice"),
    ("cgroupfs", "besteffort", f"kubepods/besteffort/pod{UID}"),
    ("cgroupfs", "burstable", f"kubepods/burstable/pod{UID}"),
    ("cgroupfs", "guaranteed", f"kubepods/pod{UID}"),
])
def test_pod_cgroup_path_follows_the_kubelet(layout, qos, expected):
    assert pod_cgroup_path(layout, qos, UID) == expected


def test_container_cgroup_names_look_like_containerd():
    assert container_cgroup_name("systemd", UID).startswith("cri-containerd-")
    assert container_cgroup_name("systemd", UID).endswith(".scope")
    assert len(container_cgroup_name("cgroupfs", UID)) == 64


def test_unknown_layout_or_qos_is_refused():
    with pytest.raises(ValueError):
        pod_cgroup_path("openrc", "besteffort", UID)
    with pytest.raises(ValueError):
        pod_cgroup_path("systemd", "premium", UID)


def test_netns_names_stay_short_and_distinct():
    assert netns_name("t1", "default", "web") == "meshlet-t1-default-web"
    long_a = netns_name("t1", "a-very-long-namespace-name", "a-very-long-pod-name-1")
    long_b = netns_name("t1", "a-very-long-namespace-name", "a-very-long-pod-name-2")
    assert len(long_a) <= 48 and long_a != long_b and long_a.startswith("meshlet-t1-")


def test_address_pool_skips_taken_and_refuses_duplicates():
    pool = AddressPool()
    assert pool.take("10.244.0.2") == "10.244.0.2"
    assert pool.allocate(4) == "10.244.0.3"
    assert pool.allocate(6) == "fd00:244::3"
    assert pool.take("FD00:0244::0009") == "fd00:244::9"
    with pytest.raises(UserError):
        pool.take("10.244.0.3")


def test_client_target_families():
    assert target("10.96.0.10", 80, None) == (socket.AF_INET, ("10.96.0.10", 80))
    assert target("10.96.0.10", 80, "mapped") == (socket.AF_INET6, ("::ffff:10.96.0.10", 80))
    assert target("fd00::a", 80, "6")[0] == socket.AF_INET6
    with pytest.raises(ValueError):
        target("fd00::a", 80, "mapped")
    with pytest.raises(ValueError):
        target("10.96.0.10", 80, "6")
    assert format_address(("fd00::a", 80, 0, 0)) == "[fd00::a]:80"


def test_hashed_netns_names_differ_where_plain_ones_clash():
    assert netns_name("t1", "a-b", "c") == netns_name("t1", "a", "b-c")
    assert netns_name("t1", "a-b", "c", hashed=True) != netns_name("t1", "a", "b-c", hashed=True)
