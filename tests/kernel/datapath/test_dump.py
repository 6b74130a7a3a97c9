"""`meshlet maps dump` and bpfsys against real pinned maps (no agent process, no compile).

Root only (marked `kernel`): see conftest.py for what is made and removed.
"""

import json
import os
import subprocess
import sys

import pytest

from agent.datapath import bpfsys, loader
from agent.datapath import dump as D
from agent.model import RouteRef

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def meshlet(*args):
    done = subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_maps_dump_decodes_frontends_groups_and_counters_for_humans_and_scripts(datapath, shares, client, bpffs):
    web = shares.group("web", ["web-1", "web-2"])
    canary = shares.group("web-canary", ["web-3"], affinity=60)
    route = RouteRef("HTTPRoute", "team-a", "canary")
    state = shares.state({
        shares.fe("10.96.0.10", 80): shares.split((1, web)),
        shares.fe("10.96.0.10", 80, scope="team-a"): shares.split((3, web), (1, canary), route=route),
    }, [web, canary], shares.clients())
    datapath.reconcile(state, shares.cgroups())
    client.client("tcp", "10.96.0.10", 80, 3)

    data = json.loads(meshlet("maps", "dump", "--bpffs", bpffs, "-o", "json"))
    assert sorted(data) == sorted(D.DUMPABLE)
    frontends = {(f["address"], f["port"], f["protocol"], f["scope"]): f for f in data["frontends"]}
    default = frontends[("10.96.0.10", 80, "TCP", "")]
    scoped = frontends[("10.96.0.10", 80, "TCP", "team-a")]
    assert default["has_scopes"] is True and default["verdict"] == "forward"
    assert [(s["group"], s["share"]) for s in scoped["split"]] == [
        ("shop/web:http/tcp/v4", 0.75), ("shop/web-canary:http/tcp/v4", 0.25)]
    assert scoped["route"] == "HTTPRoute team-a/canary rule 0"
    endpoints = {(e["group"], e["address"], e["port"]) for e in data["endpoints"]}
    assert ("shop/web:http/tcp/v4", shares.address("web-1", 4), 8080) in endpoints
    assert {c["scope"] for c in data["clients"]} == {"default", "team-a", "quiet", "shop"}
    assert {c["outcome"]: c["total"] for c in data["counters"]}["translated"] >= 3

    table = meshlet("maps", "dump", "frontends", "--bpffs", bpffs)
    header, *rows = table.splitlines()
    assert header.split() == ["FRONTEND", "PROTO", "SCOPE", "VERDICT", "SPLIT", "ROUTE"]
    assert any("10.96.0.10:80" in r and "team-a" in r and "0.75 shop/web:http/tcp/v4" in r for r in rows)


def test_batch_writes_and_reads_span_several_chunks(datapath):
    names = bpfsys.Map.open_pinned(loader.map_pin(datapath.bpffs, "names"))
    with names:
        keys = [(0xFEED000000000000 + i).to_bytes(8, "little") for i in range(bpfsys.BATCH_CHUNK * 2 + 5)]
        value = b"x" * names.info.value_size
        try:
            names.update_batch([(k, value) for k in keys])
            got = names.items()
            assert all(got.get(k) == value for k in keys)
        finally:
            names.delete_batch(keys + keys[:3])  # keys already gone are not an error
        assert not set(keys) & set(names.items())
