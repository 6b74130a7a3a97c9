"""Netlink sock_diag (inet_diag): list a network namespace's sockets with meshlet's socket storage,
and destroy one (SOCK_DESTROY), for terminating sockets whose endpoint went away (SEMANTICS A16).

Role: the system calls only. `DiagSocket.inside(netns_path)` opens a NETLINK_SOCK_DIAG socket in
another network namespace (on a short-lived thread that enters it: setns changes one thread);
the socket stays bound to that namespace for its whole life. `dump` asks the kernel for the
sockets of one family and protocol in some states, with the value each holds in our pinned
socket-storage map (INET_DIAG_REQ_SK_BPF_STORAGES, Linux 5.2): a socket without a value was never
translated by meshlet. `destroy` aborts one socket by its id (address tuple and cookie, as the
dump gave it): the application's next call fails (ECONNABORTED; a UDP socket is also
disconnected, so its next send fails with EDESTADDRREQ). The kernel does this only
with CONFIG_INET_DIAG_DESTROY; `destroy_available` probes it on a socket of our own.

Why netlink and not a BPF socket iterator calling the bpf_sock_destroy kfunc (Linux 6.5): bcc
0.26 cannot call kfuncs ("cannot call non-static helper function"), and the netlink path also
serves Linux 6.1.

May touch: the netlink sockets it opens and the sockets it is told to destroy; never a socket
that the caller did not pick from a dump. Every failure raises OSError with the errno.

The C layouts (include/uapi/linux/inet_diag.h, sock_diag.h, netlink.h) are quoted beside their
struct formats below; all fields are host order except the addresses and ports (network order).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterator

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 1 << 15

# enum { INET_DIAG_REQ_NONE, INET_DIAG_REQ_BYTECODE, INET_DIAG_REQ_SK_BPF_STORAGES, ... }
INET_DIAG_REQ_SK_BPF_STORAGES = 2
# enum { ..., SK_DIAG_BPF_STORAGE_REQ_MAP_FD }
SK_DIAG_BPF_STORAGE_REQ_MAP_FD = 1
# the reply's attribute (enum after INET_DIAG_NONE .. INET_DIAG_CLASS_ID, MD5SIG, ULP_INFO)
INET_DIAG_SK_BPF_STORAGES = 20
# nested in it: SK_DIAG_BPF_STORAGE, holding SK_DIAG_BPF_STORAGE_MAP_ID and _MAP_VALUE
SK_DIAG_BPF_STORAGE = 1
SK_DIAG_BPF_STORAGE_MAP_VALUE = 3

#: TCP states (include/net/tcp_states.h); a connected UDP socket is ESTABLISHED, an unconnected
#: one CLOSE.
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2 = 1, 2, 4, 5
TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 7, 8, 9, 11

#: States of a connection a client opened (no listener, no TIME_WAIT: those hold no storage).
CLIENT_TCP_STATES = (TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT,
                     TCP_LAST_ACK, TCP_CLOSING)

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid; };
_NLMSGHDR = struct.Struct("=IHHII")
# struct nlattr { __u16 nla_len; __u16 nla_type; };
_NLATTR = struct.Struct("=HH")
# struct inet_diag_sockid { __be16 idiag_sport; __be16 idiag_dport; __be32 idiag_src[4];
#                           __be32 idiag_dst[4]; __u32 idiag_if; __u32 idiag_cookie[2]; };
_SOCKID = "2s2s16s16sI8s"
# struct inet_diag_req_v2 { __u8 sdiag_family; __u8 sdiag_protocol; __u8 idiag_ext; __u8 pad;
#                           __u32 idiag_states; struct inet_diag_sockid id; };
_REQ_V2 = struct.Struct("=BBBxI" + _SOCKID)
# struct inet_diag_msg { __u8 idiag_family; __u8 idiag_state; __u8 idiag_timer; __u8 idiag_retrans;
#                        struct inet_diag_sockid id; __u32 idiag_expires; __u32 idiag_rqueue;
#                        __u32 idiag_wqueue; __u32 idiag_uid; __u32 idiag_inode; };
_MSG = struct.Struct("=BBBB" + _SOCKID + "IIIII")

_ALIGN = 4
_SOL_SOCKET_SO_COOKIE = 57  # include/uapi/asm-generic/socket.h; socket.SO_COOKIE is Python 3.12+
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def _attr(kind: int, payload: bytes) -> bytes:
    head = _NLATTR.pack(_NLATTR.size + len(payload), kind)
    return head + payload + bytes(_align(len(payload)) - len(payload))


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order flags, payload) of each attribute in `data`."""
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _NLATTR.size:offset + length]
        offset += _align(length)


def mapped16(family: int, raw: bytes) -> bytes:
    """An inet_diag address (16 bytes, IPv4 in the first 4) as meshlet stores addresses: 16 bytes,
    IPv4 mapped (::ffff:a.b.c.d), as bpf/meshlet.h says."""
    if family == socket.AF_INET:
        return bytes(10) + b"\xff\xff" + raw[:4]
    return raw


