"""A lab of pods on one machine: network namespaces, veths, a bridge and kubelet-style cgroups.

Role: give the demo, the kernel tests and `meshlet lab` real pods without a cluster. A `Lab` is a
context manager; everything it makes is removed on exit, also when the body raises or on Ctrl-C.

Topology (built with pyroute2; nothing is ever added to the machine's own network namespace):

    pod netns meshlet-<lab>-<ns>-<pod>       eth0: podIP/32, podIPv6/128, lo up
        default via 10.244.0.1 / fe80::1     (every pod talks through the node netns)
          | veth (node side: vpod<N>)
    node netns meshlet-<lab>-node            bridge br0: 10.244.0.1/32, fd00:244::1/128, fe80::1/64
        one host route per pod on br0, forwarding on, and no default route: a connection the
        datapath did not translate (to a ClusterIP, say) dies here and the client gets
        ENETUNREACH, which no datapath verdict uses (a reject is ECONNREFUSED, an unreachable
        local-only Service EHOSTUNREACH). IPv6 fails at once; IPv4 the same for the first few,
        then the kernel's fixed per-source limit (about one ICMP error a second) makes each
        further one wait for a SYN retransmission. There is no uplink: nothing can leave the lab.

Cgroups (SEMANTICS C1), under the lab's own subtree `<cgroup2 mount>/meshlet-lab-<lab>` (the
`cgroup_root` to hand to `meshlet run --cgroup-root`; the machine's cgroup root is never used):

    systemd:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice
              (guaranteed: kubepods.slice/kubepods-pod<uid_>.slice)
              + a container child cri-containerd-<id>.scope where the processes run
    cgroupfs: kubepods/<qos>/pod<uid> (guaranteed: kubepods/pod<uid>) + a container child <id>

Because processes run in the container child, not in the pod cgroup itself, a datapath that
finds the pod must walk up the cgroup ancestors, as it must on a real node.

May touch: network namespaces named meshlet-<lab>-*, the cgroup subtree meshlet-lab-<lab>, and
processes it started (by pid; on teardown also any process left inside its own cgroup subtree).

Invariants: every resource is written into the `record` before it is made, and teardown removes
exactly what the record names (in reverse: processes, network namespaces, cgroups), tolerating
what is already gone. The record is plain JSON, so `meshlet lab down` can remove a lab made by an
earlier process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from agent.errors import UserError
from agent.mounts import require_cgroup2_mount
from agent.kubelet import LAYOUTS, QOS_CLASSES, pod_cgroup_path

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NETNS_PREFIX = "meshlet-"
CGROUP_PREFIX = "meshlet-lab-"

#: The pod address pools and the node's gateway addresses (the bridge in the node netns).
POD_POOL_V4 = ipaddress.ip_network("10.244.0.0/16")
POD_POOL_V6 = ipaddress.ip_network("fd00:244::/64")
GATEWAY_V4 = "10.244.0.1"
GATEWAY_V6 = "fd00:244::1"
GATEWAY_LINK_LOCAL = "fe80::1"
BRIDGE = "br0"
#: The bridge's own MAC, set when it is made (locally administered). A bridge whose address was
#: never set takes the lowest MAC of its ports, so a pod added or removed later could change the
#: gateway's MAC under every pod's ARP cache: their IPv4 traffic then went nowhere for seconds.
BRIDGE_MAC = "02:6d:65:73:68:01"
POD_IFNAME = "eth0"


#: How long a started echo server may take to say `ready` (a cold Python start on a busy CI box).
ECHO_READY_TIMEOUT = 15.0
#: How long a process gets to exit on SIGTERM before SIGKILL at teardown.
TERMINATE_GRACE = 2.0

_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
_libc = ctypes.CDLL(None, use_errno=True)


# --- pure naming rules ---------------------------------------------------------------------------


def container_cgroup_name(layout: str, uid: str) -> str:
    """The container child of a pod cgroup, named as containerd would (an id derived from the uid)."""
    container_id = hashlib.sha256(uid.encode()).hexdigest()
    return f"cri-containerd-{container_id}.scope" if layout == "systemd" else container_id


def node_cgroup_path(layout: str) -> str:
    """Where the lab's "node processes" (not in any pod) run, relative to the cgroup root."""
    return "system.slice/meshlet-lab-node.scope" if layout == "systemd" else "system/meshlet-lab-node"


