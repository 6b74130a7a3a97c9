"""What operators watch, against a real agent: `meshlet trace` with the agent up and down, and the
Grafana dashboard against the agent's real /metrics.

Root only (marked `kernel`). Safety: see runtime_agent_helpers.py (own lab subtree, own bpffs, every
agent stopped by its pid, everything uninstalled by the `world` fixture).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runtime_agent_helpers import CLUSTER_IP, NODE, REPO, manifests, write_atomically

pytestmark = pytest.mark.kernel

DASHBOARD = Path(REPO) / "daemonset" / "grafana-dashboard.json"


def client_pod_manifest(pod) -> str:
    return textwrap.dedent(f"""\
        ---
        apiVersion: v1
        kind: Pod
        metadata: {{name: {pod.name}, namespace: {pod.namespace}, uid: {pod.uid}}}
        spec:
          nodeName: {NODE}
          containers: [{{name: c, image: none}}]
        status:
          podIPs: [{{ip: {pod.ipv4}}}]
        """)


def trace_one_connection(bpffs: str, client) -> dict:
    """`meshlet trace --count 1` while the client connects once to the Service."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", "trace", "--bpffs", bpffs, "-o", "json", "--count", "1",
                             "--to", f"{CLUSTER_IP}:80/tcp"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "tracing" in first, first + proc.stderr.read()
        client.client("tcp", CLUSTER_IP, 80, 1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    (line,) = out.splitlines()
    return json.loads(line)


@pytest.mark.parametrize("channel, env", [("ringbuf", {}), ("perf", {"MESHLET_PRETEND_NO_RINGBUF": "1"})],
                         ids=["ring-buffer", "perf-buffer-fallback"])
def test_trace_names_the_pod_and_service_with_the_agent_running_and_after_it_stopped(world, channel, env):
    """perf-buffer-fallback: the agent started with the test knob that hides the ring buffer from
    its probe, so its programs send to the perf event array, as on a kernel older than 5.8."""
    client = world.pods["default/client"]
    echo = world.pods["mesh/echo-a"]
    write_atomically(world.manifests_dir / "echo.yaml", manifests([echo.ipv4]) + client_pod_manifest(client))
    agent = world.agent(env=env)
    agent.wait_ready()
    assert f"trace_channel={channel}" in agent.log_text(), agent.log_text()[-2000:]
    agent.wait_until(lambda: "default/client" in _names(agent_bpffs(agent)), "the client pod named in the maps")

    event = trace_one_connection(agent_bpffs(agent), client)
    assert (event["client"], event["frontend"], event["backend"], event["endpoint"], event["verdict"]) == (
        "default/client", f"{CLUSTER_IP}:80", "mesh/echo:http/tcp/v4", f"{echo.ipv4}:8080", "forward")

    assert agent.stop(signal.SIGTERM) == 0, agent.log_text()[-2000:]
    down = trace_one_connection(agent_bpffs(agent), client)
    assert (down["client"], down["endpoint"], down["verdict"]) == ("default/client", f"{echo.ipv4}:8080", "forward"), \
        "pins only: the trace needs no agent"


def agent_bpffs(agent) -> str:
    return agent.argv[agent.argv.index("--bpffs") + 1]


def _names(bpffs: str) -> set[str]:
    from agent.datapath import trace as T

    return set(T.read_names(bpffs).values())


# --- the dashboard -----------------------------------------------------------------------------------

#: The sample names each metric type exposes (prometheus text format, as prometheus_client writes it).
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "untyped": ("",)}


def exported_series(metrics_text: str) -> set[str]:
    """Every series name the exposition offers: from the TYPE lines (so a labelled metric that has
    not happened yet, like a map failure, still counts) and from the samples."""
    names = set()
    for line in metrics_text.splitlines():
        typed = re.match(r"# TYPE (\S+) (\S+)", line)
        if typed:
            family, kind = typed.groups()
            if kind == "counter":  # the text format types a counter by its sample name, "_total" included
                family = family.removesuffix("_total")
            names |= {family + suffix for suffix in _SUFFIXES[kind]}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def dashboard_queries() -> list[str]:
    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []))
            yield from walk(p.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    variables = [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return list(walk(board["panels"])) + variables


def test_every_dashboard_query_names_a_metric_the_real_agent_exports(world):
    write_atomically(world.manifests_dir / "echo.yaml", manifests([world.pods["mesh/echo-a"].ipv4]))
    agent = world.agent()
    agent.wait_ready()
    world.pods["default/client"].client("tcp", CLUSTER_IP, 80, 1)
    code, text = agent.get("/metrics")
    assert code == 200
    exported = exported_series(text)
    queries = dashboard_queries()
    assert len(queries) >= 15
    for query in queries:
        used = set(re.findall(r"\bmeshlet_[a-z0-9_]+", query))
        assert used, f"a query that names no meshlet metric: {query}"
        assert used <= exported, f"{sorted(used - exported)} in {query!r}: not exported by the agent"
    # The panels the deploy README promises, each by the metric behind it.
    every = " ".join(queries)
    for metric in ("meshlet_syncs_total", "meshlet_sync_duration_seconds_bucket", "meshlet_map_fill_ratio",
                   "meshlet_datapath_connections_total", "meshlet_source_synced", "meshlet_leader",
                   "meshlet_kernel_feature"):
        assert metric in every, metric
