"""The namespaces, veths, cgroups and server processes one benchmark run makes, and their removal.

May touch: network namespaces it creates (named `mlb<run>-<mode>-cli|srv`), the veth pair between
them, cgroups under a subtree `meshlet-bench-<run>` of the cgroup2 mount, and processes it starts.
Never the root network namespace, never the cgroup2 root itself.

Invariants:
- `Lab` records every object the moment it exists; `Lab.close()` (also run on failure and on
  SIGTERM, via the context manager) removes them in reverse order and only them, processes by pid.
- One `Pair` per mode: client netns <-> veth <-> server netns. In the server netns the whole pod
  range is local (AnyIP: `ip route add local POD_CIDR dev lo`) and one loadgen server answers
  TCP and UDP on 0.0.0.0:TARGET_PORT. The client netns routes the pod range, and for the firewall
  modes the Service range too (the OUTPUT route lookup happens before DNAT).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import mounts
from agent.errors import UserError
from bench.synth import POD_CIDR, SERVICE_CIDR, TARGET_PORT

CLIENT_ADDR = "10.250.0.1"
SERVER_ADDR = "10.250.0.2"
_PREFIX = 30


def run(*cmd: str, check: bool = True, timeout: float | None = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def cgroup2_mount() -> Path:
    """The cgroup2 mount point (agent.mounts)."""
    point = mounts.cgroup2_mount()
    if point is None:
        raise UserError("no cgroup2 mount found in /proc/mounts; the meshlet mode needs one (mount cgroup2 or drop --modes meshlet)")
    return Path(point)


@dataclass
class Pair:
    """Client and server namespaces of one mode, joined by a veth pair."""

    mode: str
    cli: str
    srv: str

    @property
    def cli_path(self) -> str:
        return f"/run/netns/{self.cli}"

    @property
    def srv_path(self) -> str:
        return f"/run/netns/{self.srv}"

    def sysctl(self, key: str, value: str) -> bool:
        """Set a sysctl in the client netns; False when this kernel keeps it global (read-only)."""
        return run("ip", "netns", "exec", self.cli, "sysctl", "-qw", f"{key}={value}", check=False).returncode == 0


@dataclass
class Lab:
    """Everything one run creates; `with Lab() as lab:` guarantees removal."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    _undo: list = field(default_factory=list)
    _old_sigterm: object = None

    def __enter__(self) -> "Lab":
        # SIGTERM must unwind through close(), like Ctrl-C does.
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def close(self) -> None:
        errors = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as err:  # keep removing the rest; report at the end
                errors.append(f"{what}: {err}")
        if errors:
            raise RuntimeError("bench cleanup left something behind: " + "; ".join(errors))

    def on_close(self, what: str, undo) -> None:
        self._undo.append((what, undo))

    # --- namespaces ---------------------------------------------------------------------------

    def netns(self, name: str) -> str:
        run("ip", "netns", "add", name)
        self.on_close(f"netns {name}", lambda: run("ip", "netns", "del", name, timeout=600))
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def pair(self, mode: str, route_services: bool) -> Pair:
        tag = f"mlb{self.run_id}-{mode}"
        pair = Pair(mode, self.netns(f"{tag}-cli"), self.netns(f"{tag}-srv"))
        # veth names are at most 15 bytes; the run id and a mode counter keep them unique.
        index = sum(1 for what, _ in self._undo if what.startswith("netns")) // 2
        cli_if, srv_if = f"mlb{self.run_id}c{index}", f"mlb{self.run_id}s{index}"
        run("ip", "-n", pair.cli, "link", "add", cli_if, "type", "veth", "peer", "name", srv_if, "netns", pair.srv)
        run("ip", "-n", pair.cli, "addr", "add", f"{CLIENT_ADDR}/{_PREFIX}", "dev", cli_if)
        run("ip", "-n", pair.srv, "addr", "add", f"{SERVER_ADDR}/{_PREFIX}", "dev", srv_if)
        run("ip", "-n", pair.cli, "link", "set", cli_if, "up")
        run("ip", "-n", pair.srv, "link", "set", srv_if, "up")
        run("ip", "-n", pair.srv, "route", "add", "local", POD_CIDR, "dev", "lo")
        run("ip", "-n", pair.cli, "route", "add", POD_CIDR, "via", SERVER_ADDR)
        if route_services:
            run("ip", "-n", pair.cli, "route", "add", SERVICE_CIDR, "via", SERVER_ADDR)
        pair.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        return pair

    # --- processes ----------------------------------------------------------------------------

    def server(self, loadgen: Path, pair: Pair) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(loadgen), "server", "--netns", pair.srv_path, "--port", str(TARGET_PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.on_close(f"server pid {proc.pid}", lambda: _stop(proc))
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"loadgen server in {pair.srv} did not start: {proc.stderr.read().strip()}")
        return proc

    # --- cgroups ------------------------------------------------------------------------------

    def cgroup_subtree(self, purpose: str) -> Path:
        """A fresh cgroup under the cgroup2 mount (never the mount's root itself)."""
        root = cgroup2_mount() / f"meshlet-bench-{self.run_id}-{purpose}"
        root.mkdir()
        self.on_close(f"cgroup {root}", lambda: _remove_cgroup(root))
        return root

    def child_cgroup(self, parent: Path, name: str) -> Path:
        path = parent / name
        path.mkdir()
        self.on_close(f"cgroup {path}", lambda: _remove_cgroup(path))
        return path

    def directory(self, path: Path) -> Path:
        """An empty directory (a bpffs dir); whoever fills it must empty it first (registered later,
        so it runs earlier at close)."""
        path.mkdir(parents=True)
        self.on_close(f"dir {path}", lambda: path.rmdir() if path.exists() else None)
        return path


def remove_leftovers() -> list[str]:
    """Remove what a killed run left behind (names only the bench uses); returns what went."""
    removed = []
    out = run("ip", "netns", "list", check=False).stdout
    for name in (line.split()[0] for line in out.splitlines() if line.strip()):
        if name.startswith("mlb") and (name.endswith("-cli") or name.endswith("-srv")):
            run("ip", "netns", "del", name, check=False, timeout=600)
            removed.append(f"netns {name}")
    bpffs = Path("/sys/fs/bpf")
    for pins in sorted(bpffs.glob("meshlet-bench-*")):
        from agent.datapath import uninstall  # only reached when a meshlet run left pins

        uninstall(str(pins))
        if pins.exists():
            pins.rmdir()
        removed.append(f"bpffs {pins}")
    try:
        root = cgroup2_mount()
    except UserError:
        return removed
    for tree in sorted(root.glob("meshlet-bench-*")):
        for child in sorted(p for p in tree.iterdir() if p.is_dir()):
            _remove_cgroup(child)
        _remove_cgroup(tree)
        removed.append(f"cgroup {tree}")
    return removed


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _remove_cgroup(path: Path) -> None:
    # The processes that joined it have exited; the kernel may take a moment to notice.
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()