def netns_name(lab: str, *parts: str, hashed: bool = False) -> str:
    """meshlet-<lab>-<parts...>, shortened with a hash when it would be unwieldy (or when asked:
    "a-b"/"c" and "a"/"b-c" would otherwise share a name)."""
    name = "-".join((NETNS_PREFIX + lab,) + parts)
    if len(name) <= 48 and not hashed:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{NETNS_PREFIX}{lab}-{parts[-1][:20]}-{digest}"


def unique_lab_name(prefix: str = "t") -> str:
    """A fresh lab name for a test run (short: it prefixes every netns name)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def cgroup2_mount() -> str:
    """The cgroup2 mount point (agent.mounts; /sys/fs/cgroup on most machines)."""
    return require_cgroup2_mount()


class AddressPool:
    """Hands out pod addresses in order from the pools, skipping ones already taken."""

    def __init__(self):
        self.taken: set[str] = {GATEWAY_V4, GATEWAY_V6}
        self.next_index = 2

    def take(self, address: str) -> str:
        canonical = str(ipaddress.ip_address(address))
        if canonical in self.taken:
            raise UserError(f"address {canonical} is already used in this lab; "
                            "hint: give every pod its own podIP")
        self.taken.add(canonical)
        return canonical

    def allocate(self, version: int) -> str:
        pool = POD_POOL_V4 if version == 4 else POD_POOL_V6
        while True:
            index = self.next_index
            candidate = str(pool.network_address + index)
            if candidate not in self.taken:
                return self.take(candidate)
            self.next_index += 1


# --- entering a pod ------------------------------------------------------------------------------


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _enter_pod(cgroup_dir: str, netns_path: str):
    """preexec_fn: join the cgroup first, then the netns (the order `ip netns exec` would break)."""

    def enter():
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
        _setns(netns_path)

    return enter


def in_netns(name: str, fn, *args):
    """Run fn(*args) on a fresh thread that has entered netns `name`; return its result.

    A thread, so that the caller's own namespace never changes (setns affects one thread).
    """
    result = {}

    def body():
        try:
            _setns(os.path.join(NETNS_DIR, name))
            result["value"] = fn(*args)
        except BaseException as err:  # handed back to the caller below
            result["error"] = err

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _write_sysctls(settings: dict[str, str]) -> None:
    for key, value in settings.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


#: Every lab netns: no duplicate-address detection, so IPv6 addresses are usable at once.
NETNS_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
#: The node netns routes between pods and answers untranslated traffic with an ICMP "network
#: unreachable" rather than a silent drop (the kernel still limits IPv4 errors per source).
NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv4.icmp_ratelimit": "0",
    "net.ipv6.icmp.ratelimit": "0",
}


# --- the pod -------------------------------------------------------------------------------------


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    ipv4: str | None
    ipv6: str | None
    netns: str  #: the netns name (a file under /run/netns)
    cgroup: str  #: the pod-level cgroup directory (absolute)
    container_cgroup: str  #: where the pod's processes run (a child of `cgroup`)
    cgroup_id: int  #: inode of the pod-level directory: what bpf_get_current_cgroup_id() walks to
    qos: str = "besteffort"
    echo_ports: tuple[int, ...] = (8080,)
    host_ifname: str = ""  #: the veth's end in the node netns
    echo_pid: int | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.ipv4, self.ipv6) if a]

    def _popen_kwargs(self, kw: dict) -> dict:
        if "preexec_fn" in kw:
            raise TypeError("Pod.run/popen set preexec_fn themselves (to enter the pod)")
        kw["preexec_fn"] = _enter_pod(self.container_cgroup, self.netns_path)
        return kw

    def run(self, argv, timeout: float = 30, input: str | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run argv inside the pod (its container cgroup, then its netns); capture text output."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(argv, timeout=timeout, input=input, **self._popen_kwargs(kw))

    def popen(self, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **self._popen_kwargs(kw))

    def exec_here(self, argv: list[str]) -> None:
        """Replace this process with argv, inside the pod (for `meshlet lab exec`)."""
        _enter_pod(self.container_cgroup, self.netns_path)()
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            raise UserError(f"cannot run {argv[0]!r} in pod {self.ref}: {err.strerror}; "
                            "hint: give the full path of the program") from None

    def client(self, kind: str, addr: str, port: int, count: int = 1, *extra: str,
               timeout: float = 120) -> dict:
        """Run agent.lab.client in this pod and return its JSON answer."""
        argv = [sys.executable, "-m", "agent.lab.client", kind, addr, str(port),
                "--count", str(count), *extra]
        done = self.run(argv, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"client in {self.ref} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def to_json(self) -> dict:
        data = asdict(self)
        data["echo_ports"] = list(self.echo_ports)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Pod":
        data = dict(data)
        data["echo_ports"] = tuple(data.get("echo_ports", ()))
        return cls(**data)


# --- the lab -------------------------------------------------------------------------------------


def _process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _cgroup_pids(root: str) -> list[int]:
    pids = []
    for directory, _, files in os.walk(root):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    pids.extend(int(line) for line in f if line.strip())
            except OSError:
                pass
    return pids


class Lab:
    """Pods on one machine; see the module docstring. Use as `with Lab("t1") as lab: ...`."""

    def __init__(self, name: str, cgroup_parent: str | None = None, layout: str = "systemd",
                 log_dir: str | None = None):
        if not _LAB_NAME.match(name):
            raise UserError(f"lab name {name!r} is not usable; hint: 1-20 characters, lowercase "
                            "letters, digits and '-'")
        if layout not in LAYOUTS:
            raise UserError(f"unknown cgroup layout {layout!r}; hint: one of {', '.join(LAYOUTS)}")
        self.name = name
        self.layout = layout
        self.cgroup_parent = cgroup_parent or cgroup2_mount()
        self.cgroup_root = os.path.join(self.cgroup_parent, CGROUP_PREFIX + name)
        self.node_netns = netns_name(name, "node")
        self.log_dir = log_dir
        self.pods: dict[str, Pod] = {}  # by "namespace/name"
        self.addresses = AddressPool()
        #: what teardown removes; JSON-serialisable (see `state`)
        self.record: dict[str, list] = {"netns": [], "cgroups": [], "pids": []}
        self._children: dict[int, subprocess.Popen] = {}
        self._veth_count = 0
        self._keep = False

    # -- life cycle

    def __enter__(self) -> "Lab":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self._keep:
            self.destroy()

    def create(self) -> None:
        if os.geteuid() != 0:
            raise UserError("the lab needs root (network namespaces, cgroups); hint: run with sudo")
        if os.path.exists(self.cgroup_root) or os.path.exists(os.path.join(NETNS_DIR, self.node_netns)):
            raise UserError(f"a lab named {self.name!r} already exists ({self.cgroup_root}); "
                            f"hint: meshlet lab down --name {self.name}, or pick another name")
        self._mkdir_cgroup(self.cgroup_root)
        self._make_netns(self.node_netns)
        in_netns(self.node_netns, self._build_node)

    def _build_node(self) -> None:
        from pyroute2 import IPRoute

        _write_sysctls(NODE_SYSCTLS)
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=BRIDGE, kind="bridge", address=BRIDGE_MAC)
            (bridge,) = ipr.link_lookup(ifname=BRIDGE)
            ipr.addr("add", index=bridge, address=GATEWAY_V4, prefixlen=32)
            ipr.addr("add", index=bridge, address=GATEWAY_V6, prefixlen=128)
            ipr.addr("add", index=bridge, address=GATEWAY_LINK_LOCAL, prefixlen=64)
            ipr.link("set", index=bridge, state="up")
            # No default route, on purpose: see the module docstring.

    def destroy(self) -> None:
        """Remove everything in the record; never raises for what is already gone."""
        destroy_record(self.record, self._children)
        self._children.clear()
        self.pods.clear()

    def keep(self, state_file: str) -> None:
        """Leave the lab running after the `with` block, recorded in state_file (`meshlet lab up`)."""
        os.makedirs(os.path.dirname(state_file), exist_ok=True)
        tmp = state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state(), f, indent=1)
        os.replace(tmp, state_file)
        self._keep = True

    @classmethod
    def from_state(cls, state: dict) -> "Lab":
        """The lab a `state()` describes (made by another process): for exec, status and down."""
        lab = cls(state["name"], cgroup_parent=os.path.dirname(state["cgroup_root"]),
                  layout=state["layout"])
        lab.record = state["record"]
        lab.pods = {pod.ref: pod for pod in map(Pod.from_json, state["pods"])}
        for pod in lab.pods.values():
            lab.addresses.taken.update(pod.addresses)
        lab._veth_count = max((int(p.host_ifname[len("vpod"):]) for p in lab.pods.values()), default=0)
        lab._keep = True  # only an explicit destroy() removes it
        return lab

    def state(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "cgroup_root": self.cgroup_root,
            "node_netns": self.node_netns,
            "record": self.record,
            "pods": [pod.to_json() for pod in self.pods.values()],
        }

    # -- pods

    def add_pod(self, namespace: str, name: str, ipv4: str | None = None, ipv6: str | None = None,
                qos: str = "besteffort", uid: str | None = None, echo_ports=(8080,)) -> Pod:
        ref = f"{namespace}/{name}"
        if ref in self.pods:
            raise UserError(f"pod {ref} is already in lab {self.name}; hint: pod names are unique per namespace")
        uid = uid or str(uuid.uuid4())
        ipv4 = self.addresses.take(ipv4) if ipv4 else self.addresses.allocate(4)
        ipv6 = self.addresses.take(ipv6) if ipv6 else self.addresses.allocate(6)
        if ipaddress.ip_address(ipv4).version != 4 or ipaddress.ip_address(ipv6).version != 6:
            raise UserError(f"pod {ref}: ipv4={ipv4} ipv6={ipv6} have the wrong families; "
                            "hint: pass an IPv4 and an IPv6 address")
        self._veth_count += 1
        pod_cgroup = os.path.join(self.cgroup_root, pod_cgroup_path(self.layout, qos, uid))
        pod = Pod(
            namespace=namespace, name=name, uid=uid, ipv4=ipv4, ipv6=ipv6,
            netns=self._pod_netns_name(namespace, name),
            cgroup=pod_cgroup,
            container_cgroup=os.path.join(pod_cgroup, container_cgroup_name(self.layout, uid)),
            cgroup_id=0, qos=qos, echo_ports=tuple(echo_ports),
            host_ifname=f"vpod{self._veth_count}",
        )
        self._mkdir_cgroup(pod.container_cgroup)
        pod.cgroup_id = os.stat(pod.cgroup).st_ino
        self._make_netns(pod.netns)
        in_netns(self.node_netns, self._plug_pod, pod)
        in_netns(pod.netns, self._configure_pod, pod)
        self.pods[ref] = pod
        if pod.echo_ports:
            self._start_echo(pod)
        return pod

    def _pod_netns_name(self, namespace: str, name: str) -> str:
        plain = netns_name(self.name, namespace, name)
        if plain in self.record["netns"] or plain == self.node_netns:
            return netns_name(self.name, namespace, name, hashed=True)
        return plain

    def _plug_pod(self, pod: Pod) -> None:
        """In the node netns: a veth whose far end lands in the pod netns as eth0, and host routes."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=pod.host_ifname, kind="veth",
                     peer={"ifname": POD_IFNAME, "net_ns_fd": pod.netns_path})
            (host_end,) = ipr.link_lookup(ifname=pod.host_ifname)
            (bridge,) = ipr.link_lookup(ifname=BRIDGE)
            ipr.link("set", index=host_end, master=bridge, state="up")
            ipr.route("add", dst=f"{pod.ipv4}/32", oif=bridge, scope="link")
            ipr.route("add", dst=f"{pod.ipv6}/128", oif=bridge, family=10)

    @staticmethod
    def _configure_pod(pod: Pod) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            (eth,) = ipr.link_lookup(ifname=POD_IFNAME)
            _write_sysctls({f"net.ipv6.conf.{POD_IFNAME}.accept_dad": "0"})
            ipr.addr("add", index=eth, address=pod.ipv4, prefixlen=32)
            ipr.addr("add", index=eth, address=pod.ipv6, prefixlen=128)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst=f"{GATEWAY_V4}/32", oif=eth, scope="link")
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=eth)
            ipr.route("add", dst="::/0", gateway=GATEWAY_LINK_LOCAL, oif=eth, family=10)

    def _start_echo(self, pod: Pod) -> None:
        argv = [sys.executable, "-m", "agent.lab.echo", "--name", pod.name]
        for port in pod.echo_ports:
            argv += ["--port", str(port)]
        stderr = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.log_dir, f"{pod.netns}.log"), "a")
        try:
            proc = pod.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=stderr, start_new_session=True, cwd=_repo_root())
        finally:
            if stderr:
                stderr.close()
        self._children[proc.pid] = proc
        self.record["pids"].append([proc.pid, _process_start_time(proc.pid)])
        pod.echo_pid = proc.pid
        ready, _, _ = select.select([proc.stdout], [], [], ECHO_READY_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            raise RuntimeError(f"the echo server of pod {pod.ref} did not start "
                               f"(exit code {proc.poll()}); see its stderr above")

    def remove_pod(self, pod: Pod) -> None:
        """Stop the pod's processes, remove its netns (its veth goes with it) and its cgroups."""
        self.pods.pop(pod.ref, None)
        sub = {"netns": [pod.netns], "cgroups": [], "pids": []}
        for entry in list(self.record["pids"]):
            if entry[0] == pod.echo_pid:
                sub["pids"].append(entry)
                self.record["pids"].remove(entry)
        prefix = pod.cgroup + os.sep
        for path in list(self.record["cgroups"]):
            if path == pod.cgroup or path.startswith(prefix):
                sub["cgroups"].append(path)
                self.record["cgroups"].remove(path)
        if pod.netns in self.record["netns"]:
            self.record["netns"].remove(pod.netns)
        destroy_record(sub, self._children, kill_root=pod.cgroup)
        # The node keeps no route to a pod that is gone.
        in_netns(self.node_netns, _remove_host_routes, pod)

    def pod(self, ref: str) -> Pod:
        """A pod by "namespace/name", or by name alone when that is unambiguous."""
        if ref in self.pods:
            return self.pods[ref]
        matches = [p for p in self.pods.values() if p.name == ref]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted(self.pods)) or "none"
        raise UserError(f"no pod {ref!r} in lab {self.name} (pods: {known}); "
                        "hint: name it as NAMESPACE/NAME")

    def node_cgroup(self) -> str:
        """A non-pod cgroup under the lab root, for "node processes" (made on first use)."""
        path = os.path.join(self.cgroup_root, node_cgroup_path(self.layout))
        if not os.path.isdir(path):
            self._mkdir_cgroup(path)
        return path

    def run_on_node(self, argv, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run argv as a node process: the node cgroup, the node netns (host-network style)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(argv, timeout=timeout,
                              preexec_fn=_enter_pod(self.node_cgroup(),
                                                    os.path.join(NETNS_DIR, self.node_netns)),
                              **kw)

    # -- making things, recorded first

    def _mkdir_cgroup(self, path: str) -> None:
        missing = []
        probe = path
        while not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for directory in reversed(missing):
            self.record["cgroups"].append(directory)
            os.mkdir(directory)

    def _make_netns(self, name: str) -> None:
        from pyroute2 import netns

        if os.path.exists(os.path.join(NETNS_DIR, name)):
            raise UserError(f"network namespace {name} already exists; "
                            "hint: a lab of that name is up (meshlet lab down) or pick another name")
        self.record["netns"].append(name)
        netns.create(name)
        in_netns(name, _write_sysctls, NETNS_SYSCTLS)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _remove_host_routes(pod: Pod) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for dst, family in ((f"{pod.ipv4}/32", 2), (f"{pod.ipv6}/128", 10)):
            try:
                ipr.route("del", dst=dst, family=family)
            except NetlinkError:
                pass  # gone with the veth already


# --- teardown ------------------------------------------------------------------------------------


@contextlib.contextmanager
def shielded_from_ctrl_c():
    """A second Ctrl-C must not cut a cleanup short (that is how labs leak): ignore SIGINT and
    SIGTERM meanwhile. Only the main thread can change signal handlers; elsewhere, no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def destroy_record(record: dict, children: dict[int, subprocess.Popen] | None = None,
                   kill_root: str | None = None) -> list[str]:
    """Remove what `record` names: processes, then netns, then cgroups (deepest first).

    Returns what could not be removed (also printed to stderr); an empty list means clean.
    kill_root: the cgroup subtree whose remaining processes are ours to kill (default: the
    outermost recorded cgroup).
    """
    with shielded_from_ctrl_c():
        return _destroy_record(record, children or {}, kill_root)


def _destroy_record(record: dict, children: dict[int, subprocess.Popen],
                    kill_root: str | None) -> list[str]:
    leftovers: list[str] = []
    # 1. Processes we started (checked against their start time: a pid may have been reused).
    alive = []
    for pid, started in record.get("pids", []):
        if pid in children:
            proc = children.pop(pid)
            if proc.poll() is None:
                proc.terminate()
                alive.append(proc)
        elif started and _process_start_time(pid) == started:
            _signal(pid, signal.SIGTERM)
            alive.append(pid)
    deadline = time.monotonic() + TERMINATE_GRACE
    for item in alive:
        if isinstance(item, subprocess.Popen):
            try:
                item.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                item.kill()
                item.wait()
        else:
            while _process_start_time(item) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            _signal(item, signal.SIGKILL)
    # 2. Anything else still inside our cgroup subtree was started in a pod of ours
    #    (`lab exec`, a test's client): kill those by pid too, then wait until the tree is empty.
    cgroups = record.get("cgroups", [])
    root = kill_root or (min(cgroups, key=len) if cgroups else None)
    if root and os.path.isdir(root):
        deadline = time.monotonic() + 5
        while (pids := _cgroup_pids(root)) and time.monotonic() < deadline:
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        if pids:
            leftovers.append(f"processes {pids} in {root}")
    # 3. Network namespaces: unmounting the last reference frees the netns and its veths.
    from pyroute2 import netns

    for name in reversed(record.get("netns", [])):
        path = os.path.join(NETNS_DIR, name)
        if not os.path.exists(path):
            continue
        try:
            netns.remove(name)
        except OSError as err:
            leftovers.append(f"netns {name}: {err}")
    # 4. Cgroups, deepest first (rmdir needs them empty; a process may take a moment to leave).
    for path in sorted(cgroups, key=lambda p: p.count(os.sep), reverse=True):
        for attempt in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if attempt == 49:
                    leftovers.append(f"cgroup {path}: {err}")
                time.sleep(0.05)
    for item in leftovers:
        print(f"meshlet lab: could not remove {item}", file=sys.stderr)
    return leftovers


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
