"""The datapath: meshlet's socket programs and their maps, behind one small facade.

Role: what the runtime, the lab and the benchmark use. `Datapath.open` checks the machine
(preflight), probes the kernel's features (refusing a kernel without the required ones, turning
off what is optional; `support` says which), checks the pinned maps' layout, creates or adopts
them, compiles and loads the programs (not attached); `reconcile` plans a DesiredState
(agent/datapath/plan.py, pure) and hands the plan to the writer (agent/datapath/reconcile.py,
the only one, which never plans); `check` compares a bounded part of the maps with what the
writer wrote (agent/datapath/check.py); `attach` points our pinned cgroup links at the programs
(created, or updated in place); `close` drops our fds and never detaches (SEMANTICS D1).
`uninstall` is the only thing that detaches (D5).

Start-up order the caller must keep (D1): when `adopted` is False (new maps, nothing to serve
from), write the first full reconcile BEFORE `attach()`; when True, attaching at once is safe:
the new programs serve the state the previous agent left.

Modules: uapi (kernel numbers), features (kernel probe and what follows from it), layout
(structs, map specs, sizes), entries (packed entry forms, Plan), plan (pure: state -> entries),
reconcile (map writes), check (the periodic check of the maps), loader (preflight, compile,
pins, links), bpfsys (raw bpf(2)), dump (read-only decoding for the CLI and `explain`), cli
(`meshlet maps`, `meshlet uninstall`).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Mapping

from agent.datapath import bpfsys, features, loader
from agent.datapath import layout as L
from agent.datapath import plan as P
from agent.datapath.check import CheckStep, MapCheck
from agent.datapath.layout import MapSizes
from agent.datapath.reconcile import MapFullError, Reconciler, ReconcileStats
from agent.model import DesiredState, StateDelta

__all__ = ["CheckStep", "Datapath", "MapFullError", "MapSizes", "ReconcileStats", "uninstall"]


class Datapath:
    """One compiled and loaded datapath on a bpffs directory and a cgroup root."""

    def __init__(self, bpffs: str, cgroup_root: str, sizes: MapSizes, programs: loader.Programs,
                 maps: dict[str, bpfsys.Map], adopted: bool, support: features.Support):
        self.bpffs = bpffs
        self.cgroup_root = cgroup_root
        self.sizes = sizes
        self.programs = programs
        self.maps = maps
        #: True when pinned maps existed and our links were pinned: the programs were serving
        #: from these maps, so attaching the new ones at once serves the same state.
        self.adopted = adopted
        #: What the kernel has and what was turned off for lack of it (the start-up report).
        self.support = support
        #: Entries of the programs' state copied from an older layout at attach, by map.
        self.carried: dict[str, int] = {}
        self.planner = P.Planner()
        self.reconciler = Reconciler({name: maps[name] for name in L.WRITTEN_MAPS})
        self.checker = MapCheck(self.reconciler)

    @classmethod
    def open(cls, bpffs: str, cgroup_root: str, sizes: MapSizes | None = None,
             kernel_features: Mapping[str, bool] | None = None) -> "Datapath":
        """kernel_features: what the kernel has, by features.NAMES; None probes it (tests pass
        a stand-in result to load the programs an older kernel would get)."""
        sizes = sizes or MapSizes()
        level = loader.preflight(bpffs, cgroup_root)
        probed = features.probe() if kernel_features is None else kernel_features
        support = features.decide(probed, platform.release())
        found = loader.check_pinned_maps(bpffs, sizes)
        links_pinned = all(os.path.exists(os.path.join(loader.links_dir(bpffs), hook)) for hook in support.hooks)
        programs = loader.compile_and_load(bpffs, level, sizes, support)
        maps: dict[str, bpfsys.Map] = {}
        try:
            for name in L.MAP_SPECS:
                # socket storage: only the programs use it; the trace maps: only `meshlet trace`
                if name != "sockets" and name not in L.TRACE_MAPS:
                    maps[name] = bpfsys.Map.open_pinned(loader.map_pin(bpffs, name))
            adopted = set(L.PLANNED_MAPS) <= set(found) and links_pinned
            return cls(bpffs, cgroup_root, sizes, programs, maps, adopted, support)
        except BaseException:
            for m in maps.values():
                m.close()
            programs.close()
            raise

    def attach(self) -> None:
        """Create or update (in place) the pinned links; then drop older layouts' pins.

        On new maps (an upgrade across a layout change), the programs' state an older layout
        holds is carried over first (loader.carry_over; `carried` says what)."""
        if not self.adopted:
            self.carried = loader.carry_over(self.bpffs, self.maps)
        loader.attach(self.bpffs, self.cgroup_root, self.programs)
        loader.remove_unused_trace_pins(self.bpffs, self.support)
        loader.remove_old_layouts(self.bpffs)

    def reconcile(self, state: DesiredState, pod_cgroups: Mapping[str, int],
                  delta: StateDelta | None = None) -> ReconcileStats:
        """delta None: full diff with a sweep of stale entries; else only what delta names.

        Plan first (pure), then hand the plan to the writer: the writer never plans."""
        if delta is None:
            try:
                return self.reconciler.full(self.planner.full(state, pod_cgroups))
            finally:
                self.checker.restart()  # it read and compared every map: a new cycle begins
        return self.reconciler.apply(self.planner.change(state, delta, pod_cgroups))

    def check(self) -> CheckStep:
        """One bounded step of the periodic check of the maps against what was written
        (agent/datapath/check.py); a difference it reports is repaired by a full reconcile."""
        return self.checker.step()

    def counters(self) -> dict[str, int]:
        """Outcome -> connections since the maps were created, summed over CPUs; and "repicked":
        datagrams of unconnected UDP sockets whose remembered endpoint was no longer usable."""
        counters = self.maps["counters"]
        out = {}
        for index, outcome in (*L.OUTCOMES.items(), (L.COUNT_REPICKED, "repicked")):
            values = counters.lookup(bytes(L.U32(index))) or []
            out[outcome] = sum(int.from_bytes(v, "little") for v in values)
        return out

    def passive_health(self) -> tuple[dict[str, int], int]:
        """(event -> count since the maps were created, summed over CPUs; endpoints ejected now)
        of passive health (SEMANTICS A17)."""
        stats = self.maps["health_stats"]
        events = {}
        for index, event in L.HEALTH_STATS.items():
            values = stats.lookup(bytes(L.U32(index))) or []
            events[event] = sum(int.from_bytes(v, "little") for v in values)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the programs' clock
        ejected = sum(1 for v in self.maps["health"].items().values()
                      if L.HealthValue.from_buffer_copy(v).until_ns > now)
        return events, ejected

    def fill(self) -> dict[str, tuple[int, int]]:
        """Map -> (entries, max_entries) for every sized map."""
        out = {name: (n, self.maps[name].max_entries) for name, n in self.reconciler.counts().items()
               if L.MAP_SPECS[name].size_field}  # not config: one entry, always there
        out["affinity"] = (len(self.maps["affinity"].keys()), self.maps["affinity"].max_entries)
        return out

    def close(self) -> None:
        """Drop our fds. Never detaches: the pinned links keep the programs serving."""
        for m in self.maps.values():
            m.close()
        self.maps = {}
        self.programs.close()


def uninstall(bpffs: str) -> list[str]:
    """Detach our programs (unpin and detach the links) and remove every map pin."""
    return loader.uninstall(bpffs)
