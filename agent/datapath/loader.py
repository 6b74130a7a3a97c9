"""Loader: preflight, pinned-map checks, compile and load bpf/sock.c, attach as pinned cgroup links.

Role: everything between "the agent starts" and "our programs run at the cgroup hooks", plus
`uninstall`. What the running kernel supports is decided before (agent/datapath/features.py) and
handed in as a `Support`: it picks the hooks to load and attach and the -D flags of sock.c.
It may touch: the bpffs directory it is given (pins), the cgroup root it is given (links are
created on it, never on anything else), and bcc, only in a short-lived child process
(agent/datapath/compile_child.py): bcc and LLVM hold ~130 MiB once they have compiled, which
an agent that lives for months should not carry. The child compiles and loads, hands the
program fds back over a unix socket (SCM_RIGHTS) and exits; the programs live on through our
fds, then through the pinned links.

Pins (SEMANTICS D1, D2, D5):

    <bpffs>/v<LAYOUT_VERSION>/maps/<map>   every map of bpf/sock.c (bcc's BPF_TABLE_PINNED)
    <bpffs>/links/<hook>                   one bpf link per hook, on the cgroup root

- Maps are created by bcc on first compile and reused (adopted) by every later compile. bcc
  does not check a reused map's layout, so `check_pinned_maps` does it before compiling and
  refuses a mismatch with the map, the difference and the fix.
- A layout change bumps LAYOUT_VERSION: the new programs get fresh maps under v<new>/ (filled
  before attach), and the old version's pins are removed once the links point at the new
  programs (`remove_old_layouts`).
- Attachment is a bpf link (BPF_LINK_CREATE on the cgroup fd) pinned under links/. A restart or
  an upgrade swaps the program behind the pinned link with BPF_LINK_UPDATE: one atomic step, no
  instant without a program, never detach-then-attach. Only `uninstall` detaches.
"""

from __future__ import annotations

import ctypes as ct
import errno
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from agent.datapath import bpfsys
from agent.datapath import layout as L
from agent.datapath import uapi as U
from agent.datapath.features import Support
from agent.datapath.uapi import HOOKS
from agent.errors import UserError
from agent.mounts import cgroup2_mount, mount_of, read_mounts

#: The C sources, beside the agent package in the repository (and in the image).
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "sock.c"

SETUP_HINT = "run scripts/setup.sh as root"

#: Where the agent pins its maps and links unless told otherwise (--bpffs of every command).
DEFAULT_BPFFS = "/sys/fs/bpf/meshlet"


def version_dir(bpffs: str) -> str:
    return os.path.join(bpffs, f"v{L.LAYOUT_VERSION}")


def maps_dir(bpffs: str) -> str:
    return os.path.join(version_dir(bpffs), "maps")


def links_dir(bpffs: str) -> str:
    return os.path.join(bpffs, "links")


def map_pin(bpffs: str, name: str) -> str:
    return os.path.join(maps_dir(bpffs), name)


# --- preflight ---------------------------------------------------------------------------------

_CAP_NET_ADMIN, _CAP_SYS_ADMIN, _CAP_BPF = 12, 21, 39


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def cgroup_root_level(cgroup_root: str, mount: str) -> int:
    """Depth of the cgroup root below the cgroup2 mount (0 = the mount itself): the level
    bpf_get_current_ancestor_cgroup_id() gives the root at (CGROUP_ROOT_LEVEL in sock.c)."""
    rel = os.path.relpath(os.path.realpath(cgroup_root), os.path.realpath(mount))
    return 0 if rel == "." else len(rel.split(os.sep))


