"""The pod cgroup scan: both kubelet layouts, every QoS class, changes only, within 1 s.

The tree is plain directories under tmp_path (the scan reads names and inode numbers, which
a cgroup2 directory has like any other); the kernel tests run it on a real cgroup subtree.
"""

import threading
import time
import uuid

import pytest

from agent.kubelet import QOS_CLASSES, pod_cgroup_path
from agent.lab.pods import container_cgroup_name
from agent.sources import POD_CGROUPS
from agent.kubelet import pod_uid_of
from agent.sources.cgroups import CgroupsSource, scan_pod_cgroups


class RecordingSink:
    """Stand-in for the runtime's Store: records each pod cgroup mapping pushed."""

    def __init__(self):
        self.mappings: list[dict[str, int]] = []
        self.changed = threading.Event()

    def pod_cgroups(self, mapping):
        self.mappings.append(dict(mapping))
        self.changed.set()


def make_pod(root, layout, qos, uid=None):
    uid = uid or str(uuid.uuid4())
    pod_dir = root / pod_cgroup_path(layout, qos, uid)
    (pod_dir / container_cgroup_name(layout, uid)).mkdir(parents=True)
    return uid, pod_dir.stat().st_ino


@pytest.mark.parametrize("layout", ["systemd", "cgroupfs"])
@pytest.mark.parametrize("qos", QOS_CLASSES)
def test_each_layout_and_qos_class_is_found_with_its_inode(tmp_path, layout, qos):
    uid, inode = make_pod(tmp_path, layout, qos)
    assert scan_pod_cgroups(tmp_path) == {uid: inode}


def test_mixed_tree_below_a_nested_root(tmp_path):
    root = tmp_path / "runtime" / "nested"
    expected = dict(make_pod(root, layout, qos) for layout in ("systemd", "cgroupfs") for qos in QOS_CLASSES)
    (root / "system.slice" / "sshd.service").mkdir(parents=True)
    (root / "user.slice" / "pod-lookalike").mkdir(parents=True)
    assert scan_pod_cgroups(tmp_path) == expected


def test_plain_pod_name_outside_kubepods_is_not_a_pod(tmp_path):
    (tmp_path / "system" / "pod1234").mkdir(parents=True)
    assert scan_pod_cgroups(tmp_path) == {}


def test_systemd_name_unescapes_the_uid():
    assert pod_uid_of("kubepods-besteffort-pod0a1b_2c3d.slice", False) == "0a1b-2c3d"
    assert pod_uid_of("kubepods-pod0a1b_2c3d.slice", False) == "0a1b-2c3d"
    assert pod_uid_of("kubepods-besteffort.slice", True) is None
    assert pod_uid_of("pod0a1b-2c3d", True) == "0a1b-2c3d"
    assert pod_uid_of("pod0a1b-2c3d", False) is None


def test_reports_only_changes_and_the_first_scan(tmp_path):
    sink = RecordingSink()
    source = CgroupsSource(tmp_path, sink)
    assert source.scan_once()  # the first (empty) scan is this source's "synced"
    assert sink.mappings == [{}]
    assert not source.scan_once()
    uid, inode = make_pod(tmp_path, "systemd", "burstable")
    assert source.scan_once()
    assert not source.scan_once()
    assert sink.mappings == [{}, {uid: inode}]


def test_appearing_and_vanishing_pods_are_noticed_within_one_second(tmp_path):
    sink = RecordingSink()
    source = CgroupsSource(tmp_path, sink, interval=0.25)
    source.start()
    try:
        assert sink.changed.wait(1)
        sink.changed.clear()
        started = time.monotonic()
        uid, inode = make_pod(tmp_path, "cgroupfs", "guaranteed")
        assert sink.changed.wait(1.0) and time.monotonic() - started < 1.0
        assert sink.mappings[-1] == {uid: inode}
        sink.changed.clear()
        pod_dir = tmp_path / pod_cgroup_path("cgroupfs", "guaranteed", uid)
        (pod_dir / container_cgroup_name("cgroupfs", uid)).rmdir()
        started = time.monotonic()
        pod_dir.rmdir()
        assert sink.changed.wait(1.0) and time.monotonic() - started < 1.0
        assert sink.mappings[-1] == {}
    finally:
        source.stop()


def test_the_store_counts_the_first_mapping_as_synced():
    from agent.runtime.store import Store

    store = Store(expected_sources=[POD_CGROUPS])
    assert store.waiting_for() == [POD_CGROUPS]
    store.pod_cgroups({})
    assert store.all_synced()


@pytest.mark.parametrize("layout", ("systemd", "cgroupfs"))
@pytest.mark.parametrize("qos", QOS_CLASSES)
def test_c1_kubelet_names_read_back_as_written(layout, qos):
    """The lab writes pod cgroup names and the agent reads them through one module: a round trip."""
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    name = pod_cgroup_path(layout, qos, uid).rsplit("/", 1)[-1]
    assert pod_uid_of(name, under_kubepods=True) == uid
