"""Golden tests: YAML objects in, step by step, the whole `render_state()` and Route status text out.

Each `testdata/*.txtar` file is a script of sections `-- NAME --`:

    # free text: what the scenario shows
    -- apply --        YAML documents to upsert (a later document replaces an earlier one)
    -- delete --       YAML documents to delete (apiVersion, kind, metadata.namespace/name suffice)
    -- state --        expected render_state() after the step above
    -- status --       expected render_statuses() after it
    -- problems --     expected problem lines after it

After every `apply`/`delete` the Resolver commits; each expectation that follows is compared, and
the incremental state is also compared with a one-shot resolve of the objects then held. The node
is `node-a`. On a mismatch the test prints a unified diff; `MESHLET_UPDATE_GOLDEN=1` rewrites the
expectations from what resolve produced (review the diff before keeping it).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest
import yaml

from agent.model import render_state
from agent.resolve import Resolver, render_statuses, resolve
from agent.resolve.objects import identify

TESTDATA = Path(__file__).parent / "testdata"
NODE = "node-a"
UPDATE = os.environ.get("MESHLET_UPDATE_GOLDEN") == "1"
_SECTION = re.compile(r"^-- (\S+) --$")
COMMANDS = ("apply", "delete")
EXPECTATIONS = ("state", "status", "problems")


def parse(text: str) -> tuple[str, list[list]]:
    """(preamble, [[name, body], ...]) with bodies as written (newline-terminated)."""
    preamble, sections = [], []
    for line in text.splitlines(keepends=True):
        match = _SECTION.match(line.rstrip("\n"))
        if match:
            sections.append([match.group(1), ""])
        elif sections:
            sections[-1][1] += line
        else:
            preamble.append(line)
    return "".join(preamble), sections


def unparse(preamble: str, sections: list[list]) -> str:
    return preamble + "".join(f"-- {name} --\n{body}" for name, body in sections)


def render(resolver: Resolver, what: str) -> str:
    if what == "state":
        return render_state(resolver.state)
    if what == "status":
        return render_statuses(resolver.statuses)
    return "".join(f"{line}\n" for line in resolver.problems)


def diff(expected: str, got: str, where: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), got.splitlines(keepends=True),
                                        f"{where} (expected)", f"{where} (resolve)"))


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txtar")), ids=lambda p: p.stem)
def test_golden(path: Path):
    preamble, sections = parse(path.read_text())
    assert sections and sections[0][0] in COMMANDS, f"{path.name}: must start with -- apply --"
    resolver = Resolver(NODE)
    held: dict = {}
    failures = []
    step = 0
    for section in sections:
        name, body = section
        if name in COMMANDS:
            step += 1
            for obj in (d for d in yaml.safe_load_all(body) if d is not None):
                key, _ = identify(obj)
                if name == "apply":
                    resolver.upsert(obj)
                    held[key] = obj
                else:
                    resolver.delete(obj)
                    held.pop(key, None)
            resolver.commit()
            one_shot = resolve(list(held.values()), NODE)
            assert render_state(resolver.state) == render_state(one_shot.state), f"step {step}: incremental != one-shot"
            assert render_statuses(resolver.statuses) == render_statuses(one_shot.statuses), f"step {step}"
            continue
        assert name in EXPECTATIONS, f"{path.name}: unknown section -- {name} --"
        got = render(resolver, name)
        if got != body:
            if UPDATE:
                section[1] = got
            else:
                failures.append(diff(body, got, f"{path.name} step {step} {name}"))
    if UPDATE:
        path.write_text(unparse(preamble, sections))
    assert not failures, "\n" + "\n".join(failures) + "\n(MESHLET_UPDATE_GOLDEN=1 rewrites the expectations)"


def test_the_golden_format_round_trips():
    text = "# about\n-- apply --\nkind: X\n-- state --\nline\n"
    assert unparse(*parse(text)) == text
