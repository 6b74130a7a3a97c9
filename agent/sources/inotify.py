"""Directory change notifications (Linux inotify) through ctypes: the cgroups source's trigger.

Role: lets a source sleep until a directory it cares about gains or loses a subdirectory instead
of listing the tree on a timer. On cgroup2 a `mkdir`/`rmdir` of a cgroup goes through the VFS, so
its parent directory reports IN_CREATE / IN_DELETE like any other directory.

May touch: one inotify file descriptor and the watches on it. Invariants: only directory events
are asked for (a cgroup's control files never wake us); a full event queue is reported as
`overflowed`, never silently dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

# <sys/inotify.h>
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

#: What a watched directory reports: a child directory came, went or was renamed, or it went itself.
CHILDREN_CHANGED = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF

#: struct inotify_event { int wd; uint32_t mask; uint32_t cookie; uint32_t len; char name[]; }
_EVENT = struct.Struct("iIII")
#: Room for many events per read (a name is at most NAME_MAX + 1 bytes).
_READ_SIZE = 64 * (_EVENT.size + 256)


@dataclass(frozen=True)
class Event:
    wd: int  #: the watch that fired (-1 for a queue overflow)
    mask: int
    name: str  #: the child's name, "" for an event about the watched directory itself


class InotifyError(OSError):
    """inotify is not available or a watch could not be added (e.g. the watch limit,
    fs.inotify.max_user_watches, is reached)."""


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
        getattr(libc, name).restype = ctypes.c_int
    return libc


class Inotify:
    """One non-blocking inotify descriptor: `add` a directory, `read` what happened."""

    def __init__(self):
        self._libc = _libc()
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def add(self, path: str, mask: int = CHILDREN_CHANGED) -> int:
        """Watch the directory `path`; returns the watch descriptor (the same one again for a
        directory already watched). FileNotFoundError if it is gone, InotifyError otherwise."""
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFoundError(err, os.strerror(err), path)
            raise InotifyError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def remove(self, wd: int) -> None:
        """Stop a watch; one the kernel already dropped (its directory went) is no error."""
        self._libc.inotify_rm_watch(self._fd, wd)

    def read(self) -> list[Event]:
        """Every event queued now (an empty list if none)."""
        events = []
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = os.fsdecode(data[start:start + length].rstrip(b"\0"))
                events.append(Event(wd, mask, name))
                offset = start + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
