"""The bpf(2) system calls bcc does not give us, in one place, with ctypes.

Role: open pinned maps and links, read map info, batch and per-CPU map I/O, create, update and
pin cgroup links, and query what is attached to a cgroup; plus the few raw calls the kernel
feature probe (features.py) needs: load a program, create a map, load BTF. `meshlet maps dump` and `uninstall`
use only this module (no compile, no bcc import), the reconciler does all its map I/O here.

It touches only the kernel objects it is handed (fds, pin paths). Every failure raises BpfError
carrying the errno, the command and the object it was about; callers turn the ones a user can
meet into UserError with a hint.

The attribute layouts below are the kernel's `union bpf_attr` members (include/uapi/linux/bpf.h);
each class names the member it mirrors. Only fields we use are declared; the kernel accepts a
shorter attr as long as the rest would be zero.
"""

from __future__ import annotations

import ctypes as ct
import errno as errno_mod
import os
import platform
from dataclasses import dataclass
from typing import Iterator

from agent.datapath import uapi as U

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long

#: __NR_bpf per machine (arch/*/entry/syscalls).
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

#: Entries per batch call: bounds the buffers we build and each call's time in the kernel
#: (which reschedules between elements anyway), while keeping syscalls few.
BATCH_CHUNK = 8192


class BpfError(OSError):
    """A failed bpf(2) call: `errno` is the kernel's, `what` says which command on what."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def _bpf(cmd: int, attr: ct.Structure, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno_mod.ENOSYS, f"bpf(2) on {platform.machine()} is not known to meshlet")
    ret = _libc.syscall(nr, cmd, ct.byref(attr), ct.sizeof(attr))
    if ret < 0:
        raise BpfError(ct.get_errno(), what)
    return ret


class _ElemAttr(ct.Structure):  # bpf_attr: BPF_MAP_*_ELEM, BPF_MAP_GET_NEXT_KEY
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):  # bpf_attr: batch
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class _ObjAttr(ct.Structure):  # bpf_attr: BPF_OBJ_PIN / BPF_OBJ_GET
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32),
                ("path_fd", ct.c_int32)]


class _InfoAttr(ct.Structure):  # bpf_attr: info
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _MapCreateAttr(ct.Structure):  # bpf_attr: BPF_MAP_CREATE
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16), ("map_ifindex", ct.c_uint32),
                ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32)]


class _ProgLoadAttr(ct.Structure):  # bpf_attr: BPF_PROG_LOAD
    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32), ("prog_flags", ct.c_uint32),
                ("prog_name", ct.c_char * 16), ("prog_ifindex", ct.c_uint32),
                ("expected_attach_type", ct.c_uint32)]


class _BtfLoadAttr(ct.Structure):  # bpf_attr: BPF_BTF_LOAD
    _fields_ = [("btf", ct.c_uint64), ("btf_log_buf", ct.c_uint64), ("btf_size", ct.c_uint32),
                ("btf_log_size", ct.c_uint32), ("btf_log_level", ct.c_uint32)]


class _LinkCreateAttr(ct.Structure):  # bpf_attr: link_create (cgroup target)
    _fields_ = [("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
                ("flags", ct.c_uint32), ("target_btf_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("pad2", ct.c_uint64 * 4)]


class _LinkUpdateAttr(ct.Structure):  # bpf_attr: link_update
    _fields_ = [("link_fd", ct.c_uint32), ("new_prog_fd", ct.c_uint32), ("flags", ct.c_uint32),
                ("old_prog_fd", ct.c_uint32)]


class _LinkDetachAttr(ct.Structure):  # bpf_attr: link_detach
    _fields_ = [("link_fd", ct.c_uint32)]


class _QueryAttr(ct.Structure):  # bpf_attr: query
    _fields_ = [("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32), ("query_flags", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("prog_ids", ct.c_uint64), ("prog_cnt", ct.c_uint32),
                ("pad", ct.c_uint32), ("prog_attach_flags", ct.c_uint64), ("link_ids", ct.c_uint64),
                ("link_attach_flags", ct.c_uint64), ("revision", ct.c_uint64)]


class _MapInfo(ct.Structure):  # struct bpf_map_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16), ("ifindex", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("map_extra", ct.c_uint64)]


class _LinkInfo(ct.Structure):  # struct bpf_link_info, cgroup member of the union
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32), ("pad", ct.c_uint32),
                ("cgroup_id", ct.c_uint64), ("attach_type", ct.c_uint32), ("pad2", ct.c_uint32),
                ("rest", ct.c_uint64 * 8)]


class _ProgInfo(ct.Structure):  # struct bpf_prog_info, the head we read
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
                ("map_ids", ct.c_uint64), ("name", ct.c_char * 16)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return U.MAP_TYPE_NAMES.get(self.type, f"type {self.type}")


def _c_path(path: str) -> ct.Array:
    return ct.create_string_buffer(os.fsencode(path))


def obj_get(path: str) -> int:
    """An fd for a pinned map, program or link (BPF_OBJ_GET). The caller closes it."""
    buf = _c_path(path)
    attr = _ObjAttr(pathname=ct.addressof(buf))
    return _bpf(U.OBJ_GET, attr, f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    buf = _c_path(path)
    attr = _ObjAttr(pathname=ct.addressof(buf), bpf_fd=fd)
    _bpf(U.OBJ_PIN, attr, f"pin {path}")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(U.OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode(errors="replace"))


def link_info(fd: int) -> tuple[int, int, int]:
    """(link id, program id, cgroup id) of a cgroup link."""
    info = _LinkInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(U.OBJ_GET_INFO_BY_FD, attr, "link info")
    return info.id, info.prog_id, info.cgroup_id


def prog_info(fd: int) -> tuple[int, str]:
    """(program id, name) of a program fd."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info))
    _bpf(U.OBJ_GET_INFO_BY_FD, attr, "program info")
    return info.id, info.name.decode(errors="replace")