def preflight(bpffs: str, cgroup_root: str) -> int:
    """Check every prerequisite, naming the first one missing. Returns CGROUP_ROOT_LEVEL."""
    caps = _effective_caps()
    if not (caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_NET_ADMIN & 1)):
        raise UserError("loading the socket programs needs root (CAP_SYS_ADMIN, or CAP_BPF with "
                        "CAP_NET_ADMIN); hint: run as root, or grant those capabilities to the agent")
    mounts = read_mounts()
    where = mount_of(bpffs, mounts)
    if where is None or where[1] != "bpf":
        raise UserError(f"{bpffs} is not on a bpf filesystem; hint: mount -t bpf bpf /sys/fs/bpf "
                        f"(or {SETUP_HINT}), or pass --bpffs a directory below the bpffs mount")
    mount = cgroup2_mount(mounts)
    if mount is None:
        raise UserError(f"no cgroup2 filesystem is mounted; hint: the socket hooks need cgroup v2 "
                        f"(mount -t cgroup2 none /sys/fs/cgroup, or {SETUP_HINT})")
    if not os.path.isdir(cgroup_root):
        raise UserError(f"cgroup root {cgroup_root} does not exist; hint: pass --cgroup-root a "
                        f"directory of the cgroup2 mount {mount}")
    holder = mount_of(cgroup_root, mounts)
    if holder is None or holder[1] != "cgroup2":
        raise UserError(f"cgroup root {cgroup_root} is not on the cgroup2 mount {mount}; hint: pass "
                        f"--cgroup-root {mount} or a directory below it")
    headers = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(headers):
        raise UserError(f"no kernel headers at {headers} (bcc compiles against them); hint: "
                        f"install linux-headers-{platform.release()}, or {SETUP_HINT}")
    # Found, not imported: importing bcc maps libbcc (LLVM inside, ~60 MiB resident) into this
    # long-lived process; only the compile child needs it loaded.
    if importlib.util.find_spec("bcc") is None:
        raise UserError("the bcc Python module is not importable; hint: install python3-bpfcc and run "
                        "the agent with a Python that sees it (scripts/setup.sh makes .venv)")
    return cgroup_root_level(cgroup_root, mount)


# --- pinned map checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def expected(spec: L.MapSpec, sizes: L.MapSizes) -> Expected:
    value_size = ct.sizeof(spec.value)
    return Expected(spec.type, ct.sizeof(spec.key), value_size, spec.max_entries(sizes, bpfsys.possible_cpus()),
                    spec.flags)


def describe_mismatch(name: str, info: bpfsys.MapInfo, want: Expected) -> list[str]:
    """The differences between a pinned map and what this version needs, for humans."""
    diffs = []
    if info.type != want.type:
        diffs.append(f"type {U.MAP_TYPE_NAMES.get(info.type, info.type)} "
                     f"(expected {U.MAP_TYPE_NAMES.get(want.type, want.type)})")
    if info.key_size != want.key_size:
        diffs.append(f"key size {info.key_size} (expected {want.key_size})")
    if info.value_size != want.value_size:
        diffs.append(f"value size {info.value_size} (expected {want.value_size})")
    if info.max_entries != want.max_entries:
        diffs.append(f"max_entries {info.max_entries} (expected {want.max_entries})")
    if info.flags != want.flags:
        diffs.append(f"flags {info.flags:#x} (expected {want.flags:#x})")
    return diffs


def check_pinned_maps(bpffs: str, sizes: L.MapSizes) -> list[str]:
    """Check each map already pinned under the version dir; return the names found.

    Raises UserError naming the map, what differs and the fix, before anything is compiled
    (bcc would silently reuse a pinned map of another shape). Sizes are checked last and all
    at once: a pinned map cannot be resized in place, so a size other than the pinned one is
    refused with both ways on (keep the pinned sizes, or uninstall and start with the new ones).
    """
    found = []
    resized: list[tuple[str, int, int]] = []  # (size name, pinned entries, asked entries)
    for name, spec in L.MAP_SPECS.items():
        path = map_pin(bpffs, name)
        if not os.path.exists(path):
            continue
        try:
            with bpfsys.Map.open_pinned(path) as m:
                info = m.info
        except bpfsys.BpfError as err:
            raise UserError(f"cannot open the pinned map {path}: {err.strerror}; hint: "
                            "`meshlet uninstall` removes our pins") from None
        want = expected(spec, sizes)
        diffs = describe_mismatch(name, info, want)
        if spec.size_field and info.max_entries != want.max_entries:
            resized.append((spec.size_field, info.max_entries, want.max_entries))
            diffs = [d for d in diffs if not d.startswith("max_entries")]
        if diffs:
            raise UserError(f"pinned map {path} does not match this meshlet: {', '.join(diffs)}; "
                            "hint: `meshlet uninstall`, then start again")
        found.append(name)
    if resized:
        raise UserError(resize_refusal(maps_dir(bpffs), resized))
    return found


