"""Prometheus metrics of the agent: one registry of our own, one prefix (`meshlet_`).

Role: name every metric once, and give the loop small methods to record what happened. The
exposition at /metrics is `prometheus_client.generate_latest(metrics.registry)`.
May touch: only its registry (the process-wide default registry is left alone, so tests and
embedders can make several agents in one process).

Label rule (issue 3): label values come from small closed sets only — object kind, map name,
map operation, outcome or reason, sync mode, source name, kernel feature (the fixed list
agent.datapath.features.FEATURES), and the one series of meshlet_build_info (version, git
revision, kernel release, map layout version). Never a Service, an IP address or a pod.
Histograms end in `_seconds`; counters are named without `_total` (the client adds it).
"""

from __future__ import annotations

import platform
import threading
from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.datapath.layout import LAYOUT_VERSION
from agent.version import git_revision, version

PREFIX = "meshlet"

#: Buckets for a sync (tens of microseconds for a small delta, seconds for 50k Services) and for
#: event-to-map latency (the contract is 1 s at p99, SEMANTICS B15; the bench's churn row judges
#: 10 ms at p99, hence the millisecond buckets).
SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
#: A check step is meant to take a few ms at 50k Services (agent/datapath/check.py).
CHECK_STEP_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class DatapathOutcomes:
    """A collector exposing the datapath's per-CPU outcome counters (summed over CPUs) as counters.

    The loop stores a snapshot (it alone talks to the maps); a scrape only reads the snapshot.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._snapshot: dict[str, int] = {}

    def update(self, counters: Mapping[str, int]) -> None:
        with self._lock:
            self._snapshot = dict(counters)

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(f"{PREFIX}_datapath_connections",
                                     "New connections and UDP flows seen by the socket hooks, by outcome "
                                     "(translated, rejected, unreachable, skipped, ...).", labels=["outcome"])
        repicks = CounterMetricFamily(f"{PREFIX}_udp_repicks",
                                      "Datagrams of unconnected UDP sockets whose remembered endpoint was no "
                                      "longer usable for their frontend, so they picked again (SEMANTICS A16).")
        with self._lock:
            for outcome, value in sorted(self._snapshot.items()):
                if outcome == "repicked":
                    repicks.add_metric([], value)
                else:
                    family.add_metric([outcome], value)
        yield family
        yield repicks

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(f"{PREFIX}_datapath_connections", "", labels=["outcome"]),
                CounterMetricFamily(f"{PREFIX}_udp_repicks", "")]


class PassiveHealth:
    """A collector for passive health (SEMANTICS A17): the kernel's per-CPU event counters as
    counters (event: ejections, capped, failures, successes), and the endpoints ejected now.
    Snapshot-based like DatapathOutcomes: the loop reads the maps, a scrape reads the snapshot."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, int] = {}
        self._ejected = 0

    def update(self, events: Mapping[str, int], ejected_now: int) -> None:
        with self._lock:
            self._events, self._ejected = dict(events), ejected_now

    def collect(self) -> Iterable:
        events = CounterMetricFamily(
            f"{PREFIX}_passive_health_events",
            "Passive health in the kernel: handshakes of translated TCP connections that failed or "
            "succeeded, endpoint ejections, and failures passed through because half of the "
            "endpoint set was ejected already (capped).", labels=["event"])
        ejected = GaugeMetricFamily(f"{PREFIX}_passive_health_ejected_endpoints",
                                    "Endpoints ejected by passive health now (their back-off not over).")
        with self._lock:
            for event, value in sorted(self._events.items()):
                events.add_metric([event], value)
            ejected.add_metric([], self._ejected)
        yield events
        yield ejected

    def describe(self) -> Iterable:
        return [CounterMetricFamily(f"{PREFIX}_passive_health_events", "", labels=["event"]),
                GaugeMetricFamily(f"{PREFIX}_passive_health_ejected_endpoints", "")]