def link_create_cgroup(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """Attach a program to a cgroup as a bpf link (BPF_LINK_CREATE); returns the link fd."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=attach_type)
    return _bpf(U.LINK_CREATE, attr, f"link program to cgroup (attach type {attach_type})")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link in place (BPF_LINK_UPDATE): no instant without a program."""
    attr = _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd)
    _bpf(U.LINK_UPDATE, attr, "update link")


def link_detach(link_fd: int) -> None:
    attr = _LinkDetachAttr(link_fd=link_fd)
    _bpf(U.LINK_DETACH, attr, "detach link")


#: Size of one `struct bpf_insn` (opcode, registers, offset, immediate).
INSN_SIZE = 8


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0, license: str = "GPL",
              log_size: int = 0) -> int:
    """Load a program from raw instructions (BPF_PROG_LOAD); returns its fd. The caller closes it.

    With `log_size`, the verifier's log is asked for and its verdict (the last line before its
    "processed N insns" statistics) joins the error text.
    """
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license.encode())
    log = ct.create_string_buffer(log_size) if log_size else None
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // INSN_SIZE, insns=ct.addressof(code),
                         license=ct.addressof(lic), expected_attach_type=expected_attach_type)
    if log is not None:
        attr.log_level, attr.log_size, attr.log_buf = 1, log_size, ct.addressof(log)
    try:
        return _bpf(U.PROG_LOAD, attr, f"load a program (type {prog_type}, attach type {expected_attach_type})")
    except BpfError as err:
        lines = log.value.decode(errors="replace").strip().splitlines() if log is not None else []
        lines = [line for line in lines if not line.startswith("processed ")]
        if lines:
            raise BpfError(err.errno, f"{err.what} (verifier: {lines[-1]})") from None
        raise


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0) -> int:
    """Create an unpinned map (BPF_MAP_CREATE); returns its fd. The caller closes it."""
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_flags=flags, btf_fd=btf_fd,
                          btf_key_type_id=btf_key_type_id, btf_value_type_id=btf_value_type_id)
    return _bpf(U.MAP_CREATE, attr, f"create a {U.MAP_TYPE_NAMES.get(map_type, map_type)} map")


def btf_load(blob: bytes) -> int:
    """Load type information (BPF_BTF_LOAD); returns its fd. The caller closes it."""
    buf = ct.create_string_buffer(blob, len(blob))
    attr = _BtfLoadAttr(btf=ct.addressof(buf), btf_size=len(blob))
    return _bpf(U.BTF_LOAD, attr, "load BTF")


