"""The datapath modes the benchmark compares, each in its own pair of network namespaces.

- direct: the client connects to an endpoint (pod IP) itself: the physical limit.
- meshlet: the client, in a cgroup the bench made, connects to the ClusterIP; meshlet's programs
  (agent.datapath) pick the endpoint at connect(). The client netns is otherwise empty, so
  conntrack is not engaged (no NAT rules there).
- meshlet-no-health: the same with passive health off for every group (the agent's
  `--passive-health off`): what the health check costs the connect program and sock_ops.
- iptables-legacy / iptables-nft: kube-proxy's iptables layout loaded with iptables-restore into
  the client netns (OUTPUT chain: the client's own connections are DNATed).
- nftables: kube-proxy's nftables layout loaded with one `nft -f` into the client netns.

May touch: only its own namespaces, cgroups and bpffs directory (made through topology.Lab), and
the tools it runs inside them (nsenter --net, never in the root netns).

Every mode answers the same three questions: how long the full rule set (or map image) takes to
apply, how long one Service change takes, and which address a client dials for a Service.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import time
from pathlib import Path

from bench import iptables_rules, nft_rules
from bench.progtime import enable_program_stats, program_stats
from bench.synth import SERVICE_PORT, TARGET_PORT, Service, desired_state
from bench.topology import CLIENT_ADDR, Lab, Pair

ALL_MODES = ("direct", "meshlet", "meshlet-no-health", "iptables-legacy", "iptables-nft", "nftables")
FIREWALL_MODES = ("iptables-legacy", "iptables-nft", "nftables")


class ApplyTimeout(Exception):
    """Loading a rule set took longer than the run allows (the figure is then "> timeout")."""


class ApplyFailed(Exception):
    """The tool refused the rule set; str() is one line: the tool, the time it took, its error."""

#: Warnings the tools print on success too; they say nothing about a failure.
_TOOL_NOISE = ("Ignoring deprecated --wait-interval option.",)


class Mode:
    name = ""
    route_services = True  #: the client netns routes the Service range (firewall modes need it)
    applies = True  #: False when the mode has nothing to load (direct)
    cgroup: Path | None = None  #: the client joins this cgroup first, when set

    def __init__(self, lab: Lab, workdir: Path, apply_timeout: float):
        self.lab = lab
        self.workdir = workdir
        self.apply_timeout = apply_timeout
        self.pair: Pair | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this mode cannot run on this machine, or None."""
        return None

    def setup(self) -> None:
        self.pair = self.lab.pair(self.name, self.route_services)

    def apply_full(self, order: list[Service]) -> float:
        """Load every Service (in `order`); seconds taken."""
        return 0.0

    def apply_change(self, order: list[Service], old: Service, new: Service) -> float:
        """Apply one Service's endpoint change (`order` already holds `new`); seconds taken."""
        return 0.0

    def address(self, service: Service, proto: str, rng: random.Random) -> tuple[str, int]:
        return service.vip, SERVICE_PORT

    # helpers for the firewall modes
    def _in_client_netns(self, cmd: list[str], input_path: Path) -> float:
        """Run cmd inside the client netns with input_path on stdin; seconds, or ApplyTimeout."""
        full = ["nsenter", f"--net={self.pair.cli_path}", *cmd]
        with open(input_path) as stdin:
            start = time.perf_counter()
            proc = subprocess.Popen(full, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _, err = proc.communicate(timeout=self.apply_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by its pid
                proc.communicate()
                raise ApplyTimeout(f"{cmd[0]} did not finish in {self.apply_timeout:.0f} s")
            seconds = time.perf_counter() - start
        if proc.returncode != 0:
            lines = [line.strip() for line in err.splitlines() if line.strip() and line.strip() not in _TOOL_NOISE]
            raise ApplyFailed(f"{cmd[0]} failed after {seconds:.0f} s: {' / '.join(lines)[:300]}")
        return seconds


class Direct(Mode):
    name = "direct"
    route_services = False
    applies = False

    def setup(self):
        super().setup()
        # The same cgroup depth as the meshlet client, without programs: the two clients then
        # differ only by meshlet's hooks (cgroup depth alone changes per-task accounting costs).
        self.cgroup = self.lab.child_cgroup(self.lab.cgroup_subtree("direct"), "client")

    def address(self, service, proto, rng):
        return rng.choice(service.endpoints), TARGET_PORT


class Meshlet(Mode):
    name = "meshlet"
    route_services = False  # a connection the programs did not rewrite fails: nothing to hide it

    @classmethod
    def unavailable(cls):
        try:
            from agent.datapath import Datapath, uninstall  # noqa: F401
        except ImportError as err:
            return f"agent.datapath is not importable ({err})"
        return None

    def setup(self):
        from agent.datapath import Datapath, uninstall

        super().setup()
        root = self.lab.cgroup_subtree(self.name)
        self.cgroup = self.lab.child_cgroup(root, "client")
        bpffs = Path("/sys/fs/bpf") / f"{self.name}-bench-{self.lab.run_id}"
        self.lab.directory(bpffs)
        self.lab.on_close(f"meshlet pins in {bpffs}", lambda: uninstall(str(bpffs)))
        # Default MapSizes fit 50k Services x 10 endpoints, the largest N of the issue.
        self.datapath = Datapath.open(str(bpffs), str(root))
        self.lab.on_close("meshlet datapath", self.datapath.close)
        self.state = None
        enable_program_stats(self.lab)  # else the report leaves the program-time column empty

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """hook -> (run_time_ns, run_cnt) of our programs so far, from the kernel's own counters
        (kernel.bpf_stats_enabled, switched on by setup): the time spent inside the programs,
        apart from everything else a connect() costs."""
        return {hook: program_stats(fd) for hook, fd in self.datapath.programs.fds.items()}

    def desired(self, services):
        return desired_state(services)

    def apply_full(self, order):
        self.state = self.desired(order)
        start = time.perf_counter()
        self.datapath.reconcile(self.state, {})
        seconds = time.perf_counter() - start
        # Fresh maps: the first full write goes in before the programs are attached (SEMANTICS D1).
        self.datapath.attach()
        return seconds

    def apply_change(self, order, old, new):
        from agent.model import DesiredState, StateDelta

        changed = self.desired([new])
        groups = dict(self.state.groups)
        groups.update(changed.groups)
        self.state = DesiredState(frontends=self.state.frontends, groups=groups, clients=self.state.clients)
        delta = StateDelta(groups=frozenset(changed.groups))
        start = time.perf_counter()
        self.datapath.reconcile(self.state, {}, delta=delta)
        return time.perf_counter() - start


class MeshletNoHealth(Meshlet):
    """meshlet with passive health off in every group (SEMANTICS A17's agent switch)."""

    name = "meshlet-no-health"

    def desired(self, services):
        from agent.model import DesiredState

        state = desired_state(services)
        groups = {k: dataclasses.replace(g, passive_health=False) for k, g in state.groups.items()}
        return DesiredState(frontends=state.frontends, groups=groups, clients=state.clients)


class Firewall(Mode):
    """A kube-proxy layout loaded into the client netns."""

    def setup(self):
        super().setup()
        # kube-proxy's conntrack settings; nf_conntrack_max is global on recent kernels (left alone).
        self.pair.sysctl("net.netfilter.nf_conntrack_tcp_timeout_established", "86400")
        self.pair.sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600")


class Iptables(Firewall):
    restore = ""

    @classmethod
    def unavailable(cls):
        return None if shutil.which(cls.restore) and shutil.which("nsenter") else f"{cls.restore} not found"

    def _restore(self, text: str, label: str) -> float:
        path = self.workdir / f"{self.name}-{label}.rules"
        path.write_text(text)
        return self._in_client_netns([self.restore, "-w", "5", "-W", "100000", "--noflush", "--counters"], path)

    def apply_full(self, order):
        self.large = iptables_rules.is_large_cluster(order)
        return self._restore(iptables_rules.full_restore(order, self.large), "full")

    def apply_change(self, order, old, new):
        return self._restore(iptables_rules.partial_restore(order, old, new, self.large), "change")


class IptablesLegacy(Iptables):
    name = "iptables-legacy"
    restore = "iptables-legacy-restore"


class IptablesNft(Iptables):
    name = "iptables-nft"
    restore = "iptables-nft-restore"


class Nftables(Firewall):
    name = "nftables"

    @classmethod
    def unavailable(cls):
        return None if shutil.which("nft") and shutil.which("nsenter") else "nft not found"

    def _load(self, text: str, label: str) -> float:
        path = self.workdir / f"{self.name}-{label}.nft"
        path.write_text(text)
        return self._in_client_netns(["nft", "-f", "-"], path)

    def apply_full(self, order):
        return self._load(nft_rules.full_ruleset(order, CLIENT_ADDR), "full")

    def apply_change(self, order, old, new):
        return self._load(nft_rules.partial_ruleset(old, new), "change")


MODE_CLASSES = {cls.name: cls for cls in (Direct, Meshlet, MeshletNoHealth, IptablesLegacy, IptablesNft, Nftables)}
