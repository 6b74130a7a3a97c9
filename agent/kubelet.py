"""How the kubelet names pod cgroups (SEMANTICS C1): the one home of that naming scheme.

Both directions live here so they cannot drift apart: `pod_uid_of` reads a directory name (the
cgroups source uses it to find pods on a node) and `pod_cgroup_path` writes one (the lab uses it
to make pods that look like the kubelet's).

    systemd driver:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice
                     kubepods.slice/kubepods-pod<uid_>.slice               (Guaranteed QoS)
                     (the uid's "-" written "_", as systemd escapes it)
    cgroupfs driver: kubepods/<qos>/pod<uid>
                     kubepods/pod<uid>                                     (Guaranteed QoS)

Pure: no I/O.
"""

from __future__ import annotations

import re

LAYOUTS = ("systemd", "cgroupfs")
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")

_SYSTEMD_POD = re.compile(r"^kubepods(?:-[a-z]+)*-pod(?P<uid>[0-9A-Za-z_]+)\.slice$")
_CGROUPFS_POD = re.compile(r"^pod(?P<uid>[0-9A-Za-z-]+)$")


def pod_uid_of(name: str, under_kubepods: bool) -> str | None:
    """The pod uid a kubelet cgroup directory name encodes, or None if it is not a pod cgroup.

    `under_kubepods`: the directory has a `kubepods` ancestor (required for the cgroupfs form,
    whose `pod<uid>` name alone is too plain to trust)."""
    match = _SYSTEMD_POD.match(name)
    if match:
        return match["uid"].replace("_", "-")
    if under_kubepods:
        match = _CGROUPFS_POD.match(name)
        if match:
            return match["uid"]
    return None


def pod_cgroup_path(layout: str, qos: str, uid: str) -> str:
    """The pod-level cgroup, relative to the cgroup root, as the kubelet names it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cgroup layout {layout!r}: expected one of {LAYOUTS}")
    if qos not in QOS_CLASSES:
        raise ValueError(f"unknown QoS class {qos!r}: expected one of {QOS_CLASSES}")
    if layout == "systemd":
        uid_ = uid.replace("-", "_")
        if qos == "guaranteed":
            return f"kubepods.slice/kubepods-pod{uid_}.slice"
        return f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid_}.slice"
    if qos == "guaranteed":
        return f"kubepods/pod{uid}"
    return f"kubepods/{qos}/pod{uid}"
