"""Golden tests end to end, without root: YAML manifests in, `meshlet maps dump -o json` out.

Each `scenarios/*.txtar` file is one scenario, in sections `-- NAME --`:

    # free text: what the scenario shows
    -- manifests --                  YAML documents, as `meshlet run --manifests` reads them
    -- cgroups --                    (optional) one `POD-UID CGROUP-ID` per line: pods on this node
    -- maps dump -o json --          the expected output

The objects go the agent's way: the manifests source's reader (agent.sources.manifests), the
resolver (node `node-a`), the datapath's planner, then its writer (the Reconciler) into
in-memory maps (`DictMap`, a stand-in for kernel hash maps); the maps are decoded by
agent.datapath.dump and printed by the CLI's own JSON function. Only the kernel is left out.
`MESHLET_UPDATE_GOLDEN=1` rewrites the expected output from what the pipeline produced (review
the diff before keeping it).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest

from agent.datapath import dump as D
from agent.datapath import layout as L
from agent.datapath.cli import dump_json
from agent.datapath.plan import Planner
from agent.datapath.reconcile import DictMap, Reconciler, dict_maps
from agent.resolve import Resolver
from agent.sources.manifests import order_routes, parse_manifest

SCENARIOS = Path(__file__).parent / "scenarios"
NODE = "node-a"
UPDATE = os.environ.get("MESHLET_UPDATE_GOLDEN") == "1"
EXPECTED = "maps dump -o json"
_SECTION = re.compile(r"^-- (.+) --$")


def sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            current = match.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {name: "\n".join(lines).strip("\n") + "\n" for name, lines in out.items()}


def maps_dump(manifests: str, cgroups: str) -> str:
    contents = parse_manifest("scenario.yaml", manifests)
    assert not contents.bad, f"bad documents in the scenario: {contents.bad}"
    resolver = Resolver(NODE)
    resolver.upsert_many(order_routes(list(contents.objects)))
    resolver.commit()
    pod_cgroups = {uid: int(cgroup) for uid, cgroup in (line.split() for line in cgroups.splitlines() if line.strip())}
    maps = dict_maps(1000)
    Reconciler(maps).full(Planner().full(resolver.state, pod_cgroups))
    view = D.decode({name: dict(m.data) for name, m in maps.items()})
    return dump_json(view) + "\n"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.txtar")), ids=lambda p: p.stem)
def test_manifests_to_maps_dump(path):
    text = path.read_text()
    parts = sections(text)
    got = maps_dump(parts["manifests"], parts.get("cgroups", ""))
    if UPDATE:
        head = text[: text.index(f"-- {EXPECTED} --")]
        path.write_text(head + f"-- {EXPECTED} --\n" + got)
        return
    want = parts[EXPECTED]
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "expected", "got"))
        pytest.fail(f"{path.name}: the maps differ from the expected dump (see the module docstring):\n{diff}")


def test_every_required_scenario_is_there():
    assert {p.stem for p in SCENARIOS.glob("*.txtar")} >= {
        "plain-service", "weighted-producer-route", "consumer-route", "affinity", "itp-local", "rejected-route"}
