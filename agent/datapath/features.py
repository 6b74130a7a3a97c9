"""Kernel features: what the socket programs need, what this kernel has, and what to do about it.

Role: at start (`Datapath.open`, before anything is compiled) the running kernel is probed by
loading tiny hand-assembled programs of the hooks' type (BPF_PROG_TYPE_CGROUP_SOCK_ADDR), one
per attach type and per helper we call, plus a socket-storage map, a batch map write and a
cgroup link request that can never attach. The result is a plain `{feature name: present}`;
`decide` turns it into a `Support`: which hooks to load, which -D flags configure bpf/sock.c,
what is turned off and why, or one UserError naming everything missing and the minimum kernel.

Two halves, kept apart: FEATURES, `decide` and `Support` are pure (unit-tested with given probe
results); `probe` and its helpers do the system calls. The probe may touch only objects it makes
itself (unpinned programs and maps, closed before it returns); it attaches nothing anywhere: the
link probe names no cgroup at all, so the kernel refuses it after recognising the request.

Invariants: a feature's name is its key in probe results and its `feature` label in metrics, so
names come only from FEATURES, a fixed list. A required feature missing means no start; an
optional one missing changes behaviour in a way the start-up report spells out (`without`).
"""

from __future__ import annotations

import errno
import os
import resource
import struct
import sys
from dataclasses import dataclass
from typing import Mapping

from agent.datapath import bpfsys
from agent.datapath import uapi as U
from agent.datapath.layout import TRACE_PERF, TRACE_RINGBUF
from agent.datapath.uapi import HOOKS
from agent.errors import UserError


@dataclass(frozen=True)
class Feature:
    name: str  #: stable id: key of probe results, metric label; a hook's feature is named after it
    what: str  #: for humans, in the report and the error
    since: str  #: first mainline Linux release with it for sock_addr programs
    without: str | None = None  #: optional features: what changes without it; None: required
    define: str | None = None  #: the -D flag that lets bpf/sock.c use it (loader.cflags passes it)

    @property
    def required(self) -> bool:
        return self.without is None


_GETPEERNAME_OFF = ("getpeername() on a translated socket shows the endpoint instead of the "
                    "Service frontend (SEMANTICS A12)")


def _hook(name: str, since: str, without: str | None = None) -> Feature:
    return Feature(name, f"the cgroup {name} hook", since, without)


#: Every feature the socket programs use, in report order. The versions come from the kernel's
#: history of sock_addr attach types and helpers; the probe, not the version, decides.
FEATURES: tuple[Feature, ...] = (
    _hook("connect4", "4.17"),
    _hook("connect6", "4.17"),
    _hook("sendmsg4", "4.18"),
    _hook("sendmsg6", "4.18"),
    _hook("recvmsg4", "5.2"),
    _hook("recvmsg6", "5.2"),
    _hook("getpeername4", "5.8", _GETPEERNAME_OFF),
    _hook("getpeername6", "5.8", _GETPEERNAME_OFF),
    Feature("sk_storage", "socket-local storage (bpf_sk_storage_get)", "5.3"),
    Feature("netns_cookie", "bpf_get_netns_cookie (ClientIP session affinity keys on it)", "5.7"),
    Feature("ancestor_cgroup_id", "bpf_get_current_ancestor_cgroup_id (finds the client's pod)", "5.7"),
    Feature("cgroup_links", "bpf links on cgroups (BPF_LINK_CREATE, BPF_LINK_UPDATE)", "5.7"),
    # The map writer only batches (agent/datapath/reconcile.py through bpfsys.Map), and every
    # kernel with cgroup links has batches, so it is required rather than worked around.
    Feature("map_batch", "batch map operations (BPF_MAP_*_BATCH)", "5.6"),
    # One feature for all that passive health needs at the sock_ops hook: the hook itself (a
    # cgroup link of it), state callbacks asked per socket, and the socket storage connect wrote.
    Feature("sockops", "the cgroup sock_ops hook with bpf_sock_ops_cb_flags_set and socket storage", "5.10",
            without="passive health is off: endpoints whose handshakes fail keep being picked (SEMANTICS A17)"),
    # Not used by the programs: the agent's way to end connected sockets whose endpoint went away
    # (agent/runtime/stale.py). bcc cannot call the bpf_sock_destroy kfunc (Linux 6.5), so the
    # netlink path is the one mechanism, on every kernel.
    Feature("sock_destroy", "netlink SOCK_DESTROY of sockets (CONFIG_INET_DIAG_DESTROY)", "4.5",
            without="connected UDP sockets (and TCP connections with --terminate-tcp) keep talking to "
                    "an endpoint that left their Service until the application closes them (SEMANTICS A16)"),
    Feature("set_retval", "bpf_set_retval", "5.18",
            without="a rejected connection fails with EPERM instead of ECONNREFUSED, and one with no "
                    "usable endpoint with EPERM instead of EHOSTUNREACH",
            define="HAVE_SET_RETVAL"),
    Feature("ringbuf", "BPF ring buffers (BPF_MAP_TYPE_RINGBUF), which `meshlet trace` reads", "5.8",
            without="`meshlet trace` reads per-CPU perf buffers instead (the perf_output fallback)",
            define="HAVE_RINGBUF"),
    # The trace's fallback channel (Support.trace_channel). Older than every kernel meshlet runs
    # on (sock_addr programs had it before Linux 5.7), but probed like the rest, not assumed.
    Feature("perf_output", "bpf_perf_event_output into a perf event array, `meshlet trace`'s fallback", "5.7",
            without="`meshlet trace` has no perf-buffer fallback where ring buffers are missing"),
)

