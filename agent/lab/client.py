"""The lab's client: N new connections (or UDP flows) from one process, and where they went, as JSON.

`python -m agent.lab.client tcp|udp ADDR PORT --count N [--family 4|6|mapped] [--unconnected]
[--interval S]`
runs inside a lab pod (agent.lab.pods.Pod.run) and prints one JSON object:

    {"peers": {pod_name: count}, "errors": {errno_name: count},
     "getpeername": [distinct peer addresses seen], "reply_from": [distinct UDP reply sources]}

- tcp: N times a new socket, connect, getpeername, read the echo's answer (the pod name) to EOF.
- udp: N times a new connected socket (one UDP flow each: SEMANTICS A10), getpeername, send,
  read the answer; with --unconnected, one unconnected socket sends N datagrams with sendto and
  reads each answer with recvfrom (the whole socket is one flow).
- --family mapped: an AF_INET6 socket aimed at ::ffff:ADDR (SEMANTICS A13); ADDR is IPv4.

Errors are counted by errno name (ECONNREFUSED, EHOSTUNREACH, ETIMEDOUT for a timeout), plus
EOF for a connection closed without an answer. Addresses print as `ip:port` or `[ip6]:port`.
The standard library and agent.model only (no third-party package): it starts in a few tens
of milliseconds inside a pod.
"""

from __future__ import annotations

import argparse
import collections
import errno
import ipaddress
import json
import socket
import sys
import time

from agent.model import host_port

FAMILIES = ("4", "6", "mapped")


def format_address(sockaddr) -> str:
    return host_port(sockaddr[0], sockaddr[1])


def error_name(err: BaseException) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "ETIMEDOUT"
    if isinstance(err, OSError) and err.errno:
        return errno.errorcode.get(err.errno, str(err.errno))
    return type(err).__name__


def target(addr: str, port: int, family: str | None) -> tuple[int, tuple]:
    """The socket family and sockaddr to use for ADDR PORT under --family."""
    ip = ipaddress.ip_address(addr)
    if family is None:
        family = str(ip.version)
    if family == "mapped":
        if ip.version != 4:
            raise ValueError("--family mapped needs an IPv4 ADDR (it connects to ::ffff:ADDR)")
        return socket.AF_INET6, (f"::ffff:{ip}", port)
    if family != str(ip.version):
        raise ValueError(f"--family {family} does not match the address {addr}")
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


class Tally:
    def __init__(self):
        self.peers = collections.Counter()
        self.errors = collections.Counter()
        self.getpeername: dict[str, None] = {}  # ordered set
        self.reply_from: dict[str, None] = {}

    def answer(self, data: bytes) -> None:
        name = data.decode(errors="replace").strip()
        if name:
            self.peers[name] += 1
        else:
            self.errors["EOF"] += 1

    def as_json(self) -> dict:
        return {
            "peers": dict(sorted(self.peers.items())),
            "errors": dict(sorted(self.errors.items())),
            "getpeername": list(self.getpeername),
            "reply_from": list(self.reply_from),
        }


def read_to_eof(sock) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def tcp_connections(family, sockaddr, count: int, timeout: float, tally: Tally,
                    interval: float = 0.0) -> None:
    for i in range(count):
        if i and interval:
            time.sleep(interval)  # connections spaced in time, e.g. to slide an affinity timeout
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
                tally.getpeername[format_address(sock.getpeername())] = None
                tally.answer(read_to_eof(sock))
            except OSError as err:
                tally.errors[error_name(err)] += 1


def udp_flows(family, sockaddr, count: int, timeout: float, tally: Tally) -> None:
    for _ in range(count):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
                tally.getpeername[format_address(sock.getpeername())] = None
                sock.send(b"hello\n")
                data, source = sock.recvfrom(65536)
                tally.reply_from[format_address(source)] = None
                tally.answer(data)
            except OSError as err:
                tally.errors[error_name(err)] += 1


def udp_unconnected(family, sockaddr, count: int, timeout: float, tally: Tally) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for _ in range(count):
            try:
                sock.sendto(b"hello\n", sockaddr)
                data, source = sock.recvfrom(65536)
                tally.reply_from[format_address(source)] = None
                tally.answer(data)
            except OSError as err:
                tally.errors[error_name(err)] += 1


def run(kind: str, addr: str, port: int, count: int, family: str | None = None,
        unconnected: bool = False, timeout: float = 2.0, interval: float = 0.0) -> dict:
    sock_family, sockaddr = target(addr, port, family)
    tally = Tally()
    if kind == "tcp":
        if unconnected:
            raise ValueError("--unconnected is for udp only")
        tcp_connections(sock_family, sockaddr, count, timeout, tally, interval)
    elif unconnected:
        udp_unconnected(sock_family, sockaddr, count, timeout, tally)
    else:
        udp_flows(sock_family, sockaddr, count, timeout, tally)
    return tally.as_json()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agent.lab.client",
        description="Open N new connections or UDP flows and print, as JSON, which pods answered.",
        epilog="Example: meshlet lab exec default/client -- python -m agent.lab.client "
        "tcp 10.96.0.10 80 --count 100",
    )
    parser.add_argument("kind", choices=("tcp", "udp"))
    parser.add_argument("addr", help="IPv4 or IPv6 address (a ClusterIP, a pod IP)")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1, help="connections or flows (default 1)")
    parser.add_argument("--family", choices=FAMILIES, help="default: the address's own family")
    parser.add_argument("--unconnected", action="store_true",
                        help="udp: one unconnected socket sending COUNT datagrams")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds per connect or answer (default 2)")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="tcp: seconds between one connection and the next (default 0)")
    args = parser.parse_args(argv)
    try:
        result = run(args.kind, args.addr, args.port, args.count, args.family,
                     args.unconnected, args.timeout, args.interval)
    except ValueError as err:
        parser.error(str(err))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
