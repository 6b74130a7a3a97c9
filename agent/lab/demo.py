"""`meshlet demo`: meshlet working on this machine in a minute, no cluster needed.

Role: build a lab (agent.lab.pods) from examples/demo, start `meshlet run --manifests` on the
lab's own cgroup subtree, drive real connections from the client pods, print per client where
the connections went against what the rules say, then edit the producer route live (80/20 ->
50/50) and show the split move while the consumer route keeps its own. Exit code 0 only when
every observed share is within the stated tolerance of the expected one.

The expected shares are written here, from the rules (SEMANTICS B5, B12, A10, A11) applied by
hand to examples/demo: the demo checks the agent, it does not ask the agent what to expect.

Tolerance: a share p observed over n connections is a binomial proportion; it passes when it is
within Z_SCORE standard deviations, Z_SCORE * sqrt(p(1-p)/n), of p (a false alarm about once in
150,000 checks); a share of exactly 0 or 1 must be observed exactly.

May touch: what the lab touches; a temporary copy of the manifests (the live edit never changes
the checkout); its own bpffs directory /sys/fs/bpf/meshlet-demo-<id>; the `meshlet run` process
it starts (stopped by its pid). Everything is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import click
import yaml

from agent.errors import UserError

#: How many standard deviations an observed share may be from the expected one.
Z_SCORE = 4.5
#: `meshlet run` compiles the BPF programs at start: seconds, more on a loaded CI machine.
READY_TIMEOUT = 120.0
#: After the live edit: the agent reads a manifests change within 1 s and writes it to the maps
#: within 1 s of seeing it (SEMANTICS B15); new connections start after this wait.
SETTLE_AFTER_EDIT = 2.5
AGENT_STOP_GRACE = 10.0

DEMO_NODE = "meshlet-demo"
PRODUCER_ROUTE_FILE = "routes-shop.yaml"


@dataclass(frozen=True)
class Probe:
    """Connections from one client pod to one Service, and what the rules say should happen."""

    client: str  #: "namespace/pod"
    service: str  #: "namespace/service"
    port: int
    protocol: str  #: tcp | udp
    rule: str  #: the rule that decides, for humans
    expect: dict[str, float] | None  #: bucket -> share; None: ClientIP affinity (one pod takes all)
    by: str = "service"  #: buckets are backend Services ("service") or pods ("pod")


@dataclass
class Row:
    bucket: str
    expected: float | None  #: None: "all of them, to one pod"
    count: int
    total: int
    tolerance: float = 0.0
    ok: bool = True

    @property
    def share(self) -> float:
        return self.count / self.total if self.total else 0.0


@dataclass
class Check:
    step: str
    probe: Probe
    frontend: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)

    def share(self, bucket: str) -> float:
        return next((row.share for row in self.rows if row.bucket == bucket), 0.0)


# --- the scenario: examples/demo and the rules applied to it by hand ----------------------------

BATCH = "batch/batch-client"
WEB = "web/web-client"
CHECKOUT, V1, V2 = "shop/checkout", "shop/checkout-v1", "shop/checkout-v2"
LEGACY = "shop/legacy"

BEFORE_EDIT = [
    Probe(BATCH, CHECKOUT, 80, "tcp",
          "producer route shop/checkout-split: v1 weight 80, v2 weight 20 (B5, B12)",
          {V1: 0.8, V2: 0.2}),
    Probe(WEB, CHECKOUT, 80, "tcp",
          "consumer route web/checkout-canary replaces the producer's: v2 only (B5)",
          {V1: 0.0, V2: 1.0}),
    Probe(BATCH, "shop/cart", 80, "tcp",
          "cart has ClientIP affinity: every connection to the pod chosen first (A11)", None),
    Probe(WEB, "shop/cart", 80, "tcp",
          "cart has ClientIP affinity: every connection to the pod chosen first (A11)", None),
    Probe(BATCH, "shop/legacy", 80, "tcp",
          "legacy has no endpoints: connect() fails at once with ECONNREFUSED (A9)",
          {"error ECONNREFUSED": 1.0}, by="pod"),
    Probe(BATCH, "shop/stats", 8125, "udp",
          "no route: each UDP flow picks uniformly among the pods (A10)",
          {"shop/stats-a": 0.5, "shop/stats-b": 0.5}, by="pod"),
]
NEW_WEIGHTS = {"checkout-v1": 50, "checkout-v2": 50}
AFTER_EDIT = [
    Probe(BATCH, CHECKOUT, 80, "tcp",
          "producer route shop/checkout-split, edited: v1 weight 50, v2 weight 50", {V1: 0.5, V2: 0.5}),
    Probe(WEB, CHECKOUT, 80, "tcp",
          "consumer route web/checkout-canary still wins for web: v2 only", {V1: 0.0, V2: 1.0}),
]


def connections_per_probe(probe: Probe, short: bool) -> int:
    if probe.expect is None or all(bucket.startswith("error ") for bucket in probe.expect):
        return 40 if short else 200
    if probe.protocol == "udp":
        return 100 if short else 400
    return 200 if short else 1000


# --- pure: judging what was observed --------------------------------------------------------------


def tolerance(p: float, n: int) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return Z_SCORE * math.sqrt(p * (1 - p) / n)


def judge(probe: Probe, answer: dict, n: int, backs: dict[str, set[str]],
          pod_refs: dict[str, str]) -> list[Row]:
    """Rows of a check: one per expected bucket, one per unexpected bucket, one per error kind."""
    counts: dict[str, int] = {f"error {name}": count for name, count in answer["errors"].items()}
    for pod_name, count in answer["peers"].items():
        ref = pod_refs.get(pod_name, f"?/{pod_name}")
        if probe.by == "pod" or probe.expect is None:
            bucket = ref
        else:
            matching = sorted(backs.get(ref, set()) & set(probe.expect))
            bucket = matching[0] if matching else f"{ref} (not a backend)"
        counts[bucket] = counts.get(bucket, 0) + count
    rows = []
    if probe.expect is None:
        # Affinity: one pod of the Service takes every connection.
        for bucket, count in sorted(counts.items()):
            fits = count == n and probe.service in backs.get(bucket, set())
            rows.append(Row(bucket, None, count, n, ok=fits))
        return rows
    for bucket, p in probe.expect.items():
        count = counts.pop(bucket, 0)
        tol = tolerance(p, n)
        rows.append(Row(bucket, p, count, n, tol, abs(count / n - p) <= tol + 1e-9))
    for bucket, count in sorted(counts.items()):
        rows.append(Row(bucket, 0.0, count, n, ok=False))
    return rows


def format_check(check: Check) -> list[str]:
    mark = "ok" if check.ok else "FAIL"
    lines = [f"  -> {check.probe.service} {check.frontend}: {check.probe.rule}"]
    table = [("BACKEND", "EXPECTED", "OBSERVED", "COUNT", "")]
    for row in check.rows:
        if row.expected is None:
            expected = "all (one pod)"
        elif row.tolerance:
            expected = f"{row.expected:.0%} ± {row.tolerance:.0%}"
        else:
            expected = f"{row.expected:.0%} exactly"
        table.append((row.bucket, expected, f"{row.share:.1%}", f"{row.count}/{row.total}",
                      "ok" if row.ok else "FAIL"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        lines.append("       " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(f"       {mark}")
    return lines


# --- I/O: the run ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _frontend(objects: list[dict], service: str, port: int, protocol: str) -> tuple[str, str]:
    from agent.lab.manifests import find

    namespace, name = service.split("/")
    address = find(objects, "Service", namespace, name)["spec"]["clusterIP"]
    return address, f"{address}:{port}/{protocol}"


def edit_producer_route(directory: str, weights: dict[str, int]) -> None:
    """Rewrite the producer route's weights in place (a new file renamed over the old one)."""
    path = os.path.join(directory, PRODUCER_ROUTE_FILE)
    with open(path) as f:
        route = yaml.safe_load(f)
    for ref in route["spec"]["rules"][0]["backendRefs"]:
        ref["weight"] = weights[ref["name"]]
    with open(path + ".new", "w") as f:
        f.write("# Edited live by `meshlet demo`.\n")
        yaml.safe_dump(route, f, sort_keys=False)
    os.replace(path + ".new", path)


