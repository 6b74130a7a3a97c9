"""`meshlet run`: the agent. Wires sources, store, resolver, datapath, loop and listener together.

Role: the only module that knows every concrete piece. It builds the Settings from the flags
(the contract in DESIGN.md, "The command line"), opens the datapath (adopting pinned maps), starts
the sources and the HTTP listener, runs the one sync loop on its own thread, and waits for
SIGTERM/SIGINT in the main thread.
May touch: everything the pieces touch; the Kubernetes client is imported only in Kubernetes
mode (so `--manifests` runs on a machine without cluster credentials or the client's import cost).

Invariants:
- exit on SIGTERM/SIGINT is clean and detaches nothing: programs and pinned maps keep serving the
  last state until the next agent adopts them (SEMANTICS D1); only `meshlet uninstall` detaches;
- signals are blocked in every thread and taken by the main thread with sigtimedwait, so no
  handler ever runs inside a lock the loop holds;
- in Kubernetes mode only the elected agent writes Route status; every agent serves the same
  statuses at /status/routes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Mapping

import click

from agent import logs
from agent.errors import UserError
from agent.logs import get_logger
from agent.model import RouteId, RouteStatus
from agent.runtime.health import Health
from agent.runtime.http import Listener, PodBoard, RouteStatusBoard
from agent.runtime.loop import SyncLoop
from agent.runtime.metrics import Metrics
from agent.runtime.settings import (
    DEFAULT_BPFFS,
    DEFAULT_LISTEN,
    LOG_FORMATS,
    Settings,
    default_cgroup_root,
    default_node_name,
    parse_listen,
    parse_map_sizes,
)
from agent.runtime.store import Store
from agent.sources import POD_CGROUPS

log = get_logger("agent")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_settings(manifests: Path | None, kubeconfig: Path | None, node_name: str | None,
                   cgroup_root: Path | None, bpffs: Path, listen: str, log_format: str,
                   map_sizes: tuple[str, ...] = (), terminate_tcp: bool = False) -> Settings:
    if manifests is not None and kubeconfig is not None:
        raise UserError("--manifests and --kubeconfig exclude each other; hint: pass one of them "
                        "(neither means the in-cluster config)")
    if manifests is not None and not manifests.is_dir():
        raise UserError(f"--manifests {manifests} is not a directory; hint: pass the directory "
                        "holding your *.yaml, *.yml and *.json files")
    if kubeconfig is not None and not kubeconfig.is_file():
        raise UserError(f"--kubeconfig {kubeconfig} is not a file; hint: pass the path of a kubeconfig")
    root = cgroup_root if cgroup_root is not None else default_cgroup_root()
    if not (root / "cgroup.controllers").exists():
        raise UserError(f"--cgroup-root {root} is not a cgroup2 directory; hint: pass the cgroup2 mount "
                        "(see /proc/mounts) or a directory below it")
    return Settings(
        node_name=node_name or default_node_name(),
        cgroup_root=root,
        bpffs=bpffs,
        listen=parse_listen(listen),
        manifests=manifests,
        kubeconfig=kubeconfig,
        log_format=log_format,
        map_sizes=parse_map_sizes(map_sizes),
        terminate_tcp=terminate_tcp,
        leader_namespace=os.environ.get("POD_NAMESPACE") or Settings.leader_namespace,
    )


class StatusPublisher:
    """Hands the latest Route statuses to the StatusWriter while this agent leads (Kubernetes mode).

    Writing happens on this object's thread, never on the sync loop's: an API server that is slow
    or away delays status, never the datapath. Only the newest statuses are ever written; a failed
    pass is retried with a capped backoff (or sooner, when newer statuses arrive). Each new term as
    leader starts by forgetting what was written before (another agent may have written since).
    """

    RETRY_INITIAL = 1.0
    RETRY_MAX = 30.0

    def __init__(self, writer, metrics: Metrics, health: Health | None = None):
        self._writer = writer
        self._metrics = metrics
        self._health = health
        self._lock = threading.Lock()
        self._latest: Mapping[RouteId, RouteStatus] | None = None
        self._leading = False
        self._fresh_term = False
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=5)

    def publish(self, statuses: Mapping[RouteId, RouteStatus]) -> None:
        with self._lock:
            self._latest = statuses
        self._dirty.set()

    def started_leading(self) -> None:
        with self._lock:
            self._leading = True
            self._fresh_term = True
        self._metrics.leader.set(1)
        log.info("status.writer_active")
        self._dirty.set()

    def stopped_leading(self) -> None:
        with self._lock:
            self._leading = False
        self._metrics.leader.set(0)
        log.info("status.writer_standby")

    def _run(self) -> None:
        delay = self.RETRY_INITIAL
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            with self._lock:
                statuses, leading, fresh = self._latest, self._leading, self._fresh_term
                self._fresh_term = False
            if not leading or statuses is None:
                continue
            if fresh:
                self._writer.forget()
            try:
                self._writer.write(statuses)
                delay = self.RETRY_INITIAL
                self._report("")
            except Exception as err:  # the API server may be away: retry, never give up
                error = str(err)
                log.warning("status.retry", routes=len(statuses), retry_in=delay, error=error)
                self._report(error)
                self._dirty.set()
                self._stop.wait(delay)
                delay = min(self.RETRY_MAX, delay * 2)

    def _report(self, error: str) -> None:
        if self._health is not None:
            self._health.route_status_written(error)


def kube_api_client(kubeconfig: Path | None):
    """An ApiClient from --kubeconfig, else from the in-cluster service account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except ConfigException as err:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise UserError(f"cannot load the Kubernetes config from {where} ({err}); hint: pass "
                        "--kubeconfig FILE, or --manifests DIR to run without a cluster") from None
    return client.ApiClient(configuration)