def build_info() -> dict[str, str]:
    """The labels of meshlet_build_info (and what `meshlet --version` prints)."""
    return {"version": version(), "revision": git_revision(), "kernel": platform.release(),
            "layout_version": str(LAYOUT_VERSION)}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sync_duration = Histogram(f"{PREFIX}_sync_duration_seconds",
                                       "Time to resolve and write one sync to the maps.",
                                       ["mode"], buckets=SYNC_BUCKETS, registry=r)
        self.event_to_map = Histogram(f"{PREFIX}_event_to_map_seconds",
                                      "Time from a change of one object (a watch event, an object a "
                                      "relist or a manifests file change brought, a pod cgroup) "
                                      "reaching the agent to the end of the sync that wrote it to the "
                                      "maps; one observation per changed object. The start-up lists, "
                                      "written by the first sync, are not observed.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.build_info = Gauge(f"{PREFIX}_build_info", "Always 1: the meshlet version, git revision, "
                                "kernel release and map layout version this agent runs with.",
                                ["version", "revision", "kernel", "layout_version"], registry=r)
        self.build_info.labels(**build_info()).set(1)
        self.syncs = Counter(f"{PREFIX}_syncs", "Syncs attempted, by mode and outcome.",
                             ["mode", "outcome"], registry=r)
        self.objects = Gauge(f"{PREFIX}_objects", "Objects known to the agent, by kind.", ["kind"], registry=r)
        self.sources_synced = Gauge(f"{PREFIX}_source_synced",
                                    "1 once a source has finished its first list.", ["source"], registry=r)
        self.frontends = Gauge(f"{PREFIX}_frontends_programmed",
                               "Frontends (address, port, protocol, client scope) in the maps.", registry=r)
        self.groups = Gauge(f"{PREFIX}_backend_groups_programmed",
                            "Backend groups (one Service port, one address family) in the maps.", registry=r)
        self.backends = Gauge(f"{PREFIX}_backends_programmed",
                              "Endpoints in the maps, counted once per backend group.", registry=r)
        self.map_ops = Counter(f"{PREFIX}_map_operations", "Map entries written or deleted, by map and "
                               "operation (update, delete).", ["map", "op"], registry=r)
        self.map_failures = Counter(f"{PREFIX}_map_failures", "Failed map writes, by map and reason "
                                    "(full: no room, the old state was kept; error: anything else).",
                                    ["map", "reason"], registry=r)
        self.map_fill = Gauge(f"{PREFIX}_map_fill_ratio", "Entries in a map divided by its capacity.",
                              ["map"], registry=r)
        self.write_failures = Counter(f"{PREFIX}_write_failures", "Syncs whose map write failed.", registry=r)
        self.attached = Gauge(f"{PREFIX}_programs_attached", "1 once our programs are attached.", registry=r)
        self.leader = Gauge(f"{PREFIX}_leader",
                            "1 while this agent is the elected Route status writer.", registry=r)
        self.kernel_features = Gauge(f"{PREFIX}_kernel_feature",
                                     "1 when the kernel has a feature the socket programs use, 0 when "
                                     "it lacks it (probed at start; see the kernel.features log line).",
                                     ["feature"], registry=r)
        self.manifests_bad_files = Gauge(f"{PREFIX}_manifests_bad_files",
                                         "Files of the manifests directory skipped whole or holding a bad "
                                         "document now (each is logged once per change of the file).",
                                         registry=r)
        self.sockets_terminated = Counter(f"{PREFIX}_sockets_terminated",
                                          "Live sockets the agent terminated because meshlet had translated "
                                          "them to an endpoint that left (reason endpoint_removed) or to a "
                                          "frontend that is gone (frontend_removed), by protocol (SEMANTICS "
                                          "A16). UDP re-picks of unconnected sockets: meshlet_udp_repicks.",
                                          ["protocol", "reason"], registry=r)
        self.api_errors = Counter(f"{PREFIX}_api_errors",
                                  "Failed Kubernetes API requests and broken watches, by kind ('discovery' "
                                  "for the route-kind discovery) and reason (agent.sources.kube."
                                  "API_ERROR_REASONS); the datapath keeps its state meanwhile.",
                                  ["kind", "reason"], registry=r)
        self.map_check_step = Histogram(f"{PREFIX}_map_check_step_seconds",
                                        "Time of one step of the periodic map check (one bounded part of "
                                        "one map compared with what the agent wrote; it runs between "
                                        "syncs and holds a waiting change back at most this long).",
                                        buckets=CHECK_STEP_BUCKETS, registry=r)
        self.map_check_cycles = Counter(f"{PREFIX}_map_check_cycles",
                                        "Periodic map checks completed: every planned map compared once "
                                        "with what the agent wrote.", registry=r)
        self.map_drift = Counter(f"{PREFIX}_map_drift",
                                 "Map entries the periodic check found other than the agent wrote them "
                                 "(changed, deleted or added behind its back), by map; each is repaired by "
                                 "a full reconcile.", ["map"], registry=r)
        self.datapath_outcomes = DatapathOutcomes()
        r.register(self.datapath_outcomes)
        self.passive_health = PassiveHealth()
        r.register(self.passive_health)

    def record_objects(self, counts: Mapping[str, int]) -> None:
        for kind in set(counts) | {s.get("kind") for s in self._label_sets(self.objects)}:
            if kind:
                self.objects.labels(kind=kind).set(counts.get(kind, 0))

    def record_event_to_map(self, latencies: Iterable[float]) -> None:
        """One observation per changed object: seconds from its arrival to its write."""
        observe = self.event_to_map.observe
        for seconds in latencies:
            observe(max(0.0, seconds))

    def record_programmed(self, frontends: int, groups: int, backends: int) -> None:
        self.frontends.set(frontends)
        self.groups.set(groups)
        self.backends.set(backends)

    def record_map_ops(self, ops: Mapping[tuple[str, str], int]) -> None:
        """`ops`: (map name, "update" | "delete") -> entries, as the reconciler counts them."""
        for (map_name, op), count in ops.items():
            if count:
                self.map_ops.labels(map=map_name, op=op).inc(count)

    def record_map_failure(self, error: Exception) -> None:
        """A failed write: a full map names its maps (`problems`); anything else counts once."""
        problems = getattr(error, "problems", None)
        if isinstance(problems, Mapping) and problems:
            for map_name in problems:
                self.map_failures.labels(map=map_name, reason="full").inc()
        else:
            self.map_failures.labels(map="unknown", reason="error").inc()

    def record_kernel_features(self, present: Mapping[str, bool]) -> None:
        """`present`: feature name -> bool, as Datapath.support.present gives it (names from the
        fixed list agent.datapath.features.FEATURES)."""
        for feature, has in present.items():
            self.kernel_features.labels(feature=feature).set(1 if has else 0)

    def record_fill(self, fill: Mapping[str, tuple[int, int]]) -> None:
        """`fill`: map name -> (entries, max_entries), as Datapath.fill() reports it."""
        for map_name, (entries, capacity) in fill.items():
            self.map_fill.labels(map=map_name).set(entries / capacity if capacity else 0.0)

    @staticmethod
    def _label_sets(metric) -> list[dict]:
        return [sample.labels for family in metric.collect() for sample in family.samples]
