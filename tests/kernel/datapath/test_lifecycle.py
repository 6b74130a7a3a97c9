"""The datapath's life: layout vs compiled, established connections, program replacement,
adoption by another process, refusing a mismatched pin, uninstall.

Root only (marked `kernel`): see conftest.py for what is made and removed.
"""

import ctypes as ct
import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import pytest

from agent.datapath import Datapath, MapSizes, bpfsys, loader, uapi, uninstall
from agent.datapath import layout as L
from agent.errors import UserError

pytestmark = pytest.mark.kernel

SVC4 = "10.96.0.10"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def compiled_types(bpf, name: str):
    """(Key, Leaf) ctypes classes bcc built from what clang compiled for a map."""
    import bcc

    # bpf.get_table() would do this, but it knows no sk_storage table; the descriptions are
    # clang's own view of the types either way.
    key = bcc.BPF._decode_table_type(json.loads(bcc.lib.bpf_table_key_desc(bpf.module, name.encode())))
    leaf = bcc.BPF._decode_table_type(json.loads(bcc.lib.bpf_table_leaf_desc(bpf.module, name.encode())))
    return key, leaf


def test_every_mirror_matches_the_struct_bcc_compiled(datapath):
    # The agent compiles in a child process; compile here once more (same flags, the maps are
    # reused, nothing is loaded) to ask clang for its view of the structs.
    flags = loader.cflags(datapath.bpffs, 1, datapath.sizes, datapath.support)
    bpf, _ = loader.compile_here(flags, [])
    try:
        for name, spec in L.MAP_SPECS.items():
            if name in L.TRACE_CHANNEL_MAPS.values():
                continue  # an event channel: no struct key or value (one of them is not even
                # compiled); its records (struct decision) are checked by decoding real events
                # (tests/kernel/datapath/test_trace.py, test_trace_perf.py)
            key, leaf = compiled_types(bpf, name)
            for mirror, compiled in ((spec.key, key), (spec.value, leaf)):
                assert ct.sizeof(mirror) == ct.sizeof(compiled), (name, mirror)
                assert L.field_layout(mirror) == L.field_layout(compiled), (name, mirror)
    finally:
        bpf.cleanup()