#: Test and debug knob, not a setting: "1" makes the probe answer that the kernel has no BPF ring
#: buffer, so the programs send `meshlet trace` its events through the perf-buffer fallback on a
#: kernel that has both (the kernel tests exercise the fallback this way). The start-up report
#: lists ringbuf as disabled, like on a kernel older than 5.8.
PRETEND_NO_RINGBUF_ENV = "MESHLET_PRETEND_NO_RINGBUF"

#: -D flag telling bpf/sock.c to send trace events to the perf event array (trace_perf).
TRACE_PERF_DEFINE = "TRACE_PERF_BUFFER"

NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
_BY_NAME = {f.name: f for f in FEATURES}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


#: The oldest kernel that runs meshlet at all, and the oldest with nothing turned off.
MINIMUM_KERNEL = max((f.since for f in FEATURES if f.required), key=_version)
FULL_KERNEL = max((f.since for f in FEATURES), key=_version)


@dataclass(frozen=True)
class Support:
    """What this kernel has (`present`: every feature name -> bool), and what follows from it."""

    present: Mapping[str, bool]
    kernel: str = ""

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in NAMES if self.present[name])

    @property
    def disabled(self) -> tuple[Feature, ...]:
        """Optional features this kernel lacks (required ones never get this far)."""
        return tuple(f for f in FEATURES if not self.present[f.name])

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hooks to load and attach, in uapi.HOOKS order."""
        return tuple(hook for hook in HOOKS if self.present[hook])

    @property
    def trace_channel(self) -> str | None:
        """Where the programs send `meshlet trace` its events: the ring buffer where the kernel
        has one, else the perf-buffer fallback, else nowhere (trace unavailable)."""
        if self.present["ringbuf"]:
            return TRACE_RINGBUF
        return TRACE_PERF if self.present["perf_output"] else None

    @property
    def defines(self) -> tuple[str, ...]:
        """The -D names telling bpf/sock.c which optional features it may use."""
        names = tuple(f.define for f in FEATURES if f.define and self.present[f.name])
        return names + ((TRACE_PERF_DEFINE,) if self.trace_channel == TRACE_PERF else ())

    def log_fields(self) -> dict[str, str]:
        """The start-up report, as the fields of one log line."""
        fields = {"kernel": self.kernel or "-", "enabled": ",".join(self.enabled) or "-",
                  "disabled": ",".join(f.name for f in self.disabled) or "-",
                  "trace_channel": self.trace_channel or "-"}
        if self.disabled:
            fields["effects"] = "; ".join(f"{f.name}: {f.without}" for f in self.disabled)
            fields["hint"] = f"Linux >= {FULL_KERNEL} has every feature"
        return fields


def decide(present: Mapping[str, bool], kernel: str = "") -> Support:
    """Turn probe results into a Support, or refuse with one sentence naming all that is missing.

    A name absent from `present` counts as missing; a name not in FEATURES is a caller's bug.
    """
    unknown = sorted(set(present) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown kernel features {unknown}; known: {list(NAMES)}")
    complete = {name: bool(present.get(name, False)) for name in NAMES}
    missing = [f for f in FEATURES if f.required and not complete[f.name]]
    if missing:
        on = f"Linux {kernel}" if kernel else "this kernel"
        listed = ", ".join(f"{f.what} (Linux {f.since})" for f in missing)
        raise UserError(f"{on} lacks what meshlet's socket programs need: {listed}; hint: run meshlet on "
                        f"Linux >= {MINIMUM_KERNEL} (>= {FULL_KERNEL} for every feature)")
    return Support(complete, kernel)


# --- probe: the system calls ----------------------------------------------------------------------

# Instructions (include/uapi/linux/bpf.h, `struct bpf_insn`): opcode, registers, offset, immediate.
_MOV64_IMM, _MOV64_REG, _LDX_DW, _LD_IMM64, _CALL, _EXIT = 0xB7, 0xBF, 0x79, 0x18, 0x85, 0x95
_PSEUDO_MAP_FD = 1
#: offsetof(struct bpf_sock_addr, sk): after user_family .. msg_src_ip6[4], 8-aligned.
_SOCK_ADDR_SK = 64



def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    # dst_reg and src_reg are 4-bit fields of one byte; C puts the first one in the low nibble
    # on little-endian machines and in the high nibble on big-endian ones.
    regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
    return struct.pack("=BBhi", code, regs, off, imm)


def _call_and_accept(helper: int, *setup: bytes) -> bytes:
    """`setup; call helper; r0 = 1; exit`: 1 is the verdict every sock_addr hook accepts."""
    return b"".join(setup) + _insn(_CALL, imm=helper) + _insn(_MOV64_IMM, dst=0, imm=1) + _insn(_EXIT)


_ACCEPT = _insn(_MOV64_IMM, dst=0, imm=1) + _insn(_EXIT)

#: errnos by which the kernel says "no such attach type, helper, map type or command" (the
#: verifier answers an unknown helper with EINVAL, a context field it does not have with
#: EACCES). Anything else is a failure to probe, not an answer.
_ABSENT = frozenset({errno.EINVAL, errno.EACCES, errno.E2BIG, errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP

#: A one-type BTF blob: `int` (32 bits, signed) as type 1, the key and value type the kernel
#: demands of a socket-storage map (struct btf_header, one btf_type + its int data, strings).
_BTF_INT = (struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, 16, 16, 5)
            + struct.pack("=IIII", 1, 1 << 24, 4, 1 << 24 | 32) + b"\0int\0")


def _loads(attach_type: int, insns: bytes) -> bool:
    """Does the kernel load this sock_addr program for this attach type?"""
    try:
        fd = bpfsys.prog_load(U.PROG_TYPE_CGROUP_SOCK_ADDR, insns, attach_type, log_size=4096)
    except bpfsys.BpfError as err:
        return _answer(err)
    os.close(fd)
    return True


def _answer(err: bpfsys.BpfError) -> bool:
    if err.errno in _ABSENT:
        return False
    raise UserError(f"cannot probe the kernel's BPF features ({err}); hint: run the agent as root "
                    "(CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN), or raise its RLIMIT_MEMLOCK") from None


def hook_available(attach_type: int) -> bool:
    """Does the kernel know this attach type for sock_addr programs?"""
    return _loads(attach_type, _ACCEPT)


def helper_available(helper: int, attach_type: int = HOOKS["connect4"]) -> bool:
    """May a sock_addr program of this attach type call this helper (with a zero argument in r1
    when it takes a scalar; the context is already in r1 for the ones that take it)?"""
    setup = () if helper == U.HELPER_GET_NETNS_COOKIE else (_insn(_MOV64_IMM, dst=1, imm=0),)
    return _loads(attach_type, _call_and_accept(helper, *setup))


def _on_own_sk_storage_map(probe) -> bool:
    """probe(map_fd) on a socket-storage map of our own (which needs BTF for its key and value:
    an int each), closed afterwards; a kernel that cannot make one answers as `_answer` says."""
    try:
        btf_fd = bpfsys.btf_load(_BTF_INT)
    except bpfsys.BpfError as err:
        return _answer(err)
    try:
        try:
            map_fd = bpfsys.map_create(U.MAP_TYPE_SK_STORAGE, 4, 4, 0, U.BPF_F_NO_PREALLOC,
                                       btf_fd=btf_fd, btf_key_type_id=1, btf_value_type_id=1)
        except bpfsys.BpfError as err:
            return _answer(err)
        try:
            return probe(map_fd)
        finally:
            os.close(map_fd)
    finally:
        os.close(btf_fd)


def sk_storage_available(attach_types: list[int]) -> bool:
    """bpf_sk_storage_get(map, ctx->sk, NULL, F_CREATE) in a program of each attach type."""
    def probe(map_fd: int) -> bool:
        insns = _call_and_accept(
            U.HELPER_SK_STORAGE_GET,
            _insn(_MOV64_REG, dst=6, src=1),  # r6 = ctx
            _insn(_LDX_DW, dst=2, src=6, off=_SOCK_ADDR_SK),  # r2 = ctx->sk
            _insn(_LD_IMM64, dst=1, src=_PSEUDO_MAP_FD, imm=map_fd), _insn(0),  # r1 = map
            _insn(_MOV64_IMM, dst=3, imm=0),  # no initial value
            _insn(_MOV64_IMM, dst=4, imm=U.SK_STORAGE_GET_F_CREATE),
        )
        return all(_loads(attach_type, insns) for attach_type in attach_types)
    return _on_own_sk_storage_map(probe)


#: offsetof(struct bpf_sock_ops, sk) (uapi, stable since Linux 5.3).
_SOCK_OPS_SK = 184
_JEQ_IMM = 0x15


def sockops_available() -> bool:
    """A sock_ops program that does what bpf/sock.c's sockops does with the kernel: read ctx->sk,
    bpf_sk_storage_get on a socket-storage map of our own, bpf_sock_ops_cb_flags_set."""
    def probe(map_fd: int) -> bool:
        insns = b"".join((
            _insn(_MOV64_REG, dst=6, src=1),  # r6 = ctx
            _insn(_LDX_DW, dst=2, src=6, off=_SOCK_OPS_SK),  # r2 = ctx->sk
            _insn(_JEQ_IMM, dst=2, off=8, imm=0),  # no socket: accept
            _insn(_LD_IMM64, dst=1, src=_PSEUDO_MAP_FD, imm=map_fd), _insn(0),  # r1 = map
            _insn(_MOV64_IMM, dst=3, imm=0),
            _insn(_MOV64_IMM, dst=4, imm=0),
            _insn(_CALL, imm=U.HELPER_SK_STORAGE_GET),
            _insn(_MOV64_REG, dst=1, src=6),
            _insn(_MOV64_IMM, dst=2, imm=0),
            _insn(_CALL, imm=U.HELPER_SOCK_OPS_CB_FLAGS_SET),
        )) + _ACCEPT
        try:
            fd = bpfsys.prog_load(U.PROG_TYPE_SOCK_OPS, insns, HOOKS["sockops"], log_size=4096)
        except bpfsys.BpfError as err:
            return _answer(err)
        os.close(fd)
        return True
    return _on_own_sk_storage_map(probe)


def cgroup_links_available() -> bool:
    """BPF_LINK_CREATE for a connect4 program with no cgroup at all (fd -1): a kernel with cgroup
    links looks the cgroup up and answers EBADF; one without answers EINVAL (no such command).
    Nothing can be attached by this request."""
    try:
        prog_fd = bpfsys.prog_load(U.PROG_TYPE_CGROUP_SOCK_ADDR, _ACCEPT, HOOKS["connect4"])
    except bpfsys.BpfError as err:
        return _answer(err)
    try:
        link_fd = bpfsys.link_create_cgroup(prog_fd, 0xFFFFFFFF, HOOKS["connect4"])  # (u32)-1
    except bpfsys.BpfError as err:
        return err.errno == errno.EBADF or _answer(err)
    finally:
        os.close(prog_fd)
    os.close(link_fd)  # unreachable in practice: fd -1 is no cgroup
    return True


def map_batch_available() -> bool:
    """One BPF_MAP_UPDATE_BATCH write into a one-entry hash map of our own."""
    try:
        fd = bpfsys.map_create(U.MAP_TYPE_HASH, 4, 4, 1)
    except bpfsys.BpfError as err:
        return _answer(err)
    try:
        return bpfsys.map_update_batch(fd, bytes(4), bytes(4), 1) == 1
    except bpfsys.BpfError as err:
        return _answer(err)
    finally:
        os.close(fd)


def ringbuf_available() -> bool:
    """A one-page ring buffer of our own (no key, no value)."""
    try:
        fd = bpfsys.map_create(U.MAP_TYPE_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE"))
    except bpfsys.BpfError as err:
        return _answer(err)
    os.close(fd)
    return True


_ST_DW, _ADD64_IMM = 0x7A, 0x07


def perf_output_available() -> bool:
    """bpf_perf_event_output(ctx, map, flags, data, 8) in a connect4 program, into a perf event
    array of our own: the verifier checks the helper and its argument types at load."""
    try:
        map_fd = bpfsys.map_create(U.MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 1)
    except bpfsys.BpfError as err:
        return _answer(err)
    try:
        return _loads(HOOKS["connect4"], _call_and_accept(
            U.HELPER_PERF_EVENT_OUTPUT,  # r1 is the context already
            _insn(_ST_DW, dst=10, off=-8, imm=0),  # 8 zero bytes on the stack: the data
            _insn(_LD_IMM64, dst=2, src=_PSEUDO_MAP_FD, imm=map_fd), _insn(0),  # r2 = map
            _insn(_MOV64_IMM, dst=3, imm=0),  # flags
            _insn(_MOV64_REG, dst=4, src=10), _insn(_ADD64_IMM, dst=4, imm=-8),  # r4 = the data
            _insn(_MOV64_IMM, dst=5, imm=8),  # its size
        ))
    finally:
        os.close(map_fd)


def sock_destroy_available() -> bool:
    """Netlink SOCK_DESTROY, tried on a UDP socket of our own (agent/datapath/sockdiag.py)."""
    from agent.datapath import sockdiag

    try:
        return sockdiag.destroy_available()
    except OSError:
        # No sock_diag netlink family, or not allowed to us: optional, so absent (the start-up
        # report then says what is lost) rather than a refusal to start.
        return False


def _raise_memlock() -> None:
    # Kernels before 5.11 charge BPF objects to RLIMIT_MEMLOCK, often 64 KiB: a probe refused
    # for that would read as "no feature". bcc raises the limit the same way when it loads.
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass  # not allowed: the probe then says what failed


#: The hooks whose programs call translate() in bpf/sock.c (the helpers' users); reverse() runs
#: at the others. A helper counts as present only if every hook that calls it may call it
#: (the kernel allows some helpers at some attach types only: bpf_set_retval not at recvmsg).
_TRANSLATING = ("connect4", "connect6", "sendmsg4", "sendmsg6")


def probe() -> dict[str, bool]:
    """Probe the running kernel: every name of FEATURES -> present. Needs CAP_BPF or root."""
    _raise_memlock()
    found = {hook: hook_available(attach_type) for hook, attach_type in HOOKS.items()
             if hook not in U.HOOK_PROG_TYPES}

    def at(hooks) -> list[int]:
        # Only at hooks this kernel has (a missing hook is reported as itself, not as its
        # helpers); at the first one anyway when it has none of them.
        return [HOOKS[h] for h in hooks if found[h]] or [HOOKS[hooks[0]]]

    def helper(helper_id: int) -> bool:
        return all(helper_available(helper_id, attach_type) for attach_type in at(_TRANSLATING))

    found["sk_storage"] = sk_storage_available(at(tuple(h for h in HOOKS if h not in U.HOOK_PROG_TYPES)))
    found["netns_cookie"] = helper(U.HELPER_GET_NETNS_COOKIE)
    found["ancestor_cgroup_id"] = helper(U.HELPER_GET_CURRENT_ANCESTOR_CGROUP_ID)
    found["cgroup_links"] = cgroup_links_available()
    found["map_batch"] = map_batch_available()
    found["set_retval"] = helper(U.HELPER_SET_RETVAL)
    found["sockops"] = sockops_available()
    found["ringbuf"] = ringbuf_available() and os.environ.get(PRETEND_NO_RINGBUF_ENV) != "1"
    found["perf_output"] = perf_output_available()
    found["sock_destroy"] = sock_destroy_available()
    assert set(found) == set(NAMES), "probe and FEATURES disagree"
    return found
