"""Stand-ins for the runtime's unit tests: a clock and a datapath without the kernel.

They are named as what they are (the resolver is the real one). The kernel tests
(tests/kernel/runtime) run the real datapath.
"""

from __future__ import annotations

from agent.datapath.check import CheckStep
from agent.datapath.reconcile import MapFullError
from agent.model import DesiredState
from agent.resolve import Resolver
from agent.runtime.health import Health
from agent.runtime.loop import SyncLoop
from agent.runtime.metrics import Metrics
from agent.runtime.store import Store
from agent.sources import POD_CGROUPS


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDatapath:
    """Stand-in for agent.datapath.Datapath: records every call; `fail_next` makes writes fail."""

    #: The stand-in check: a cycle of this many steps, each a tenth of the cycle's work.
    CHECK_STEPS = 10

    def __init__(self, adopted: bool = False, clock=None):
        self.adopted = adopted
        self.calls: list[tuple] = []
        self.fail_next = 0
        self.fail_attach = 0
        self.clock = clock
        self.check_times: list[float] = []  #: when each check step ran (the clock's time)
        self.check_steps_done = 0  #: steps of the current cycle
        self.drift_next: dict[str, int] = {}  #: drift the next check step reports
        self.fail_check = 0

    def attach(self):
        if self.fail_attach:
            self.fail_attach -= 1
            raise OSError("attach refused (stand-in)")
        self.calls.append(("attach",))

    def reconcile(self, state, pod_cgroups, delta=None):
        if self.fail_next:
            self.fail_next -= 1
            self.calls.append(("failed", "full" if delta is None else "delta"))
            raise MapFullError({"frontends": ["10.96.0.1:80/tcp"]})
        if delta is None:
            self.check_steps_done = 0  # like the real one: a full reconcile begins a new cycle
        # The resolver's state is a live view: keep a copy of what this write was given.
        state = DesiredState(dict(state.frontends), dict(state.groups), dict(state.clients))
        self.calls.append(("reconcile", "full" if delta is None else "delta", state, dict(pod_cgroups), delta))

    def check(self):
        if self.fail_check:
            self.fail_check -= 1
            raise OSError(5, "batch read failed (stand-in)")
        self.check_times.append(self.clock() if self.clock else 0.0)
        drift, self.drift_next = self.drift_next, {}
        self.check_steps_done += 1
        done = self.check_steps_done == self.CHECK_STEPS
        if done:
            self.check_steps_done = 0
        return CheckStep(10, 10 * self.CHECK_STEPS, done, drift)

    def counters(self):
        return {"translated": 7, "rejected": 1}

    def fill(self):
        return {"frontends": (256, 1024)}

    def passive_health(self):
        return {"ejections": 2, "failures": 6}, 1

    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] == "reconcile"]


def service(name: str, ip: str, port: int = 80, namespace: str = "mesh") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": port, "protocol": "TCP"}]}}


class Rig:
    """A loop over a store, the stand-in resolver and the fake datapath, on a fake clock."""

    def __init__(self, adopted: bool = False, sources=("manifests", POD_CGROUPS)):
        self.clock = FakeClock()
        self.store = Store(expected_sources=sources, clock=self.clock)
        self.resolver = Resolver("node-1")
        self.datapath = FakeDatapath(adopted=adopted, clock=self.clock)
        self.metrics = Metrics()
        self.health = Health(stale_change_threshold=30, failing_writes_threshold=3,
                             unapplied_since=self.store.unapplied_since, waiting_for=self.store.waiting_for,
                             clock=self.clock)
        self.statuses = []
        self.pods = []  #: what each written sync published for /status/pods
        self.loop = SyncLoop(self.store, self.resolver, self.datapath, self.health, self.metrics,
                             min_sync_interval=0.08, map_check_period=60, retry_initial=0.2,
                             retry_max=2.0, stats_interval=2.0, on_statuses=self.statuses.append,
                             on_pods=self.pods.append, clock=self.clock)

    def sync_all(self):
        """Every source finishes its first list."""
        self.store.synced("manifests")
        self.store.pod_cgroups({})

    def metric(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)