def resize_refusal(where: str, resized: list[tuple[str, int, int]]) -> str:
    """The one message for a start with map sizes other than the pinned maps' (pure)."""
    asked = ", ".join(f"{name} {want} (pinned: {have})" for name, have, want in resized)
    keep = " ".join(f"{L.SIZE_OPTION} {name}={have}" for name, have, _ in resized)
    new = " ".join(f"{L.SIZE_OPTION} {name}={want}" for name, _, want in resized)
    return (f"the maps pinned in {where} were made with other sizes than asked ({asked}), and a "
            f"pinned map cannot be resized in place; hint: start with {keep} to keep serving from "
            f"them, or resize in a maintenance window: `meshlet uninstall` (Service addresses are "
            f"not translated until the agent is back), then start with {new}")


# --- compile and load --------------------------------------------------------------------------


def cflags(bpffs: str, level: int, sizes: L.MapSizes, support: Support) -> list[str]:
    """The -D flags that configure sock.c: the only way it is configured (no text substitution)."""
    flags = [f"-I{BPF_DIR}", f'-DPIN_DIR="{maps_dir(bpffs)}"', f"-DCGROUP_ROOT_LEVEL={level}"]
    for f in fields(sizes):
        flags.append(f"-D{f.name.upper()}_MAX={getattr(sizes, f.name)}")
    flags += [f"-D{name}=1" for name in support.defines]
    return flags


#: Seconds the compile child may take (a cold bcc compile is a few seconds on a busy node).
COMPILE_TIMEOUT = 300.0


@dataclass
class Programs:
    """The loaded programs (not attached): our own fds of them, closed by close()."""

    fds: dict[str, int]  #: hook -> program fd, for the hooks loaded (Support.hooks)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def compile_and_load(bpffs: str, level: int, sizes: L.MapSizes, support: Support) -> Programs:
    """Compile sock.c with bcc (creating or reusing the pinned maps) and load the hooks this
    kernel has (support.hooks), in a child process (module docstring): only the fds come back."""
    os.makedirs(maps_dir(bpffs), exist_ok=True)
    request = {"cflags": cflags(bpffs, level, sizes, support), "hooks": list(support.hooks)}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            # stderr is inherited: bcc's warnings and a verifier log reach the agent's own log.
            child = subprocess.Popen([sys.executable, "-m", "agent.datapath.compile_child", str(theirs.fileno())],
                                     stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), text=True)
        finally:
            theirs.close()
        try:
            child.stdin.write(json.dumps(request))
            child.stdin.close()
            ours.settimeout(COMPILE_TIMEOUT)
            message, fds, _flags, _addr = socket.recv_fds(ours, 1 << 16, len(request["hooks"]))
        except (OSError, socket.timeout) as err:
            child.kill()  # our own child, by its handle
            child.wait()
            raise UserError(f"compiling {SOURCE} did not finish: {err}; hint: {SETUP_HINT}") from None
        child.wait(timeout=COMPILE_TIMEOUT)  # it has answered: only its exit is left
    reply = json.loads(message) if message else {"error": f"the compiler process exited with status "
                                                          f"{child.returncode} before answering (see its "
                                                          f"output above)"}
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        raise UserError(reply["error"])
    return Programs(dict(zip(reply["hooks"], fds)))


