"""`meshlet trace`: the datapath's decisions as they happen, read from the pinned event channel.

Role: switch tracing on through the pinned control map (`trace_control`, struct trace_control in
bpf/meshlet.h), read the decisions bpf/sock.c sends (struct decision) from the pinned channel,
name them from the names map (backend groups, routes, scopes, and client pods:
plan.pod_name_key) and switch tracing off on exit. Only the pins are needed: no bcc, no agent, so
it works while the agent is down.

Two channels (features.Support.trace_channel; the one pinned is the one the programs use:
loader.remove_unused_trace_pins): the BPF ring buffer `trace_events` (Linux >= 5.8), else the
perf event array `trace_perf`, whose per-CPU perf buffers this process opens itself.

Pure: `Filter` (what --from/--to/--verdict ask) -> the control fields, `parse_to`, `decode`
(record bytes -> Event, names from a names image), `perf_records` (a perf buffer's bytes ->
samples and lost counts). I/O: `Ring` (the ring buffer through mmap), `PerfBuffers` (perf
buffers through perf_event_open and mmap), `Control` (the control map through mmap),
`ClientNamer` (cgroup id -> pod, through cgroupfs and the names map), `trace` (the loop).

The ring buffer, as the kernel lays it out for mmap (kernel/bpf/ringbuf.c): page 0 holds the
consumer position (ours to write), page 1 the producer position, then the data pages mapped twice
in a row, so a record that wraps around the end reads as one slice. Each record starts with an
8-byte header (length with a BUSY and a DISCARD bit, page offset) and is padded to 8 bytes.

The perf fallback: one PERF_COUNT_SW_BPF_OUTPUT event per online CPU (perf_event_open(2)), its
buffer mapped, its fd stored in `trace_perf` at that CPU's index: bpf_perf_event_output writes to
the buffer of the CPU it runs on. A buffer is a header page (data_head written by the kernel,
data_tail ours) and a power-of-two data area of records (struct perf_event_header; a record may
wrap around the end). PERF_RECORD_SAMPLE carries one decision, PERF_RECORD_LOST how many did
not fit. The kernel drops the array's entries when the fd that stored them is closed, so a
killed trace leaves no dead buffers behind; the array has one slot per CPU, so it has one owner:
the lease below refuses a second trace before it touches the array.

Lease: the kernel traces only while its clock is below expires_ns. `trace` renews it to now +
TRACE_LEASE_S every RENEW_S seconds and writes 0 on exit (also on Ctrl-C or SIGTERM); one that was
killed stops costing anything within TRACE_LEASE_S. One trace at a time: the ring has one consumer
position and the filters are node-wide, so a second `meshlet trace` refuses while a lease is
alive. In-kernel filters (client pod, frontend, verdicts) keep a busy node from flooding us;
decisions that still find the ring full are counted by the kernel (`dropped`) and reported. The
programs do not wake us per event (that would slow the traced connect()); we look every
TRACE_POLL_S, so the ring absorbs bursts up to ~27k decisions a second.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import mmap
import os
import platform
import select
import signal
import struct
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping

from agent.datapath import bpfsys
from agent.datapath import layout as L
from agent.datapath import entries as E
from agent.datapath.dump import format_endpoint
from agent.errors import UserError
from agent.kubelet import pod_uid_of

#: Seconds a trace stays on without being renewed (a killed trace stops after this).
TRACE_LEASE_S = 5
#: Seconds between renewals (well inside the lease).
RENEW_S = 1.0
#: Seconds between looks at the ring buffer. The programs never wake the reader (a wakeup costs
#: the connect() that sends the event several microseconds: bench/trace_cost.py), so this bounds
#: how late an event is printed; the ring holds TRACE_RING_BYTES (~2700 events) meanwhile.
TRACE_POLL_S = 0.1

#: --verdict names -> the OUT_* outcome they select (names as users say them).
VERDICTS = {"forward": 0, "reject": 1, "unreachable": 2, "skip": 3, "miss": 4}
VERDICT_OF = {v: k for k, v in VERDICTS.items()}
assert {L.OUTCOMES[v] for v in VERDICTS.values()} == set(L.OUTCOMES.values()), "a verdict per outcome"

_ERRNO_NAMES = {0: "", 111: "ECONNREFUSED", 113: "EHOSTUNREACH"}

_RINGBUF_BUSY = 1 << 31
_RINGBUF_DISCARD = 1 << 30
_RINGBUF_HDR = 8
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")
_PAGE = mmap.PAGESIZE


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_ns() (CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --- what to trace (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class To:
    """--to ADDR[:PORT][/PROTO]: port 0 and protocol "" mean any."""

    address: str
    port: int = 0
    protocol: str = ""


def parse_to(text: str) -> To:
    """ADDR, ADDR:PORT, ADDR:PORT/PROTO, ADDR/PROTO; IPv6 as [ADDR] or [ADDR]:PORT (or bare)."""
    hint = "hint: write it as 10.96.0.10, 10.96.0.10:80, 10.96.0.10:53/udp or [fd00::a]:80/tcp"
    rest, _, proto = text.partition("/")
    protocol = proto.upper()
    if protocol and protocol not in L.PROTO_NUMBERS:
        raise UserError(f"--to {text}: protocol {proto!r} is not one of tcp, udp, sctp; {hint}")
    port = ""
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise UserError(f"--to {text}: cannot read it; {hint}")
            port = tail[1:]
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host = rest  # IPv4 without port, or bare IPv6
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise UserError(f"--to {text}: {host!r} is not an IP address; {hint}") from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"--to {text}: port {port!r} is not a number from 1 to 65535; {hint}")
    return To(address, int(port or 0), protocol)


@dataclass(frozen=True)
class Filter:
    """What one trace asks the kernel for."""

    verdicts: tuple[str, ...] = tuple(VERDICTS)  #: names of VERDICTS
    to: To | None = None
    client_cgroup: int = 0  #: the --from pod's cgroup id, 0 = any client
    client_level: int = 0  #: its depth below the cgroup2 mount

    def control(self, expires_ns: int) -> L.TraceControl:
        """The control value that asks for this (dropped left 0: the caller keeps the kernel's)."""
        tc = L.TraceControl(expires_ns=expires_ns)
        for name in self.verdicts:
            tc.outcomes |= 1 << VERDICTS[name]
        if self.to is not None:
            tc.frontend[:] = E.addr16(self.to.address)
            tc.flags |= L.TRACE_MATCH_FRONTEND
            tc.frontend_port = struct.unpack("=H", struct.pack("!H", self.to.port))[0]
            tc.proto = L.PROTO_NUMBERS[self.to.protocol] if self.to.protocol else 0
        if self.client_cgroup:
            tc.flags |= L.TRACE_MATCH_CLIENT
            tc.client_cgroup = self.client_cgroup
            tc.client_level = self.client_level
        return tc


# --- events (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One decision, named. JSON keys are these field names (stable for scripts)."""

    time: float  #: Unix time, seconds
    kind: str  #: connect | datagram
    client: str  #: "namespace/pod", or the cgroup path of a process that is no known pod
    cgroup_id: int
    netns_cookie: int
    frontend: str  #: ADDR:PORT
    protocol: str
    scope: str  #: "" = the default (producer) view, else the consumer namespace
    route: str  #: "" = none
    backend: str  #: the backend group chosen, "" = none
    endpoint: str  #: ADDR:PORT, "" = none
    verdict: str  #: forward | reject | unreachable | skip | miss
    errno: str  #: ECONNREFUSED | EHOSTUNREACH | ""


def decode(raw: bytes, names: Mapping[int, str], client: Callable[[int], str], clock_offset_ns: int) -> Event:
    """An event from one ring-buffer record. `names`: names-map id -> name; `client`: cgroup id ->
    client name; clock_offset_ns: Unix time minus the monotonic clock."""
    d = L.Decision.from_buffer_copy(raw[: ct.sizeof(L.Decision)])
    return Event(
        time=(d.time_ns + clock_offset_ns) / 1e9,
        kind=L.DECISION_KINDS.get(d.kind, str(d.kind)),
        client=client(d.cgroup_id),
        cgroup_id=d.cgroup_id,
        netns_cookie=d.netns_cookie,
        frontend=format_endpoint(bytes(d.frontend), d.frontend_port),
        protocol=L.PROTO_NAMES.get(d.proto, str(d.proto)),
        scope=names.get(d.scope, f"{d.scope:#010x}") if d.scope else "",
        route=names.get(d.route_id, f"{d.route_id:#018x}") if d.route_id else "",
        backend=names.get(d.group_id, f"{d.group_id:#018x}") if d.group_id else "",
        endpoint=format_endpoint(bytes(d.endpoint), d.endpoint_port) if d.endpoint_port else "",
        verdict=VERDICT_OF.get(d.outcome, str(d.outcome)),
        errno=_ERRNO_NAMES.get(d.err, str(d.err)),
    )


# --- the pins (I/O) ----------------------------------------------------------------------------


def _pin(bpffs: str, name: str) -> str:
    from agent.datapath.loader import map_pin  # one home for pin paths

    return map_pin(bpffs, name)


def _open_pin(bpffs: str, name: str) -> bpfsys.Map:
    path = _pin(bpffs, name)
    if not os.path.exists(path):
        if os.path.exists(_pin(bpffs, "frontends")):
            raise UserError(f"no trace event channel is pinned under {os.path.dirname(path)}: the agent's "
                            "kernel has neither BPF ring buffers (Linux >= 5.8) nor perf_event_output for "
                            "socket programs, or the agent predates `meshlet trace`; hint: the agent's start-up "
                            "log lists the kernel features (trace_channel), and a restart of a newer agent adds it")
        raise UserError(f"no meshlet maps pinned under {os.path.dirname(path)}; hint: is the agent running "
                        "here (or was it)? pass the --bpffs it uses")
    try:
        return bpfsys.Map.open_pinned(path)
    except bpfsys.BpfError as err:
        raise UserError(f"cannot open the pinned map {path}: {err.strerror}; hint: run as root") from None


class Control:
    """The control map's one value, mapped into our memory (the map is BPF_F_MMAPABLE): fields
    are written in place, so the kernel's atomic `dropped` is never overwritten."""

    def __init__(self, bpffs: str):
        self._map = _open_pin(bpffs, "trace_control")
        self._mm = mmap.mmap(self._map.fd, _PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._tc = L.TraceControl.from_buffer(self._mm)

    def read(self) -> L.TraceControl:
        return L.TraceControl.from_buffer_copy(bytes(self._tc))

    def on_until(self) -> int:
        """expires_ns while a lease is alive, else 0."""
        expires = self._tc.expires_ns
        return expires if expires > monotonic_ns() else 0

    def start(self, flt: Filter, expires_ns: int) -> None:
        want = flt.control(0)
        for name, _ in L.TraceControl._fields_:
            if name not in ("expires_ns", "dropped"):
                setattr(self._tc, name, getattr(want, name))
        self._tc.expires_ns = expires_ns  # last: the filters are in place before it turns on

    def renew(self, expires_ns: int) -> None:
        self._tc.expires_ns = expires_ns

    def off(self) -> None:
        self._tc.expires_ns = 0

    @property
    def dropped(self) -> int:
        return self._tc.dropped

    def close(self) -> None:
        del self._tc
        self._mm.close()
        self._map.close()


class Ring:
    """The consumer side of a pinned BPF ring buffer, through mmap (no bcc, no libbpf)."""

    lost = 0  #: a ring buffer reports no losses of its own: the kernel's `dropped` counts them

    def __init__(self, bpffs: str):
        self._map = _open_pin(bpffs, L.TRACE_CHANNEL_MAPS[L.TRACE_RINGBUF])
        size = self._map.info.max_entries
        self._mask = size - 1
        self._consumer = mmap.mmap(self._map.fd, _PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._data = mmap.mmap(self._map.fd, _PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=_PAGE)
        self._poll = select.poll()
        self._poll.register(self._map.fd, select.POLLIN)

    @property
    def producer(self) -> int:
        return _U64.unpack_from(self._data, 0)[0]

    def skip_pending(self) -> None:
        """Forget what an earlier trace left unread."""
        _U64.pack_into(self._consumer, 0, self.producer)

    def wait(self, timeout_s: float) -> None:
        """Until the kernel wakes us (it only does when the ring is full or on a forced wakeup:
        see TRACE_POLL_S) or timeout_s passed."""
        self._poll.poll(max(0, int(timeout_s * 1000)))

    def records(self) -> Iterator[bytes]:
        """The records committed so far, each consumed as it is handed out."""
        cons = _U64.unpack_from(self._consumer, 0)[0]
        while cons < self.producer:
            offset = _PAGE + (cons & self._mask)
            length = _U32.unpack_from(self._data, offset)[0]
            if length & _RINGBUF_BUSY:
                break  # reserved, not committed yet
            size = length & ~(_RINGBUF_BUSY | _RINGBUF_DISCARD)
            record = None if length & _RINGBUF_DISCARD else self._data[offset + _RINGBUF_HDR:
                                                                      offset + _RINGBUF_HDR + size]
            cons += (size + _RINGBUF_HDR + 7) & ~7
            _U64.pack_into(self._consumer, 0, cons)
            if record is not None:
                yield record

    def close(self) -> None:
        self._poll.unregister(self._map.fd)
        self._consumer.close()
        self._data.close()
        self._map.close()


# perf_event_open(2) and the perf buffer layout (include/uapi/linux/perf_event.h).
#: __NR_perf_event_open per machine (arch/*/entry/syscalls).
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "arm64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_BPF_OUTPUT, _PERF_SAMPLE_RAW = 1, 10, 1 << 10
_PERF_ATTR_WATERMARK = 1 << 14  #: perf_event_attr.watermark: wake at wakeup_watermark bytes
_PERF_FLAG_FD_CLOEXEC = 8
PERF_RECORD_LOST, PERF_RECORD_SAMPLE = 2, 9
_PERF_HEADER = struct.Struct("=IHH")  #: struct perf_event_header: type, misc, size
#: struct perf_event_mmap_page: data_head, data_tail, data_offset, data_size (Linux >= 4.1).
_MMAP_PAGE_DATA = 1024
#: Data pages per CPU (a power of two): 256 KiB, the ring buffer's size, on each CPU.
PERF_BUFFER_PAGES = L.TRACE_RING_BYTES // _PAGE


class _PerfEventAttr(ct.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER6 (the kernel takes a shorter one)."""

    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_watermark", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64), ("branch_sample_type", ct.c_uint64),
                ("sample_regs_user", ct.c_uint64), ("sample_stack_user", ct.c_uint32), ("clockid", ct.c_int32),
                ("sample_regs_intr", ct.c_uint64), ("aux_watermark", ct.c_uint32),
                ("sample_max_stack", ct.c_uint16), ("reserved", ct.c_uint16)]


_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def perf_event_open_bpf_output(cpu: int, wakeup_bytes: int) -> int:
    """A PERF_COUNT_SW_BPF_OUTPUT event on `cpu` (any process), enabled, waking its reader once
    `wakeup_bytes` are unread; its fd."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise UserError(f"`meshlet trace` does not know perf_event_open on {platform.machine()}; "
                        "hint: run it on x86_64 or arm64")
    attr = _PerfEventAttr(type=_PERF_TYPE_SOFTWARE, size=ct.sizeof(_PerfEventAttr), config=_PERF_COUNT_SW_BPF_OUTPUT,
                          sample_period=1, sample_type=_PERF_SAMPLE_RAW, flags=_PERF_ATTR_WATERMARK,
                          wakeup_watermark=wakeup_bytes)
    fd = _libc.syscall(nr, ct.byref(attr), -1, cpu, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ct.get_errno()
        raise UserError(f"cannot open a perf buffer on CPU {cpu} for the trace: {os.strerror(err)}; hint: run "
                        "as root (or raise /proc/sys/kernel/perf_event_mlock_kb)")
    return fd


def _wrapped(data, start: int, length: int) -> bytes:
    """`length` bytes of a circular area from offset `start` (any value: taken modulo its size)."""
    size = len(data)
    start %= size
    end = start + length
    if end <= size:
        return bytes(data[start:end])
    return bytes(data[start:]) + bytes(data[: end - size])


def perf_records(data, tail: int, head: int) -> tuple[list[bytes], int, int]:
    """The records of a perf buffer's data area between our tail and the kernel's head:
    (the raw data of each PERF_RECORD_SAMPLE, events reported lost, the new tail). Records of
    other types are stepped over."""
    samples, lost = [], 0
    while tail < head:
        kind, _misc, size = _PERF_HEADER.unpack(_wrapped(data, tail, _PERF_HEADER.size))
        if size < _PERF_HEADER.size:
            break  # a header the kernel would never write: stop rather than spin
        record = _wrapped(data, tail, size)
        if kind == PERF_RECORD_SAMPLE:
            (raw_size,) = _U32.unpack_from(record, _PERF_HEADER.size)
            start = _PERF_HEADER.size + _U32.size
            samples.append(record[start:start + raw_size])
        elif kind == PERF_RECORD_LOST:
            lost += _U64.unpack_from(record, _PERF_HEADER.size + 8)[0]  # after the event id
        tail += size
    return samples, lost, tail


def decision_time(raw: bytes) -> int:
    """time_ns of a struct decision record."""
    return _U64.unpack_from(raw, L.Decision.time_ns.offset)[0]


def online_cpus(text: str) -> list[int]:
    """The CPUs of a kernel CPU list ("0-3,6")."""
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


class PerfBuffers:
    """The reader of the pinned perf event array (the fallback channel): one perf buffer per
    online CPU, stored in the array while this object lives (module docstring)."""

    def __init__(self, bpffs: str, pages: int = PERF_BUFFER_PAGES):
        self._map = _open_pin(bpffs, L.TRACE_CHANNEL_MAPS[L.TRACE_PERF])
        self.lost = 0  #: events the kernel reported lost (PERF_RECORD_LOST)
        self._buffers: dict[int, tuple[int, mmap.mmap]] = {}  # cpu -> (fd, header + data mapping)
        self._poll = select.poll()
        try:
            with open("/sys/devices/system/cpu/online") as f:
                cpus = online_cpus(f.read())
            for cpu in cpus:
                fd = perf_event_open_bpf_output(cpu, pages * _PAGE // 2)
                try:
                    mapping = mmap.mmap(fd, (1 + pages) * _PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError:
                    os.close(fd)
                    raise
                self._buffers[cpu] = (fd, mapping)
                self._poll.register(fd, select.POLLIN)
                self._map.update(_U32.pack(cpu), _U32.pack(fd))
        except BaseException:
            self.close()
            raise

    def skip_pending(self) -> None:
        """Nothing to skip: our buffers are new."""

    def wait(self, timeout_s: float) -> None:
        """Until a buffer is half full or timeout_s passed (see TRACE_POLL_S)."""
        self._poll.poll(max(0, int(timeout_s * 1000)))

    def records(self) -> Iterator[bytes]:
        """The samples written so far on every CPU, each buffer consumed as it is read, in the
        order they were decided: each CPU's buffer is in order, and what is read in one pass is
        merged by the decisions' time (a decision made after a buffer was passed is read on the
        next pass, and so is every later one on the CPUs after it)."""
        batch: list[bytes] = []
        for _fd, mapping in self._buffers.values():
            head, tail, offset, size = struct.unpack_from("=QQQQ", mapping, _MMAP_PAGE_DATA)
            offset, size = offset or _PAGE, size or len(mapping) - _PAGE
            if head == tail:
                continue
            data = memoryview(mapping)[offset:offset + size]
            try:
                samples, lost, tail = perf_records(data, tail, head)
            finally:
                data.release()
            self.lost += lost
            _U64.pack_into(mapping, _MMAP_PAGE_DATA + 8, tail)  # data_tail: the space is the kernel's again
            batch += samples
        yield from sorted(batch, key=decision_time)

    def close(self) -> None:
        for cpu, (fd, mapping) in self._buffers.items():
            try:
                self._map.delete(_U32.pack(cpu))  # the kernel would on close(); say it first
            except bpfsys.BpfError:
                pass
            self._poll.unregister(fd)
            mapping.close()
            os.close(fd)
        self._buffers = {}
        self._map.close()


def open_channel(bpffs: str) -> "Ring | PerfBuffers":
    """The reader of the event channel the programs send to (the one pinned)."""
    if os.path.exists(_pin(bpffs, L.TRACE_CHANNEL_MAPS[L.TRACE_PERF])):
        return PerfBuffers(bpffs)
    return Ring(bpffs)  # or the error that says no channel is pinned


def read_names(bpffs: str) -> dict[int, str]:
    """The names map: id -> name."""
    with _open_pin(bpffs, "names") as m:
        return {int.from_bytes(k, "little"): L.NameValue.from_buffer_copy(v).name.decode(errors="replace")
                for k, v in m.items().items()}


def pod_names(names: Mapping[int, str]) -> dict[int, str]:
    """Client pod cgroup id -> "namespace/name" (the POD_NAME_TAG entries of the names map)."""
    return {ident & ~L.POD_NAME_TAG: name for ident, name in names.items() if ident & L.POD_NAME_TAG}


class ClientNamer:
    """cgroup id of a client task -> its pod ("namespace/name"), else "pod <uid>" from a kubelet
    cgroup name, else its cgroup path.

    A task runs in its pod's cgroup or in a container cgroup below it: the cgroup's directory is
    found by its inode number (= cgroup id) under the cgroup2 mount, then the nearest directory
    up that is a known pod names it. `pods(fresh)` gives the pods the names map knows (fresh: read
    again, rate-limited by the caller: a pod the agent named after the trace started). The cgroup
    scan is cached and redone at most once a second; only answers naming a pod are kept."""

    def __init__(self, mount: str, pods: Callable[[bool], Mapping[int, str]]):
        self.mount = mount
        self._pods = pods
        self._paths: dict[int, str] = {}
        self._scanned = 0.0
        self._names: dict[int, str] = {}

    def path_of(self, cgroup_id: int) -> str | None:
        if cgroup_id not in self._paths and time.monotonic() - self._scanned > 1.0:
            self._scan()
        return self._paths.get(cgroup_id)

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        paths = {}
        for top, dirs, _files in os.walk(self.mount):
            try:
                paths[os.stat(top).st_ino] = top
            except OSError:
                continue  # went away meanwhile
        self._paths = paths

    def __call__(self, cgroup_id: int) -> str:
        if cgroup_id in self._names:
            return self._names[cgroup_id]
        path = self.path_of(cgroup_id)
        if path is None:
            return f"cgroup {cgroup_id}"
        ancestors = self._ancestors(path)
        for fresh in (False, True):
            pods = self._pods(fresh)
            for ino, _ in ancestors:
                if ino in pods:
                    self._names[cgroup_id] = pods[ino]
                    return pods[ino]
        for _, directory in ancestors:
            uid = pod_uid_of(os.path.basename(directory), under_kubepods="kubepods" in directory)
            if uid:
                return f"pod {uid}"  # a pod the agent has not named (yet)
        rel = os.path.relpath(path, self.mount)
        return "/" if rel == "." else "/" + rel  # a process outside every pod

    def _ancestors(self, path: str) -> list[tuple[int, str]]:
        """(cgroup id, directory) from `path` up to the mount."""
        out = []
        while path.startswith(self.mount) and len(path) >= len(self.mount):
            try:
                out.append((os.stat(path).st_ino, path))
            except OSError:
                break
            if path == self.mount:
                break
            path = os.path.dirname(path)
        return out


def find_pod(names: Mapping[int, str], text: str, namer: ClientNamer) -> tuple[int, int]:
    """--from NS/POD -> (the pod's cgroup id, its level below the cgroup2 mount)."""
    if text.count("/") != 1:
        raise UserError(f"--from {text}: expected NAMESPACE/POD; hint: --from default/client")
    matches = [cg for cg, name in pod_names(names).items() if name == text]
    if not matches:
        raise UserError(f"--from {text}: no such pod among this node's clients; hint: `meshlet maps dump "
                        "names` lists them (pods are named once the agent has seen them)")
    cgroup_id = matches[0]
    path = namer.path_of(cgroup_id)
    if path is None:
        raise UserError(f"--from {text}: its cgroup (id {cgroup_id}) is gone; hint: is the pod still running?")
    rel = os.path.relpath(path, namer.mount)
    return cgroup_id, (0 if rel == "." else len(rel.split(os.sep)))


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Summary:
    events: int = 0
    dropped: int = 0  #: decisions lost to a full ring or perf buffer while we traced


def trace(bpffs: str, flt_from: str | None, flt: Filter, count: int, emit: Callable[[Event], None],
          ready: Callable[[str], None] = lambda _: None, mount: str | None = None,
          stop: Callable[[], bool] = lambda: False) -> Summary:
    """Switch tracing on, hand each decision to `emit` until `count` (0 = no end) or Ctrl-C,
    SIGTERM or `stop()`, and switch tracing off again whatever happens."""
    from agent.mounts import require_cgroup2_mount

    mount = mount or require_cgroup2_mount()
    names = read_names(bpffs)
    names_read = time.monotonic()

    def current_pods(fresh: bool) -> Mapping[int, str]:
        nonlocal names_read
        if fresh and time.monotonic() - names_read > 1.0:
            names.update(read_names(bpffs))
            names_read = time.monotonic()
        return pod_names(names)

    namer = ClientNamer(mount, current_pods)
    if flt_from:
        cgroup, level = find_pod(names, flt_from, namer)
        flt = Filter(flt.verdicts, flt.to, cgroup, level)

    control = Control(bpffs)
    try:
        busy = control.on_until()
        if busy:
            raise UserError(f"another `meshlet trace` is running on this node (its lease ends in "
                            f"{(busy - monotonic_ns()) / 1e9:.0f} s); hint: one trace at a time, stop the other")
        ring = open_channel(bpffs)
    except BaseException:
        control.close()
        raise
    summary = Summary()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    dropped_before = control.dropped
    try:
        ring.skip_pending()
        clock_offset = time.time_ns() - monotonic_ns()
        control.start(flt, monotonic_ns() + TRACE_LEASE_S * 10**9)
        renewed = time.monotonic()
        ready(f"tracing for {TRACE_LEASE_S} s at a time, renewed every {RENEW_S:g} s (Ctrl-C stops)")
        try:
            while not count or summary.events < count:
                if time.monotonic() - renewed >= RENEW_S:
                    control.renew(monotonic_ns() + TRACE_LEASE_S * 10**9)
                    renewed = time.monotonic()
                if stop():
                    break
                ring.wait(TRACE_POLL_S)
                for record in ring.records():
                    event = decode(record, names, namer, clock_offset)
                    if _unnamed(event) and time.monotonic() - names_read > 1.0:
                        names.update(read_names(bpffs))  # the agent named something new meanwhile
                        names_read = time.monotonic()
                        event = decode(record, names, namer, clock_offset)
                    emit(event)
                    summary.events += 1
                    if count and summary.events >= count:
                        break
        except KeyboardInterrupt:
            pass
    finally:
        control.off()
        # Every decision the perf core reports lost also failed bpf_perf_event_output, which the
        # programs count in `dropped`; the larger count is the one that misses nothing.
        summary.dropped = max(control.dropped - dropped_before, ring.lost)
        signal.signal(signal.SIGTERM, previous_term)
        ring.close()
        control.close()
    return summary


def _unnamed(e: Event) -> bool:
    return any(text.startswith("0x") for text in (e.route, e.backend, e.scope))


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


# --- output ------------------------------------------------------------------------------------

COLUMNS = ("TIME", "CLIENT", "FRONTEND", "PROTO", "SCOPE", "ROUTE", "BACKEND", "ENDPOINT", "VERDICT")


class TableWriter:
    """Rows of a table printed as they come: a column widens for good when a cell needs more
    (the rows already printed cannot move), so it starts at widths that fit typical names."""

    def __init__(self, widths: tuple[int, ...] = (15, 20, 18, 5, 8, 34, 28, 18, 7)):
        self.widths = list(widths)

    def row(self, cells: tuple[str, ...]) -> str:
        self.widths = [max(w, len(c)) for w, c in zip(self.widths, cells)]
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip()


def table_cells(e: Event) -> tuple[str, ...]:
    t = time.localtime(e.time)
    stamp = time.strftime("%H:%M:%S", t) + f".{int(e.time * 1e6) % 1000000:06d}"
    verdict = e.verdict + (f" {e.errno}" if e.errno else "")
    return (stamp, e.client, e.frontend, e.protocol, e.scope or "-", e.route or "-", e.backend or "-",
            e.endpoint or "-", verdict)


def as_json(e: Event) -> dict:
    return asdict(e)