def map_update_batch(map_fd: int, keys: bytes, values: bytes, count: int) -> int:
    """One raw BPF_MAP_UPDATE_BATCH call, no fallback (Map.update_batch falls back); returns
    how many entries the kernel wrote."""
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    attr = _BatchAttr(keys=ct.addressof(kbuf), values=ct.addressof(vbuf), count=count, map_fd=map_fd)
    _bpf(U.MAP_UPDATE_BATCH, attr, "batch write a map")
    return attr.count


def prog_query_cgroup(cgroup_fd: int, attach_type: int) -> list[int]:
    """Program ids attached (effective or not) directly to a cgroup for one attach type."""
    ids = (ct.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=cgroup_fd, attach_type=attach_type, prog_ids=ct.addressof(ids), prog_cnt=64)
    _bpf(U.PROG_QUERY, attr, f"query cgroup programs (attach type {attach_type})")
    return list(ids[: attr.prog_cnt])


class Map:
    """A map fd with byte-level I/O. Keys and values are `bytes` of the map's exact sizes.

    Per-CPU maps return, for a lookup, one value per possible CPU (the kernel's layout: each
    value rounded up to 8 bytes).
    """

    def __init__(self, fd: int, info: MapInfo, path: str = ""):
        self.fd = fd
        self.info = info
        self.path = path
        self.percpu = info.type == U.MAP_TYPE_PERCPU_ARRAY
        self._ncpus = possible_cpus() if self.percpu else 1
        self._value_stride = (info.value_size + 7) & ~7 if self.percpu else info.value_size

    @classmethod
    def open_pinned(cls, path: str) -> "Map":
        fd = obj_get(path)
        try:
            return cls(fd, map_info(fd), path)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or self.info.name

    @property
    def max_entries(self) -> int:
        return self.info.max_entries

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        kbuf = ct.create_string_buffer(key, len(key))
        vbuf = ct.create_string_buffer(self._value_stride * self._ncpus)
        attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(kbuf), value=ct.addressof(vbuf))
        try:
            _bpf(U.MAP_LOOKUP_ELEM, attr, f"lookup in map {self.name}")
        except BpfError as err:
            if err.errno == errno_mod.ENOENT:
                return None
            raise
        raw = vbuf.raw
        if self.percpu:
            s, n = self._value_stride, self.info.value_size
            return [raw[i * s : i * s + n] for i in range(self._ncpus)]
        return raw[: self.info.value_size]

    def update(self, key: bytes, value: bytes, flags: int = U.BPF_ANY) -> None:
        kbuf = ct.create_string_buffer(key, len(key))
        vbuf = ct.create_string_buffer(value, len(value))
        attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(kbuf), value=ct.addressof(vbuf), flags=flags)
        _bpf(U.MAP_UPDATE_ELEM, attr, f"update map {self.name}")

    def delete(self, key: bytes) -> bool:
        kbuf = ct.create_string_buffer(key, len(key))
        attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(kbuf))
        try:
            _bpf(U.MAP_DELETE_ELEM, attr, f"delete from map {self.name}")
        except BpfError as err:
            if err.errno == errno_mod.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        """All keys, by BPF_MAP_GET_NEXT_KEY (a concurrent delete may skip or repeat a key)."""
        ks = self.info.key_size
        cur = None
        out = []
        nbuf = ct.create_string_buffer(ks)
        while True:
            if cur is None:
                attr = _ElemAttr(map_fd=self.fd, key=0, value=ct.addressof(nbuf))
            else:
                attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(cur), value=ct.addressof(nbuf))
            try:
                _bpf(U.MAP_GET_NEXT_KEY, attr, f"iterate map {self.name}")
            except BpfError as err:
                if err.errno == errno_mod.ENOENT:
                    return out
                raise
            out.append(nbuf.raw)
            cur = ct.create_string_buffer(nbuf.raw, ks)

    def items(self) -> dict[bytes, bytes]:
        """Every entry of a (non per-CPU) map."""
        return {key: value for chunk in self.chunks() for key, value in chunk}

    def chunks(self, chunk: int = 4096) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry of a (non per-CPU) map, `chunk` or so at a time: a caller that consumes
        each chunk never holds the whole map as Python objects (500k entries at 50k Services).
        Batch lookup for hashes (the kernel has it: features.py) and plain arrays (since 5.6, like
        the hashes': the fe_filter's 16k words in a few ms instead of 16k lookups), one by one for
        the others."""
        if self.info.type not in (U.MAP_TYPE_HASH, U.MAP_TYPE_LRU_HASH, U.MAP_TYPE_ARRAY):
            pairs = [(k, self.lookup(k)) for k in self.keys()]
            yield [(k, v) for k, v in pairs if v is not None]
            return
        ks, vs = self.info.key_size, self.info.value_size
        # A hash map's batch token is a bucket index (u32), an array's a key (u32); the kernel
        # needs room for it.
        in_tok = ct.create_string_buffer(8)
        out_tok = ct.create_string_buffer(8)
        first = True
        while True:
            # The kernel returns ENOSPC when one bucket holds more than `count` entries: grow.
            n = chunk
            keys = ct.create_string_buffer(ks * n)
            values = ct.create_string_buffer(vs * n)
            attr = _BatchAttr(in_batch=0 if first else ct.addressof(in_tok), out_batch=ct.addressof(out_tok),
                              keys=ct.addressof(keys), values=ct.addressof(values), count=n, map_fd=self.fd)
            done = False
            try:
                _bpf(U.MAP_LOOKUP_BATCH, attr, f"batch read map {self.name}")
            except BpfError as err:
                if err.errno == errno_mod.ENOENT:
                    done = True
                elif err.errno == errno_mod.ENOSPC:
                    chunk *= 2
                    continue
                else:
                    raise
            got = attr.count
            kraw, vraw = keys.raw, values.raw
            yield [(kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]) for i in range(got)]
            if done:
                return
            ct.memmove(in_tok, out_tok, 8)
            first = False

    def update_batch(self, entries: list[tuple[bytes, bytes]]) -> None:
        """Write many entries, BATCH_CHUNK per BPF_MAP_UPDATE_BATCH call (batch operations are a
        required kernel feature: agent/datapath/features.py).

        Not atomic as a whole: the kernel applies entries in order and stops at the first error
        (attr.count then says how many were written). The reconciler checks capacity first so
        a batch does not fail half way for lack of room.
        """
        for start in range(0, len(entries), BATCH_CHUNK):
            self._update_batch(entries[start : start + BATCH_CHUNK])

    def _update_batch(self, entries: list[tuple[bytes, bytes]]) -> None:
        if not entries:
            return
        ks, vs = self.info.key_size, self.info.value_size
        keys = ct.create_string_buffer(b"".join([k for k, _ in entries]), ks * len(entries))
        values = ct.create_string_buffer(b"".join([v for _, v in entries]), vs * len(entries))
        attr = _BatchAttr(keys=ct.addressof(keys), values=ct.addressof(values), count=len(entries), map_fd=self.fd)
        _bpf(U.MAP_UPDATE_BATCH, attr, f"batch write map {self.name}")

    def delete_batch(self, keys: list[bytes]) -> None:
        """Delete many keys, BATCH_CHUNK per call; a key already gone is not an error."""
        for start in range(0, len(keys), BATCH_CHUNK):
            self._delete_batch(keys[start : start + BATCH_CHUNK])

    def _delete_batch(self, keys: list[bytes]) -> None:
        if not keys:
            return
        ks = self.info.key_size
        kbuf = ct.create_string_buffer(b"".join(keys), ks * len(keys))
        attr = _BatchAttr(keys=ct.addressof(kbuf), count=len(keys), map_fd=self.fd)
        try:
            _bpf(U.MAP_DELETE_BATCH, attr, f"batch delete from map {self.name}")
        except BpfError as err:
            # ENOENT stops the batch at the missing key (attr.count says where): finish the rest
            # one by one.
            if err.errno != errno_mod.ENOENT:
                raise
            for k in keys[attr.count :]:
                self.delete(k)


def possible_cpus() -> int:
    """Number of possible CPUs: the kernel sizes per-CPU values by it, not by online CPUs."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total


class _GetIdAttr(ct.Structure):  # bpf_attr: BPF_*_GET_FD_BY_ID
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


def prog_get_fd_by_id(prog_id: int) -> int:
    attr = _GetIdAttr(id=prog_id)
    return _bpf(U.PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")