class Agent:
    """One `meshlet run`: build, start, run the loop until a stop signal, stop (never detach)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop_event = threading.Event()
        self.store = Store(expected_sources=[POD_CGROUPS])
        self.metrics = Metrics()
        self.health = Health(settings.stale_change_threshold, settings.failing_writes_threshold,
                             unapplied_since=self.store.unapplied_since, waiting_for=self.store.waiting_for)
        self.board = RouteStatusBoard()
        self.pods = PodBoard()
        self._stoppers: list = []  # called in reverse order on exit
        self._publisher: StatusPublisher | None = None  # Kubernetes mode only

    def run(self) -> int:
        s = self.settings
        mode = "manifests" if s.manifests else "kubernetes"
        log.info("agent.starting", mode=mode, node=s.node_name, cgroup_root=str(s.cgroup_root),
                 bpffs=str(s.bpffs), listen=s.listen_text, manifests=str(s.manifests or "-"))
        # Blocked before any thread starts, so every thread inherits the mask and the signals
        # wait for the main thread's sigtimedwait below.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            listener = Listener(s.listen, self.health, self.metrics, self.board, self.pods)
            listener.start()
            self._stoppers.append(listener.stop)
            from agent.resolve import Resolver

            resolver = Resolver(s.node_name, passive_health=s.passive_health)
            # The loop and the sources start before the datapath opens: compiling the programs
            # takes seconds, during which the start-up lists are read and fed to the resolver
            # (the loop writes nothing before it has the datapath: SyncLoop.datapath_opened).
            loop = SyncLoop(self.store, resolver, None, self.health, self.metrics,
                            min_sync_interval=s.min_sync_interval, map_check_period=s.map_check_period,
                            retry_initial=s.retry_initial, retry_max=s.retry_max,
                            stats_interval=s.stats_interval, on_statuses=self._on_statuses,
                            on_pods=self.pods.publish)
            thread = threading.Thread(target=self._run_loop, args=(loop,), name="sync-loop", daemon=True)
            thread.start()
            self._stoppers.append(self._stop_loop)
            self._start_sources()
            datapath = self._open_datapath()
            loop.datapath_opened(datapath, self._open_stale_sockets(datapath))
            received = self._wait_for_stop(thread)
            self.stop_event.set()
            self.store.poke()
            thread.join(timeout=10)
            log.info("agent.stopped", signal=received or "-", detached="no",
                     note="programs and maps keep serving the last state")
            return 0 if received else 1
        finally:
            for stop in reversed(self._stoppers):
                try:
                    stop()
                except Exception as err:
                    log.warning("agent.stop_failed", what=getattr(stop, "__qualname__", "?"), error=repr(err))

    def _stop_loop(self) -> None:
        # Only matters when run() fails before its normal stop (the datapath did not open):
        # the loop thread must not outlive the sources it was fed by.
        self.stop_event.set()
        self.store.poke()

    def _wait_for_stop(self, loop_thread: threading.Thread) -> str | None:
        while loop_thread.is_alive():
            info = signal.sigtimedwait(STOP_SIGNALS, 1.0)
            if info is not None:
                return signal.Signals(info.si_signo).name
        log.error("agent.loop_ended", note="the sync loop ended unexpectedly")
        return None

    def _run_loop(self, loop: SyncLoop) -> None:
        try:
            loop.run(self.stop_event)
        except BaseException as err:  # the loop catches everything it expects; this is a bug
            log.error("loop.crashed", error=repr(err))
            raise

    def _open_datapath(self):
        from agent.datapath import Datapath
        from agent.datapath.layout import SIZED_MAPS, memory_cost

        sizes = self.settings.map_sizes
        log.info("maps.sizes", **{name: getattr(sizes, name) for name in SIZED_MAPS},
                 kernel_memory_upfront_mib=round(sum(memory_cost(n, sizes)[0] for n in SIZED_MAPS) / 2**20, 1),
                 kernel_memory_full_mib=round(sum(memory_cost(n, sizes)[0] + memory_cost(n, sizes)[1]
                                                  * getattr(sizes, n) for n in SIZED_MAPS) / 2**20, 1))
        datapath = Datapath.open(str(self.settings.bpffs), str(self.settings.cgroup_root), sizes)
        # close() releases our file descriptors only: attachments and pins stay (D1).
        self._stoppers.append(datapath.close)
        log.info("datapath.opened", adopted=datapath.adopted)
        support = datapath.support
        report = log.warning if support.disabled else log.info
        report("kernel.features", **support.log_fields())
        self.metrics.record_kernel_features(support.present)
        return datapath

    def _open_stale_sockets(self, datapath):
        """The sweeper of sockets whose endpoint went away, or None when the kernel cannot destroy
        sockets (the kernel.features line already said what is lost)."""
        if not datapath.support.present.get("sock_destroy"):
            return None
        from agent.runtime.stale import StaleSockets

        stale = StaleSockets.open(str(self.settings.bpffs), self.settings.cgroup_root,
                                  terminate_tcp=self.settings.terminate_tcp,
                                  on_terminated=lambda protocol, reason: self.metrics.sockets_terminated.labels(
                                      protocol=protocol, reason=reason).inc())
        self._stoppers.append(stale.close)
        return stale.sweep

    def _start_sources(self) -> None:
        from agent.sources.cgroups import CgroupsSource

        s = self.settings
        if s.manifests is not None:
            from agent.sources.manifests import SOURCE, ManifestsSource

            self.store.expect(SOURCE)
            source = ManifestsSource(s.manifests, self.store, s.manifests_poll_interval,
                                     on_bad_files=self.metrics.manifests_bad_files.set)
            source.start()
            self._stoppers.append(source.stop)
        else:
            self._start_kubernetes()
        cgroups = CgroupsSource(s.cgroup_root, self.store, s.cgroup_scan_interval)
        cgroups.start()
        self._stoppers.append(cgroups.stop)

    def _start_kubernetes(self) -> None:
        from agent.runtime.leader import LeaderElector
        from agent.runtime.status_writer import StatusWriter
        from agent.sources.kube import KubeSource

        s = self.settings
        api_client = kube_api_client(s.kubeconfig)
        source = KubeSource(api_client, s.node_name, self.store,
                            on_api_error=lambda kind, reason: self.metrics.api_errors.labels(
                                kind=kind, reason=reason).inc())
        for kind in source.kinds:
            self.store.expect(kind)
        source.start()
        self._stoppers.append(source.stop)

        publisher = StatusPublisher(StatusWriter(api_client), self.metrics, self.health)
        publisher.start()
        self._stoppers.append(publisher.stop)
        self._publisher = publisher
        # Unique per process: an old and a new agent on one node (a rolling update) must never
        # both believe they hold the Lease.
        identity = f"{s.node_name}-{uuid.uuid4().hex[:8]}"
        elector = LeaderElector(api_client, identity, s.leader_namespace,
                                on_start=publisher.started_leading, on_stop=publisher.stopped_leading)
        thread = threading.Thread(target=elector.run, name="leader", daemon=True)
        thread.start()
        self._stoppers.append(elector.stop)

    def _on_statuses(self, statuses: Mapping[RouteId, RouteStatus]) -> None:
        self.board.publish(statuses)
        if self._publisher is not None:
            self._publisher.publish(statuses)


def map_size_help() -> str:
    """The --help epilog: each sized map, its default capacity and its kernel memory cost."""
    from agent.datapath.layout import SIZED_MAPS, MapSizes, memory_cost

    defaults = MapSizes()
    lines = ["\b", "--map-size NAME=ENTRIES (kernel memory: up front + per entry in use; at the default):"]
    for name in SIZED_MAPS:
        upfront, per_entry = memory_cost(name, defaults)
        cost = f"{upfront / 2**20:.2f} MiB up front" + (f" + {per_entry} B per entry" if per_entry else
                                                         " (preallocated)")
        lines.append(f"  {name:<10} default {getattr(defaults, name):>7}   {cost}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=map_size_help())
@click.option("--manifests", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Read objects from the manifests below DIR instead of a cluster (re-read within 1 s).")
@click.option("--kubeconfig", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Kubeconfig of the cluster. With neither option: the in-cluster config.")
@click.option("--node-name", default=None, metavar="NAME", help="This node's name [default: $NODE_NAME, else the host name].")
@click.option("--cgroup-root", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="cgroup2 directory to attach to and scan for pods [default: the host's cgroup2 root].")
@click.option("--bpffs", type=click.Path(path_type=Path), default=DEFAULT_BPFFS, show_default=True, metavar="PATH",
              help="bpffs directory for the pinned maps and links.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="ADDR:PORT",
              help="HTTP listener: /healthz /readyz /metrics /status/routes.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="kv", show_default=True,
              help="key=value lines, or one JSON object per line.")
@click.option("--map-size", "map_sizes", multiple=True, metavar="NAME=ENTRIES",
              help="Capacity of one map (repeatable); NAME and cost are listed below. Must match the "
                   "pinned maps: to change it, `meshlet uninstall` first.")
@click.option("--passive-health", type=click.Choice(("on", "off")), default="on", show_default=True,
              help="Eject an endpoint whose TCP handshakes keep failing, for a back-off (in the kernel). "
                   "One Service: annotation meshlet.io/passive-health: \"off\".")
@click.option("--terminate-tcp", type=click.BOOL, default=False, show_default=True, metavar="BOOL",
              help="Also end translated TCP connections whose endpoint left its Service (connected UDP "
                   "sockets are ended either way; SEMANTICS A16).")
@click.option("--map-check-period", type=click.FloatRange(min=1.0), default=Settings.map_check_period,
              show_default=True, metavar="SECONDS",
              help="Compare every map entry with what the agent wrote within this period (a few ms at a "
                   "time, between syncs); an entry changed behind the agent's back is repaired within "
                   "about one period, two at most.")
def run(manifests, kubeconfig, node_name, cgroup_root, bpffs, listen, log_format, map_sizes,
        passive_health, terminate_tcp, map_check_period):
    """Run the agent: program every Service frontend into the kernel and keep it right.

    \b
    Examples:
      meshlet run --manifests examples/demo --cgroup-root /sys/fs/cgroup/meshlet-lab-demo
      meshlet run --kubeconfig ~/.kube/config --node-name worker-1

    SIGTERM and SIGINT stop the agent without detaching anything: connections keep flowing on the
    last programmed state until the next agent adopts it. `meshlet uninstall` detaches.
    """
    logs.configure(log_format)
    settings = build_settings(manifests, kubeconfig, node_name, cgroup_root, bpffs, listen, log_format, map_sizes,
                              terminate_tcp)
    settings = dataclasses.replace(settings, passive_health=passive_health == "on",
                                   map_check_period=map_check_period)
    code = Agent(settings).run()
    if code:
        raise SystemExit(code)
