"""The tiny server every lab pod runs: it answers every TCP connection and UDP datagram with its name.

`python -m agent.lab.echo --name POD --port P [--port P2 ...]` listens on TCP and UDP on each
port, on the IPv4 and the IPv6 wildcard (two sockets, so an IPv4 peer is seen as IPv4), prints
`ready` on stdout once every socket is bound, and then serves until killed.

- TCP: on accept it sends `<name>\\n`, shuts its sending side and closes once the client has
  closed (so the client never gets a reset for an unread request).
- UDP: every datagram gets `<name>\\n` back, sent to its source from the same socket.

Standard library only (it runs inside a pod's netns, started by agent.lab.pods). One thread,
one selector: hundreds of connections a second on a 2-core machine.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import socket
import sys

#: How many connections may wait in the accept queue: the client helper opens them back to back.
LISTEN_BACKLOG = 1024


def bind_all(ports: list[int]) -> list[socket.socket]:
    sockets = []
    for port in ports:
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((wildcard, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
                sockets.append(sock)
    return sockets


def serve(name: str, ports: list[int]) -> None:
    reply = f"{name}\n".encode()
    selector = selectors.DefaultSelector()
    for sock in bind_all(ports):
        role = "accept" if sock.type == socket.SOCK_STREAM else "datagram"
        selector.register(sock, selectors.EVENT_READ, role)
    print("ready", flush=True)
    # Nothing more goes to stdout: the lab reads the one line and closes the pipe, and a
    # `meshlet lab up` outlives its reader.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if key.data == "accept":
                _accept(sock, selector, reply)
            elif key.data == "datagram":
                _answer_datagrams(sock, reply)
            else:
                _drain_until_closed(sock, selector)


def _accept(listener, selector, reply: bytes) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # A connection reset before we accepted it, or out of fds: skip it, keep serving.
            if err.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                return
            raise
        try:
            conn.send(reply)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            continue
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ, "connection")


def _drain_until_closed(conn, selector) -> None:
    try:
        data = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        selector.unregister(conn)
        conn.close()


def _answer_datagrams(sock, reply: bytes) -> None:
    while True:
        try:
            _, source = sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # An ICMP error queued on the socket (a client gone): nothing to answer.
            return
        try:
            sock.sendto(reply, source)
        except OSError:
            pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agent.lab.echo",
        description="Answer TCP connections and UDP datagrams with a name (a lab pod's server).",
        epilog="Example: python -m agent.lab.echo --name web-1 --port 8080 --port 5353",
    )
    parser.add_argument("--name", required=True, help="what to answer with (the pod name)")
    parser.add_argument("--port", type=int, action="append", required=True, help="repeatable")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.name, args.port)
    except OSError as err:
        print(f"echo: error: cannot serve on ports {args.port}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
