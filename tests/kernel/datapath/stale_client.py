"""A long-lived client for the stale-socket tests: one query per interval, one JSON line per event.

`python stale_client.py udp|udp-unconnected|tcp ADDR PORT [--interval S]` runs inside a lab pod
(started by the test with Pod.popen) until its stdin closes. Events, one JSON object per line:

    {"t": monotonic seconds, "seq": n, "event": "reply", "peer": pod name}
    {"t": ..., "seq": n, "event": "error", "errno": "ECONNABORTED"}    then reconnects, retries n

- udp: one connected socket; every interval it sends query n and reads the answer. An error ends
  the socket: a new one connects (translated afresh) and query n is sent again.
- udp-unconnected: one unconnected socket, sendto/recvfrom for ever (errors are reported only).
- tcp: one connection; the answer to the connect is the pod name; every interval a byte is sent
  to check the connection still stands; an error reconnects.
Standard library only. CLOCK_MONOTONIC is one clock for the whole machine, so the test compares
these times with its own.
"""

import argparse
import errno
import json
import select
import socket
import sys
import time


def emit(**event) -> None:
    event["t"] = time.monotonic()
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def error_name(err: OSError) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "ETIMEDOUT"
    return errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__


def stdin_closed(timeout: float) -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("udp", "udp-unconnected", "tcp"))
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    target = (args.addr, args.port)
    kind = socket.SOCK_STREAM if args.mode == "tcp" else socket.SOCK_DGRAM
    sock = None
    seq = 0
    failures = 0  # in a row: retry at once after the first, then once per interval
    while True:
        try:
            if sock is None:
                sock = socket.socket(family, kind)
                sock.settimeout(1.0)
                if args.mode != "udp-unconnected":
                    sock.connect(target)
                if args.mode == "tcp":
                    emit(seq=seq, event="reply", peer=sock.recv(100).decode().strip())
            if args.mode == "udp":
                sock.send(b"q%d" % seq)
                emit(seq=seq, event="reply", peer=sock.recv(100).decode().strip())
            elif args.mode == "udp-unconnected":
                sock.sendto(b"q%d" % seq, target)
                emit(seq=seq, event="reply", peer=sock.recvfrom(100)[0].decode().strip())
            else:
                sock.send(b"x")
                emit(seq=seq, event="alive")
            seq += 1
            failures = 0
        except OSError as err:
            emit(seq=seq, event="error", errno=error_name(err))
            failures += 1
            if args.mode != "udp-unconnected":
                if sock is not None:
                    sock.close()
                sock = None
                if failures == 1:
                    continue  # retry query `seq` at once on a new socket
            else:
                seq += 1
        if stdin_closed(args.interval):
            return


if __name__ == "__main__":
    main()