@dataclass(frozen=True)
class DiagSocket:
    """One socket as a dump listed it."""

    family: int  #: AF_INET or AF_INET6
    protocol: int  #: IPPROTO_UDP or IPPROTO_TCP
    state: int  #: TCP_* (connected UDP: TCP_ESTABLISHED)
    local: bytes  #: 16 bytes, IPv4 mapped
    local_port: int  #: host order
    peer: bytes  #: 16 bytes, IPv4 mapped
    peer_port: int  #: host order
    storage: bytes | None  #: its value in the requested socket-storage map, None if it has none
    sockid: bytes  #: the kernel's inet_diag_sockid, handed back as is to destroy it

    @property
    def cookie(self) -> int:
        return int.from_bytes(self.sockid[-8:-4], "little") | int.from_bytes(self.sockid[-4:], "little") << 32


class Netlink:
    """A NETLINK_SOCK_DIAG socket, bound to the network namespace it was opened in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._seq = 0

    @classmethod
    def here(cls) -> "Netlink":
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        sock.bind((0, 0))
        return cls(sock)

    @classmethod
    def inside(cls, netns_path: str, inode: int | None = None) -> "Netlink":
        """A socket in the network namespace at `netns_path` (/proc/PID/ns/net, /run/netns/NAME).
        Opened on a thread of its own that enters the namespace and ends: ours never moves.
        `inode`: the namespace meant; ENOENT if the path now opens another one (a reused pid)."""
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        if inode is not None and os.fstat(fd).st_ino != inode:
            os.close(fd)
            raise OSError(errno.ENOENT, f"{netns_path} is another network namespace now")
        result: dict = {}

        def body() -> None:
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
                result["value"] = cls.here()
            except BaseException as err:  # handed to the caller below
                result["error"] = err

        try:
            thread = threading.Thread(target=body, name="sockdiag-netns")
            thread.start()
            thread.join()
        finally:
            os.close(fd)
        if "error" in result:
            raise result["error"]
        return result["value"]

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, self._seq, 0) + payload)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of each message answering `seq`, until DONE or an error/ack."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += _align(length)
                if got_seq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return  # an ack
                yield kind, payload

    def dump(self, family: int, protocol: int, states: tuple[int, ...], storage_map_fd: int | None = None
             ) -> Iterator[DiagSocket]:
        """The sockets of this namespace of one family and protocol in `states`, each with its
        value in the socket-storage map `storage_map_fd` (None: no storage asked)."""
        mask = 0
        for state in states:
            mask |= 1 << state
        payload = _REQ_V2.pack(family, protocol, 0, mask, bytes(2), bytes(2), bytes(16), bytes(16), 0, bytes(8))
        if storage_map_fd is not None:
            payload += _attr(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
                             _attr(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, struct.pack("=I", storage_map_fd)))
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, payload)
        for _kind, body in self._replies(seq):
            yield _parse_msg(protocol, body)

    def destroy(self, sk: DiagSocket) -> bool:
        """Abort `sk` (SOCK_DESTROY). False when it is gone already (closed since the dump)."""
        payload = _REQ_V2.pack(sk.family, sk.protocol, 0, 0xFFFFFFFF, *_split_sockid(sk.sockid))
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, payload)
        try:
            for _ in self._replies(seq):
                pass
        except OSError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        return True


def _split_sockid(raw: bytes) -> tuple:
    return struct.unpack("=" + _SOCKID, raw)


def _parse_msg(protocol: int, body: bytes) -> DiagSocket:
    family, state, _timer, _retrans, sport, dport, src, dst, _if, _cookie, *_rest = _MSG.unpack_from(body)
    sockid_start = 4
    sockid = body[sockid_start:sockid_start + struct.calcsize("=" + _SOCKID)]
    storage = None
    for kind, payload in _attrs(body[_align(_MSG.size):]):
        if kind != INET_DIAG_SK_BPF_STORAGES:
            continue
        for inner_kind, inner in _attrs(payload):
            if inner_kind != SK_DIAG_BPF_STORAGE:
                continue
            for field_kind, value in _attrs(inner):
                if field_kind == SK_DIAG_BPF_STORAGE_MAP_VALUE:
                    storage = value
    return DiagSocket(family, protocol, state, mapped16(family, src), int.from_bytes(sport, "big"),
                      mapped16(family, dst), int.from_bytes(dport, "big"), storage, sockid)


def destroy_available() -> bool:
    """Does this kernel destroy UDP sockets through netlink (CONFIG_INET_DIAG_DESTROY)? Tried on
    a socket of our own, bound to a free port of this namespace and never used: afterwards a read
    on it fails with ECONNABORTED when it worked. Needs CAP_NET_ADMIN (root)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
        cookie = probe.getsockopt(socket.SOL_SOCKET, _SOL_SOCKET_SO_COOKIE, 8)
        sockid = struct.pack("=" + _SOCKID, port.to_bytes(2, "big"), bytes(2), bytes(16), bytes(16), 0, cookie)
        nl = Netlink.here()
        try:
            target = DiagSocket(socket.AF_INET, socket.IPPROTO_UDP, TCP_CLOSE, b"", port, b"", 0, None, sockid)
            try:
                if not nl.destroy(target):
                    return False
            except OSError as err:
                if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EACCES):
                    return False  # no destroy in this kernel (or not allowed to us)
                raise
        finally:
            nl.close()
        try:
            probe.recv(1, socket.MSG_DONTWAIT)
        except OSError as err:
            return err.errno == errno.ECONNABORTED
        return False
    finally:
        probe.close()
