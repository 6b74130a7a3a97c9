"""The layering contract, checked on every module's imports (lazy ones inside functions too).

Data flows one way, and so do imports. Layers, lowest first; a module may import its own layer
and the layers its row names, nothing else:

    base      agent (package), errors, gcpause, model, kinds, kubelet, logs, mounts, version
    resolve   agent/resolve/          -> base                      (pure)
    sources   agent/sources/          -> base                      (beside resolve, not on it)
    plan      datapath: uapi, layout, entries, plan -> base        (pure)
    datapath  the rest of agent/datapath/ -> base, plan
    runtime   agent/runtime/          -> base, resolve, sources, plan, datapath
    explain   agent/explain.py        -> base, plan, datapath, runtime (settings: the agent's defaults)
    lab       agent/lab/              -> everything above but bench
    bench     bench/                  -> everything above but lab
    cli       agent/cli.py, agent/__main__.py -> everything (the composition root)

So nothing in the production path (`meshlet run`, `maps`, `explain`, `uninstall`) imports the
lab or the benchmark. Two more rules:
- the writer never plans: agent.datapath.reconcile does not import agent.datapath.plan (the
  facade plans, then hands the plan over; the forms both need are in agent.datapath.entries);
- the pure layers (model, kinds, kubelet, resolve, plan) import nothing that does I/O: no bcc,
  kubernetes, pyroute2, prometheus_client, urllib3, subprocess.

A new module belongs to a layer by its path (LAYERS below); a module no layer claims fails the
test, so the contract is extended on purpose, never by accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: layer -> module name prefixes (longest prefix wins)
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("agent", "agent.errors", "agent.gcpause", "agent.model", "agent.kinds", "agent.kubelet",
             "agent.logs", "agent.mounts", "agent.version"),
    "resolve": ("agent.resolve",),
    "sources": ("agent.sources",),
    "plan": ("agent.datapath.uapi", "agent.datapath.layout", "agent.datapath.entries", "agent.datapath.plan"),
    "datapath": ("agent.datapath",),
    "runtime": ("agent.runtime",),
    "explain": ("agent.explain",),
    "lab": ("agent.lab",),
    "bench": ("bench",),
    "cli": ("agent.cli", "agent.__main__"),
}

#: layer -> the other layers it may import
MAY_IMPORT: dict[str, set[str]] = {
    "base": set(),
    "resolve": {"base"},
    "sources": {"base"},
    "plan": {"base"},
    "datapath": {"base", "plan"},
    "runtime": {"base", "resolve", "sources", "plan", "datapath"},
    "explain": {"base", "plan", "datapath", "runtime"},
    "lab": {"base", "resolve", "sources", "plan", "datapath", "runtime", "explain"},
    "bench": {"base", "resolve", "sources", "plan", "datapath", "runtime", "explain"},
    "cli": set(LAYERS),
}

#: (importer, imported) module pairs forbidden inside one layer
FORBIDDEN = {("agent.datapath.reconcile", "agent.datapath.plan")}

PURE_LAYERS = {"resolve", "plan"}
PURE_BASE = {"agent.model", "agent.kinds", "agent.kubelet"}
IO_LIBRARIES = ("bcc", "kubernetes", "pyroute2", "prometheus_client", "urllib3", "subprocess")


def layer_of(module: str) -> str | None:
    best, found = "", None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != "agent"  # the package alone is base
            if (module == prefix or below) and len(prefix) > len(best):
                best, found = prefix, layer
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports (absolute names; `from pkg import name` counts as pkg.name
    when that is a module of ours, else as pkg: its __init__ runs)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_our_module(candidate) else base)
    return found


def _is_our_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(module: str, imported: set[str]) -> list[str]:
    """What is wrong with `module` importing `imported` (empty: fine)."""
    own = layer_of(module)
    if own is None:
        return [f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"]
    problems = []
    for name in sorted(imported):
        top = name.split(".")[0]
        if own in PURE_LAYERS or module in PURE_BASE:
            if top in IO_LIBRARIES:
                problems.append(f"{module} ({own}, pure) imports {name}, which does I/O")
        if top not in ("agent", "bench"):
            continue
        other = layer_of(name)
        if other is None:
            continue  # reported as that module's own problem
        if other != own and other not in MAY_IMPORT[own]:
            problems.append(f"{module} ({own}) imports {name} ({other}): {own} may import "
                            f"{', '.join(sorted(MAY_IMPORT[own])) or 'nothing else'}")
        if (module, name) in FORBIDDEN:
            problems.append(f"{module} imports {name}: forbidden (see the module docstring)")
    return problems


def all_modules() -> list[Path]:
    return sorted(p for folder in ("agent", "bench") for p in (ROOT / folder).rglob("*.py"))


def test_every_module_keeps_to_its_layer():
    problems = []
    for path in all_modules():
        module = module_name(path)
        problems += violations(module, imports_of(path.read_text(), module, path.name == "__init__.py"))
    assert problems == [], "layering contract broken:\n" + "\n".join(problems)


def test_the_check_catches_a_violation():
    # The contract check itself, on imports the real modules must never have: the production
    # path importing the lab, a pure layer importing an I/O library, the writer planning.
    lazy_lab = "def f():\n    from agent.lab.pods import Lab\n"
    assert any("agent.lab.pods (lab)" in p
               for p in violations("agent.runtime.loop", imports_of(lazy_lab, "agent.runtime.loop")))
    assert any("does I/O" in p for p in violations("agent.resolve.routes", {"bcc"}))
    assert any("forbidden" in p for p in violations(
        "agent.datapath.reconcile", imports_of("from agent.datapath import plan\n", "agent.datapath.reconcile")))
    assert any("resolve" in p for p in violations("agent.sources.manifests", {"agent.resolve.objects"}))
    assert violations("agent.newthing", set()) != [], "a module no layer claims is reported"
