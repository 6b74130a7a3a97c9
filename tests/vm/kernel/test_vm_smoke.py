"""The kernel-matrix VM's own smoke test: compile, load and attach one socket program, use it.

Runs on the host kernel (with the other kernel tests) and inside the kernel-matrix VM
(scripts/vm/run-kernel-tests.sh puts it first), so a failure of the VM plumbing (headers for the
VM's kernel, bpffs, cgroup2, bcc over 9p) shows here, apart from the datapath's own tests.

It proves on the running kernel the two facilities every meshlet program relies on: a
cgroup/connect4 program that rewrites the destination, and bpf_set_retval (Linux 5.18) turning a
rejection into ECONNREFUSED instead of EPERM.

Touches: one cgroup it makes below the cgroup2 mount, one network namespace (unshare) holding
only loopback; the program is attached to that cgroup alone and detached, and the cgroup removed,
also on failure. Nothing is pinned.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.kernel

FRONTEND = ("10.96.0.1", 80)  #: rewritten to the backend
REJECTED = ("10.96.0.2", 80)  #: refused by the program with bpf_set_retval(-ECONNREFUSED)
UNTOUCHED = ("10.96.0.3", 80)  #: left alone: no route in the namespace, so ENETUNREACH
BACKEND_PORT = 18080  #: the server on 127.0.0.1 inside the namespace

PROGRAM = r"""
#include <uapi/linux/bpf.h>

#define ECONNREFUSED 111

int connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 == FRONTEND_IP && ctx->user_port == FRONTEND_PORT) {
        ctx->user_ip4 = BACKEND_IP;
        ctx->user_port = BACKEND_PORT;
    } else if (ctx->user_ip4 == REJECTED_IP) {
        bpf_set_retval(-ECONNREFUSED);
        return 0;
    }
    return 1;
}
"""

#: Runs inside the namespace and the cgroup: serves on the backend, connects to the three
#: destinations, prints what each connect did as JSON.
CLIENT = r"""
import errno, json, socket, sys, threading
frontend, rejected, untouched, backend_port = json.loads(sys.argv[1])
server = socket.create_server(("127.0.0.1", backend_port))
def serve():
    conn, _ = server.accept()
    conn.sendall(b"backend")
    conn.close()
threading.Thread(target=serve, daemon=True).start()
out = {}
for name, dest in (("frontend", frontend), ("rejected", rejected), ("untouched", untouched)):
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.connect(tuple(dest))
        out[name] = {"peer": list(sock.getpeername()), "reply": sock.recv(16).decode()}
    except OSError as err:
        out[name] = {"errno": errno.errorcode.get(err.errno, str(err.errno))}
    finally:
        sock.close()
print(json.dumps(out))
"""


def be32(address: str) -> int:
    """An IPv4 address as the program compares it: network order read as a host integer."""
    return struct.unpack("=I", socket.inet_aton(address))[0]


def cgroup2_mount() -> str:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return fields[1]
    raise AssertionError("no cgroup2 mount (conftest should have skipped)")


@pytest.fixture(scope="module")
def smoke_cgroup():
    from bcc import BPF, BPFAttachType

    path = os.path.join(cgroup2_mount(), f"meshlet-vm-smoke-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        cflags = [
            f"-DFRONTEND_IP={be32(FRONTEND[0])}u", f"-DFRONTEND_PORT={socket.htons(FRONTEND[1])}",
            f"-DBACKEND_IP={be32('127.0.0.1')}u", f"-DBACKEND_PORT={socket.htons(BACKEND_PORT)}",
            f"-DREJECTED_IP={be32(REJECTED[0])}u",
        ]
        bpf = BPF(text=PROGRAM.encode(), cflags=cflags)
        fn = bpf.load_func(b"connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpf.attach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
            try:
                yield path
            finally:
                bpf.detach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
        finally:
            os.close(fd)
            bpf.cleanup()
    finally:
        os.rmdir(path)  # the client process has exited, so the cgroup is empty


@pytest.fixture(scope="module")
def outcomes(smoke_cgroup):
    """What the client saw, from a process in a fresh network namespace inside the cgroup."""
    # The shell joins the cgroup before it execs Python, so every connect() runs the program.
    script = (f'echo $$ > {smoke_cgroup}/cgroup.procs && ip link set lo up && '
              f'exec "$0" -c "$1" "$2"')
    args = json.dumps([FRONTEND, REJECTED, UNTOUCHED, BACKEND_PORT])
    done = subprocess.run(["unshare", "--net", "--", "sh", "-c", script, sys.executable, CLIENT, args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_connect_to_the_frontend_reaches_the_backend(outcomes):
    assert outcomes["frontend"] == {"peer": ["127.0.0.1", BACKEND_PORT], "reply": "backend"}


def test_set_retval_refuses_with_econnrefused(outcomes):
    assert outcomes["rejected"] == {"errno": "ECONNREFUSED"}


def test_other_destinations_are_left_alone(outcomes):
    assert outcomes["untouched"] == {"errno": "ENETUNREACH"}
