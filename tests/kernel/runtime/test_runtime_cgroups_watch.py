"""The pod cgroups source on a real cgroup2 tree: change notifications arrive for cgroup mkdir and
rmdir, and what the watch reports is what a full walk finds, with the ids the programs see.

Root only (marked `kernel`). Makes its own subtree <cgroup2>/meshlet-test-cgwatch-<random> and
removes it (deepest first), also on failure. Nothing is attached and no process is moved.
"""

import os
import uuid

import pytest

from agent.kubelet import LAYOUTS, QOS_CLASSES, pod_cgroup_path
from agent.lab.pods import cgroup2_mount, container_cgroup_name
from agent.sources.cgroups import PodCgroupWatch, scan_pod_cgroups

pytestmark = pytest.mark.kernel


@pytest.fixture
def subtree():
    root = os.path.join(cgroup2_mount(), f"meshlet-test-cgwatch-{uuid.uuid4().hex[:8]}")
    os.mkdir(root)
    try:
        yield root
    finally:
        for path, _dirs, _files in sorted(os.walk(root), key=lambda item: -item[0].count("/")):
            os.rmdir(path)


def make_pod(root, layout, qos):
    uid = str(uuid.uuid4())
    pod_dir = os.path.join(root, pod_cgroup_path(layout, qos, uid))
    os.makedirs(os.path.join(pod_dir, container_cgroup_name(layout, uid)))
    return uid, pod_dir


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cgroup_mkdir_and_rmdir_reach_the_watch(subtree, layout):
    watch = PodCgroupWatch(subtree)
    watch.start()
    try:
        assert watch.mapping() == {}
        pods = dict(make_pod(subtree, layout, qos) for qos in QOS_CLASSES)
        while watch.handle():  # kubepods, then its QoS children, each watched as it appears
            pass
        expected = {uid: os.stat(path).st_ino for uid, path in pods.items()}
        assert watch.mapping() == expected == scan_pod_cgroups(subtree)

        uid, pod_dir = next(iter(pods.items()))
        os.rmdir(os.path.join(pod_dir, container_cgroup_name(layout, uid)))
        os.rmdir(pod_dir)
        assert watch.handle() == 1
        del expected[uid]
        assert watch.mapping() == expected == scan_pod_cgroups(subtree)
    finally:
        watch.close()
