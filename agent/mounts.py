"""The machine's mounts, read from /proc/mounts: the one home of finding the cgroup2 and bpffs
mounts (the runtime's default --cgroup-root, the loader's preflight, the lab, the benchmark).

May touch: /proc/mounts (read only). The kernel writes a space, tab, newline or backslash in a
mount point as an octal escape (\\040, \\011, \\012, \\134); `read_mounts` undoes it, so a mount
point with a space is found like any other.
"""

from __future__ import annotations

import os
import re

from agent.errors import UserError

PROC_MOUNTS = "/proc/mounts"

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A /proc/mounts field as the path it names (octal escapes decoded)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(path: str = PROC_MOUNTS) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, in /proc/mounts order."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2:
                out.append((unescape(fields[1]), fields[2]))
    return out


def mount_of(path: str, mounts: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The mount holding `path` (the longest mount point that is a prefix; the last one wins)."""
    path = os.path.realpath(path)
    best = None
    for point, fstype in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):
                best = (point, fstype)
    return best


def cgroup2_mount(mounts: list[tuple[str, str]] | None = None) -> str | None:
    """The first cgroup2 mount point (not always /sys/fs/cgroup: hybrid hosts mount it at
    /sys/fs/cgroup/unified), None when there is none."""
    for point, fstype in mounts if mounts is not None else read_mounts():
        if fstype == "cgroup2":
            return point
    return None


def require_cgroup2_mount(path: str = PROC_MOUNTS) -> str:
    """cgroup2_mount, or a UserError saying what to do."""
    try:
        mounts = read_mounts(path)
    except OSError as err:
        raise UserError(f"cannot read {path} to find cgroup2 ({err.strerror}); hint: pass --cgroup-root") from None
    point = cgroup2_mount(mounts)
    if point is None:
        raise UserError("no cgroup2 filesystem is mounted; hint: mount one (mount -t cgroup2 none "
                        "/sys/fs/cgroup/unified), or pass --cgroup-root")
    return point