def compile_here(flags: list[str], hooks: list[str]):
    """Compile and load in this process: (bcc's BPF object, hook -> program fd). The BPF object
    owns the fds (its cleanup() closes them). Used by the compile child, and by the layout test
    that reads clang's view of the structs."""
    from bcc import BPF  # lazily: only a compiling process needs bcc

    try:
        bpf = BPF(src_file=str(SOURCE).encode(), cflags=flags)
    except Exception as err:
        raise UserError(f"compiling {SOURCE} failed: {err}; hint: check the kernel headers "
                        f"(/lib/modules/{platform.release()}/build) or {SETUP_HINT}") from None
    fds = {}
    try:
        for hook in hooks:
            fds[hook] = bpf.load_func(hook.encode(), U.prog_type(hook), attach_type=HOOKS[hook]).fd
    except Exception as err:
        bpf.cleanup()
        # The feature probe passed, so this is not a missing hook or helper: most likely a
        # verifier limit of this kernel.
        raise UserError(f"the kernel (Linux {platform.release()}) refused the {hook} program although "
                        f"it has every feature meshlet probes for: {err}; hint: report it with the "
                        "kernel version and the verifier log bcc printed") from None
    return bpf, fds


# --- attach ------------------------------------------------------------------------------------


def cgroup_id(path: str) -> int:
    """The id the kernel gives a cgroup: the inode of its cgroup2 directory."""
    return os.stat(path).st_ino


def attach(bpffs: str, cgroup_root: str, programs: Programs) -> None:
    """Point every loaded hook's pinned link at our programs: update in place, or create and pin.

    A hook not loaded (the kernel lacks it) is not attached; a pinned link of such a hook, which
    only another kernel's agent could have made, is left alone: only uninstall detaches (D5).
    """
    os.makedirs(links_dir(bpffs), exist_ok=True)
    root_id = cgroup_id(cgroup_root)
    cgroup_fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook, prog_fd in programs.fds.items():
            _attach_one(os.path.join(links_dir(bpffs), hook), cgroup_fd, root_id, cgroup_root,
                        HOOKS[hook], prog_fd)
    finally:
        os.close(cgroup_fd)


def _attach_one(pin: str, cgroup_fd: int, root_id: int, cgroup_root: str, attach_type: int,
                prog_fd: int) -> None:
    if os.path.exists(pin):
        link_fd = bpfsys.obj_get(pin)
        try:
            _, _, linked_cgroup = bpfsys.link_info(link_fd)
            if linked_cgroup not in (0, root_id):
                raise UserError(f"our programs are attached to another cgroup (id {linked_cgroup}) "
                                f"than {cgroup_root}; hint: `meshlet uninstall` first to move them")
            try:
                bpfsys.link_update(link_fd, prog_fd)
                return
            except bpfsys.BpfError as err:
                if err.errno != errno.ENOLINK:
                    raise
                # The link was detached behind our back (its cgroup gone, or a forced detach):
                # nothing is attached, so a new link is no detach-then-attach.
        finally:
            os.close(link_fd)
        os.unlink(pin)
    link_fd = bpfsys.link_create_cgroup(prog_fd, cgroup_fd, attach_type)
    try:
        bpfsys.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)


def carry_over(bpffs: str, maps: Mapping[str, bpfsys.Map]) -> dict[str, int]:
    """Copy the programs' state (layout.CARRIED_MAPS) from the newest older layout's pins into our
    new maps, where that map's type, key and value sizes are unchanged; map -> entries copied.

    Called before the links switch to our programs, after our maps were made (not adopted): the
    new programs then start with the old ones' affinity choices instead of an empty map. Entries
    the old programs add after the copy are not seen; the window is the copy itself."""
    current = os.path.basename(version_dir(bpffs))
    older = sorted((int(entry[1:]) for entry in os.listdir(bpffs)
                    if entry.startswith("v") and entry[1:].isdigit() and entry != current), reverse=True)
    copied: dict[str, int] = {}
    for name in L.CARRIED_MAPS:
        spec, target = L.MAP_SPECS[name], maps.get(name)
        path = next((p for p in (os.path.join(bpffs, f"v{v}", "maps", name) for v in older)
                     if os.path.exists(p)), None)
        if target is None or path is None:
            continue
        try:
            with bpfsys.Map.open_pinned(path) as old:
                info = old.info
                if (info.type, info.key_size, info.value_size) != (spec.type, ct.sizeof(spec.key),
                                                                     ct.sizeof(spec.value)):
                    continue  # its layout changed: nothing of it can be read as ours
                entries = [entry for chunk in old.chunks() for entry in chunk][:target.max_entries]
        except bpfsys.BpfError:
            continue  # gone or unreadable: the new map starts empty, as it would have anyway
        if entries:
            target.update_batch(entries)
        copied[name] = len(entries)
    return copied


