"""The pod cgroup scan: both kubelet layouts, every QoS class, changes only, within 1 s.

The tree is plain directories under tmp_path (the scan reads names and inode numbers, which
a cgroup2 directory has like any other); the kernel tests run it on a real cgroup subtree.
"""

import os
import threading
import uuid

import pytest

from agent.kubelet import QOS_CLASSES, pod_cgroup_path
from agent.lab.pods import container_cgroup_name
from agent.runtime.settings import Settings
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


#: A generous deadline for a background thread to react (a loaded CI machine is slow at times);
#: the one-second promise itself is the scan interval's (test_the_default_scan_interval_...).
REACT = 10.0


def test_the_default_scan_interval_keeps_the_one_second_promise():
    assert Settings.cgroup_scan_interval <= 0.5  # a change is seen by the next scan (test above)


def test_appearing_and_vanishing_pods_are_noticed_by_the_running_source(tmp_path):
    sink = RecordingSink()
    source = CgroupsSource(tmp_path, sink, interval=0.25)
    source.start()
    try:
        assert sink.changed.wait(REACT)
        sink.changed.clear()
        uid, inode = make_pod(tmp_path, "cgroupfs", "guaranteed")
        assert sink.changed.wait(REACT)
        assert sink.mappings[-1] == {uid: inode}
        sink.changed.clear()
        pod_dir = tmp_path / pod_cgroup_path("cgroupfs", "guaranteed", uid)
        (pod_dir / container_cgroup_name("cgroupfs", uid)).rmdir()
        pod_dir.rmdir()
        assert sink.changed.wait(REACT)
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


# --- change notifications instead of walks (issue 16: idle cost) ---------------------------------
# inotify queues an event inside the mkdir/rmdir call itself, so `handle()` right after a change
# sees it: no waiting is needed for the PodCgroupWatch tests.


def _watch(root):
    from agent.sources.cgroups import PodCgroupWatch

    watch = PodCgroupWatch(root)
    watch.start()
    return watch


def test_the_watch_follows_every_change_a_walk_would_see(tmp_path):
    (tmp_path / "system.slice" / "sshd.service").mkdir(parents=True)
    first = dict(make_pod(tmp_path, "systemd", qos) for qos in QOS_CLASSES)
    watch = _watch(tmp_path)
    try:
        assert watch.mapping() == first == scan_pod_cgroups(tmp_path)
        # A kubepods tree that appears later, deeper, in the other layout.
        nested = tmp_path / "runtime" / "nested"
        later = dict(make_pod(nested, "cgroupfs", qos) for qos in QOS_CLASSES)
        while watch.handle():  # each new level is watched, then listed
            pass
        assert watch.mapping() == first | later == scan_pod_cgroups(tmp_path)
        # A pod goes; a whole QoS parent goes with its pods.
        gone_uid = list(later)[QOS_CLASSES.index("besteffort")]
        gone = nested / pod_cgroup_path("cgroupfs", "besteffort", gone_uid)
        (gone / container_cgroup_name("cgroupfs", gone_uid)).rmdir()
        gone.rmdir()
        (nested / "kubepods" / "besteffort").rmdir()
        watch.handle()
        assert watch.mapping() == scan_pod_cgroups(tmp_path)
        assert gone_uid not in watch.mapping() and len(watch.mapping()) == 5
    finally:
        watch.close()


def test_a_pod_cgroup_made_again_reports_its_new_id(tmp_path):
    uid, first_inode = make_pod(tmp_path, "systemd", "burstable")
    watch = _watch(tmp_path)
    try:
        pod_dir = tmp_path / pod_cgroup_path("systemd", "burstable", uid)
        (pod_dir / container_cgroup_name("systemd", uid)).rmdir()
        pod_dir.rmdir()
        holder = tmp_path / "holder"  # keeps the old inode number from being handed out again
        holder.mkdir()
        pod_dir.mkdir()
        watch.handle()
        assert watch.mapping() == {uid: pod_dir.stat().st_ino} == scan_pod_cgroups(tmp_path)
    finally:
        watch.close()


def test_container_churn_inside_a_pod_lists_nothing(tmp_path):
    uid, _ = make_pod(tmp_path, "cgroupfs", "burstable")
    watch = _watch(tmp_path)
    try:
        pod_dir = tmp_path / pod_cgroup_path("cgroupfs", "burstable", uid)
        for i in range(5):
            (pod_dir / f"container-{i}").mkdir()
        assert watch.handle() == 0  # a pod's subtree is never watched
    finally:
        watch.close()


def test_nothing_changing_means_nothing_listed(tmp_path, monkeypatch):
    """The idle cost: after the first walk, the source lists no directory until one changes."""
    import agent.sources.cgroups as cgroups

    make_pod(tmp_path, "systemd", "guaranteed")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(cgroups.os, "scandir", lambda path: listed.append(path) or real_scandir(path))
    sink = RecordingSink()
    source = CgroupsSource(tmp_path, sink, interval=0.01)
    source.start()
    try:
        assert sink.changed.wait(10)
        assert source.mode == "inotify"
        after_start = len(listed)
        sink.changed.clear()
        # Not a synchronisation: an absence is checked over a while. A source still polling
        # every 0.01 s would list the tree ~50 times in it.
        assert not sink.changed.wait(0.5)
        assert len(listed) == after_start
        uid, inode = make_pod(tmp_path, "systemd", "besteffort")
        assert sink.changed.wait(10)
        assert uid in sink.mappings[-1]
        assert len(listed) > after_start
    finally:
        source.stop()


def test_without_notifications_the_source_falls_back_to_walking(tmp_path, monkeypatch):
    import agent.sources.cgroups as cgroups
    from agent.sources.inotify import InotifyError

    def refuse(self, path, mask=0):
        raise InotifyError(28, "inotify_add_watch: No space left on device")

    monkeypatch.setattr(cgroups.Inotify, "add", refuse)
    sink = RecordingSink()
    source = CgroupsSource(tmp_path, sink, interval=0.05)
    source.start()
    try:
        assert sink.changed.wait(10)
        assert source.mode == "polling"
        sink.changed.clear()
        uid, inode = make_pod(tmp_path, "cgroupfs", "guaranteed")
        assert sink.changed.wait(10)
        assert sink.mappings[-1] == {uid: inode}
    finally:
        source.stop()