def test_an_established_connection_survives_a_table_change(datapath, shares, client):
    web = shares.group("web", ["web-1"])
    datapath.reconcile(shares.state({shares.fe(SVC4, 80): shares.split((1, web))}, [web]), {})
    script = textwrap.dedent(f"""
        import socket, sys
        s = socket.create_connection(("{SVC4}", 80), timeout=10)
        print(s.recv(100).decode().strip(), flush=True)
        sys.stdin.readline()            # the test changes the tables meanwhile
        s.sendall(b"still here")        # the echo reads until we close: no reset
        peer = s.getpeername()
        s.shutdown(socket.SHUT_WR)
        print(repr(s.recv(100)), peer[0], peer[1], flush=True)
    """)
    proc = client.popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "web-1"
        moved = shares.group("web", ["web-2", "web-3"])
        datapath.reconcile(shares.state({shares.fe(SVC4, 80): shares.split((1, moved))}, [moved]), {})
        out, err = proc.communicate("go\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["b''", SVC4, "80"], "clean EOF from the old endpoint, peer still the frontend"
    assert "web-1" not in client.client("tcp", SVC4, 80, 10)["peers"]


def link_ids(bpffs):
    out = {}
    for hook in uapi.HOOKS:
        fd = bpfsys.obj_get(os.path.join(loader.links_dir(bpffs), hook))
        try:
            out[hook] = bpfsys.link_info(fd)[:2]  # (link id, program id)
        finally:
            os.close(fd)
    return out


def test_replacing_the_programs_under_a_connect_loop_fails_no_connection(datapath, shares, client, lab, bpffs):
    web = shares.group("web", ["web-1", "web-2", "web-3"])
    datapath.reconcile(shares.state({shares.fe(SVC4, 80): shares.split((1, web))}, [web]), {})
    before = link_ids(bpffs)
    loop = client.popen([sys.executable, "-m", "agent.lab.client", "tcp", SVC4, "80", "--count", "3000"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for _ in range(2):  # two upgrades while connections keep starting
            second = Datapath.open(bpffs, lab.cgroup_root, datapath.sizes)
            try:
                assert second.adopted, "pinned maps and links exist: safe to attach at once"
                second.attach()
            finally:
                second.close()
        out, err = loop.communicate(timeout=120)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    result = json.loads(out)
    assert result["errors"] == {} and sum(result["peers"].values()) == 3000, (result, err)
    after = link_ids(bpffs)
    for hook in uapi.HOOKS:
        assert after[hook][0] == before[hook][0], "the same link, updated in place"
        assert after[hook][1] != before[hook][1], "a new program behind it"


ADOPT = textwrap.dedent("""
    import json, pickle, sys
    from agent.datapath import Datapath, MapSizes
    bpffs, cgroup_root, sizes, state, cgroups = pickle.load(sys.stdin.buffer)
    dp = Datapath.open(bpffs, cgroup_root, sizes)
    stats = dp.reconcile(state, cgroups)
    print(json.dumps({"adopted": dp.adopted, "writes": sum(stats.ops.values()), "fill": dp.fill()}))
    dp.close()
""")


def test_another_process_adopts_the_pinned_maps_and_finds_nothing_to_write(datapath, shares, lab, bpffs):
    web = shares.group("web", ["web-1", "web-2"], affinity=30)
    state = shares.state({shares.fe(SVC4, 80): shares.split((1, web))}, [web], shares.clients())
    datapath.reconcile(state, shares.cgroups())
    done = subprocess.run([sys.executable, "-c", ADOPT], cwd=REPO, capture_output=True, timeout=120,
                          input=pickle.dumps((bpffs, lab.cgroup_root, datapath.sizes, state, shares.cgroups())))
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["adopted"] is True and result["writes"] == 0, result
    assert result["fill"]["endpoints"] == [2, datapath.sizes.endpoints]
    assert result["fill"]["members"][0] == 2


def test_a_pinned_map_of_another_size_is_refused_before_compiling(datapath, lab, bpffs):
    with pytest.raises(UserError) as err:
        Datapath.open(bpffs, lab.cgroup_root, MapSizes(affinity=1024, clients=64, endpoints=999))
    text = str(err.value)
    pinned = datapath.sizes.endpoints
    assert f"endpoints 999 (pinned: {pinned})" in text and "cannot be resized in place" in text
    assert f"start with --map-size endpoints={pinned} to keep serving" in text
    assert "`meshlet uninstall`" in text and "then start with --map-size endpoints=999" in text


def test_preflight_names_what_is_missing(lab):
    with pytest.raises(UserError, match="not on a bpf filesystem"):
        Datapath.open("/tmp/not-bpffs", lab.cgroup_root)
    with pytest.raises(UserError, match="does not exist"):
        Datapath.open("/sys/fs/bpf/meshlet-test-x", lab.cgroup_root + "/missing")
    with pytest.raises(UserError, match="not on the cgroup2 mount"):
        Datapath.open("/sys/fs/bpf/meshlet-test-x", "/tmp")
    assert not os.path.exists("/sys/fs/bpf/meshlet-test-x")


def test_uninstall_detaches_and_removes_every_pin(lab):
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    cgroup = lab.node_cgroup()  # its own cgroup: the session's datapath is not disturbed
    dp = Datapath.open(bpffs, cgroup, MapSizes(affinity=64, clients=8))
    try:
        dp.attach()
        dp.close()
        assert sorted(loader.attached_programs(cgroup)) == sorted(uapi.HOOKS)
        done = subprocess.run([sys.executable, "-m", "agent", "uninstall", "--bpffs", bpffs,
                               "--cgroup-root", cgroup], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"removed {bpffs}/links/connect4" in done.stdout
        assert loader.attached_programs(cgroup) == []
        assert not os.path.exists(bpffs)
    finally:
        dp.close()
        uninstall(bpffs)


def test_bcc_compiles_in_a_child_and_never_enters_the_agent(lab):
    # bcc and LLVM hold ~130 MiB once they have compiled: the long-lived agent must not carry them.
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(f"""
        import sys
        from agent.datapath import Datapath, MapSizes
        dp = Datapath.open({bpffs!r}, {lab.node_cgroup()!r}, MapSizes(affinity=64, clients=8))
        print(",".join(sorted(dp.programs.fds)), "bcc" in sys.modules)
        dp.close()
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [",".join(sorted(uapi.HOOKS)), "False"]
    finally:
        uninstall(bpffs)


def test_a_failed_compile_is_one_clear_error(lab, monkeypatch):
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    good = loader.cflags
    monkeypatch.setattr(loader, "cflags", lambda *args: good(*args) + ["-DFRONTENDS_MAX=not_a_number"])
    try:
        with pytest.raises(UserError, match=r"compiling .*sock\.c failed.*hint"):
            Datapath.open(bpffs, lab.node_cgroup(), MapSizes(affinity=64, clients=8))
    finally:
        uninstall(bpffs)


def _kernel_at_least(major: int, minor: int) -> bool:
    import platform

    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(6, 4), reason="a map's fdinfo memlock is its real memory "
                    "(map_mem_usage) only since Linux 6.4; older kernels print a worst-case footprint")
def test_the_documented_kernel_memory_of_each_sized_map_is_what_the_kernel_counts(datapath):
    # `meshlet run --help` and the MapSizes docstrings quote layout.memory_cost; the kernel's own
    # count of a map's memory is the memlock line of its fdinfo.
    for name in L.SIZED_MAPS:
        with bpfsys.Map.open_pinned(loader.map_pin(datapath.bpffs, name)) as m:
            entries = sum(len(chunk) for chunk in m.chunks())
            with open(f"/proc/self/fdinfo/{m.fd}") as f:
                memlock = int(next(line.split()[1] for line in f if line.startswith("memlock:")))
        upfront, per_entry = L.memory_cost(name, datapath.sizes)
        estimate = upfront + per_entry * entries
        assert abs(memlock - estimate) <= 0.1 * memlock + 128 * 1024, (name, memlock, estimate)