class Agent:
    """`meshlet run` as a subprocess, on the lab's cgroup subtree and its own bpffs directory."""

    def __init__(self, manifests: str, cgroup_root: str, workdir: str, say):
        self.say = say
        self.manifests = manifests
        self.cgroup_root = cgroup_root
        self.bpffs = f"/sys/fs/bpf/meshlet-demo-{uuid.uuid4().hex[:8]}"
        self.listen = f"127.0.0.1:{_free_port()}"
        self.log_path = os.path.join(workdir, "meshlet-run.log")
        self.proc: subprocess.Popen | None = None
        self.argv = [sys.executable, "-m", "agent", "run", "--manifests", self.manifests,
                     "--cgroup-root", self.cgroup_root, "--bpffs", self.bpffs,
                     "--listen", self.listen, "--node-name", DEMO_NODE]

    def start(self) -> None:
        self.say("starting: meshlet " + " ".join(self.argv[3:]))
        with open(self.log_path, "w") as log:
            # Its own session: Ctrl-C reaches the demo, which then stops the agent in order.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        url = f"http://{self.listen}/readyz"
        started = time.monotonic()
        said = 0
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"meshlet run exited with code {self.proc.returncode} before it was "
                                f"ready; its last lines:\n{self.log_tail()}\nhint: run it by hand "
                                f"to see everything: {' '.join(self.argv)}")
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        self.say(f"meshlet run is ready ({time.monotonic() - started:.1f} s)")
                        return
            except (urllib.error.URLError, OSError):
                pass
            elapsed = time.monotonic() - started
            if elapsed > READY_TIMEOUT:
                raise UserError(f"meshlet run was not ready after {READY_TIMEOUT:.0f} s; its last "
                                f"lines:\n{self.log_tail()}\nhint: run it by hand and watch {url}: "
                                f"{' '.join(self.argv)}")
            if elapsed >= said + 5:
                said = int(elapsed)
                self.say(f"waiting for {url} ({said} s; compiling the BPF programs takes a while)")
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the agent (by its pid), then detach its programs and remove its pins."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(AGENT_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.bpffs):
            subprocess.run([sys.executable, "-m", "agent", "uninstall", "--bpffs", self.bpffs,
                            "--cgroup-root", self.cgroup_root],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        # Our own directory: whatever uninstall left (or could not, if it is missing) goes too.
        if os.path.exists(self.bpffs):
            shutil.rmtree(self.bpffs, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM cleans up like Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class DemoResult:
    checks: list[Check] = field(default_factory=list)
    #: `meshlet explain` of (client, service), read from the live pins
    explanations: dict[tuple[str, str], object] = field(default_factory=dict)


def run_demo(short: bool = False, manifests: str | None = None, say=print) -> DemoResult:
    """The whole demo; returns every check made (the test suite asserts on them)."""
    from agent.lab.manifests import (add_pods, backing_services, default_manifests_dir, pod_specs,
                                     read_objects)
    from agent.lab.pods import Lab, shielded_from_ctrl_c

    source = manifests or default_manifests_dir()
    workdir = tempfile.mkdtemp(prefix="meshlet-demo-")
    result = DemoResult()
    checks = result.checks
    try:
        copy = os.path.join(workdir, "manifests")
        shutil.copytree(source, copy)
        objects = read_objects(copy)
        specs = pod_specs(objects)
        backs = backing_services(objects)
        pod_refs = {spec.name: f"{spec.namespace}/{spec.name}" for spec in specs}
        with Lab(f"demo{uuid.uuid4().hex[:4]}", log_dir=os.path.join(workdir, "logs")) as lab:
            say(f"building the lab: {len(specs)} pods from {source} (cgroup root {lab.cgroup_root})")
            add_pods(lab, specs, progress=lambda line: say("  " + line))
            agent = Agent(copy, lab.cgroup_root, workdir, say)
            try:
                agent.start()
                agent.wait_ready()
                checks += _measure(lab, objects, backs, pod_refs, BEFORE_EDIT, "before the edit", short, say)
                for client, service in ((BATCH, CHECKOUT), (WEB, CHECKOUT), (BATCH, LEGACY)):
                    result.explanations[client, service] = _explain(lab, agent, objects, client,
                                                                    service, 80, say)
                say(f"editing {PRODUCER_ROUTE_FILE} live: shop/checkout-split weights 80/20 -> 50/50")
                edit_producer_route(copy, NEW_WEIGHTS)
                say(f"waiting {SETTLE_AFTER_EDIT} s for the agent to apply it (B15: within 1 s of seeing it)")
                time.sleep(SETTLE_AFTER_EDIT)
                checks += _measure(lab, objects, backs, pod_refs, AFTER_EDIT, "after the edit", short, say)
            finally:
                say("cleaning up: stopping meshlet run, removing its pins, the lab and the temp files")
                with shielded_from_ctrl_c():
                    agent.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _explain(lab, agent, objects, client, service, port, say):
    """`meshlet explain --from CLIENT --to SERVICE` from the agent's live pins: the command's own
    code (agent.explain.explain_text), with the lab telling the pods' cgroups."""
    from agent.datapath.dump import read_maps
    from agent.explain import explain_text, render

    def lab_pod_cgroups(namespace: str, name: str) -> int | None:
        pod = lab.pods.get(f"{namespace}/{name}")
        return pod.cgroup_id if pod is not None else None

    _address, frontend = _frontend(objects, service, port, "tcp")
    url = f"http://{agent.listen}"
    say(f"meshlet explain --from {client} --to {frontend} --bpffs {agent.bpffs} --agent {url}")
    ex = explain_text(lambda: read_maps(agent.bpffs), client, frontend, lab_pod_cgroups, url)
    for line in render(ex):
        say("  " + line)
    say("")
    return ex


def _measure(lab, objects, backs, pod_refs, probes, step, short, say) -> list[Check]:
    checks = []
    for probe in probes:
        address, frontend = _frontend(objects, probe.service, probe.port, probe.protocol)
        n = connections_per_probe(probe, short)
        kind = "connections" if probe.protocol == "tcp" else "flows"
        say(f"{step}: {n} new {probe.protocol.upper()} {kind} from {probe.client} to "
            f"{probe.service} ({frontend})")
        answer = lab.pod(probe.client).client(probe.protocol, address, probe.port, n, "--timeout", "1")
        checks.append(Check(step, probe, frontend, judge(probe, answer, n, backs, pod_refs)))
    say("")
    for client in dict.fromkeys(probe.client for probe in probes):
        namespace = client.split("/")[0]
        say(f"client {client} (namespace {namespace}), {step}:")
        for check in checks:
            if check.probe.client == client:
                for line in format_check(check):
                    say(line)
        say("")
    return checks


@click.command()
@click.option("--short", is_flag=True, help="fewer connections (the test suite's form)")
@click.option("--manifests", type=click.Path(file_okay=False), default=None,
              help="a copy of examples/demo to use instead (same names and rules)")
def demo(short, manifests):
    """Build a lab of pods, run meshlet on it, and show each connection's fate against the rules.

    Needs root (network namespaces, cgroups, BPF). Removes everything it made, also on Ctrl-C.
    Exit code 0 only if every observed share is within tolerance of what the rules say.

    \b
    Example:
      meshlet demo            (about ten seconds)
      meshlet demo --short
    """
    def say(line):
        click.echo(line)

    with _sigterm_as_interrupt():
        try:
            checks = run_demo(short=short, manifests=manifests, say=say).checks
        except KeyboardInterrupt:
            click.echo("interrupted: everything the demo made is removed", err=True)
            sys.exit(130)
    failed = [check for check in checks if not check.ok]
    tolerance_note = (f"shares within {Z_SCORE} binomial standard deviations of the expected "
                      "share; 0% and 100% exactly")
    if failed:
        click.echo(f"demo: {len(failed)} of {len(checks)} checks FAILED ({tolerance_note})")
        sys.exit(1)
    click.echo(f"demo: all {len(checks)} checks passed ({tolerance_note})")