def remove_unused_trace_pins(bpffs: str, support: Support) -> list[str]:
    """Remove the pin of an event channel our programs do not send to (layout.TRACE_CHANNEL_MAPS):
    `meshlet trace` picks the channel by its pin, and an agent that ran on this layout with other
    kernel features (or MESHLET_PRETEND_NO_RINGBUF) may have left the other one."""
    removed = []
    for channel, name in L.TRACE_CHANNEL_MAPS.items():
        path = map_pin(bpffs, name)
        if channel != support.trace_channel and os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    return removed


def remove_old_layouts(bpffs: str) -> list[str]:
    """Remove the pins of other layout versions (their programs are no longer linked)."""
    removed = []
    if not os.path.isdir(bpffs):
        return removed
    current = os.path.basename(version_dir(bpffs))
    for entry in sorted(os.listdir(bpffs)):
        if entry.startswith("v") and entry[1:].isdigit() and entry != current:
            removed += _remove_tree(os.path.join(bpffs, entry))
    return removed


def _remove_tree(path: str) -> list[str]:
    removed = []
    for directory, _subdirs, files in os.walk(path, topdown=False):
        for name in sorted(files):
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        os.rmdir(directory)
    return removed


def uninstall(bpffs: str) -> list[str]:
    """Detach every link we pinned, then remove every pin under bpffs (SEMANTICS D5).

    Links are detached explicitly (BPF_LINK_DETACH) before their pin is removed, so a process
    still holding a link fd cannot keep our programs attached.
    """
    removed = []
    links = links_dir(bpffs)
    if os.path.isdir(links):
        for name in sorted(os.listdir(links)):
            path = os.path.join(links, name)
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BpfError:
                fd = -1
            if fd >= 0:
                try:
                    bpfsys.link_detach(fd)
                except bpfsys.BpfError as err:
                    if err.errno not in (errno.ENOLINK, errno.EINVAL):
                        raise
                finally:
                    os.close(fd)
            os.unlink(path)
            removed.append(path)
        os.rmdir(links)
    if os.path.isdir(bpffs):
        for entry in sorted(os.listdir(bpffs)):
            if entry.startswith("v") and entry[1:].isdigit():
                removed += _remove_tree(os.path.join(bpffs, entry))
        if not os.listdir(bpffs) and mount_of(bpffs, read_mounts()) is not None \
                and os.path.realpath(bpffs) != mount_of(bpffs, read_mounts())[0]:
            os.rmdir(bpffs)
            removed.append(bpffs)
    return removed



def attached_programs(cgroup_root: str) -> list[str]:
    """Hooks of ours (by program name) still attached directly to a cgroup."""
    found = []
    fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook, attach_type in HOOKS.items():
            try:
                attached = bpfsys.prog_query_cgroup(fd, attach_type)
            except bpfsys.BpfError as err:
                if err.errno != errno.EINVAL:
                    raise
                continue  # an attach type this kernel does not have: nothing can be attached there
            for prog_id in attached:
                try:
                    pfd = bpfsys.prog_get_fd_by_id(prog_id)
                except bpfsys.BpfError:
                    continue  # gone meanwhile
                try:
                    if bpfsys.prog_info(pfd)[1] == hook:
                        found.append(hook)
                finally:
                    os.close(pfd)
    finally:
        os.close(fd)
    return found
