"""A map that would overflow (SEMANTICS D4), proved with real traffic through the real agent.

Root only (marked `kernel`). Safety: see runtime_agent_helpers.py (lab namespaces and cgroup
subtree, our own bpffs directory, everything stopped by pid and uninstalled by the `world` fixture).

The agent runs with `--map-size endpoints=3`. Three Services fill the endpoints map; then one
manifests change asks for more than fits (a second endpoint for `echo`: its new set is written
beside the old one, so it needs two free entries) together with a change that fits (a new Service
without endpoints, which needs no endpoint entry). What a user would check:
- connections to `echo` keep going to its old endpoint only, while the new Service already answers
  as written (ECONNREFUSED: no endpoints), so what fits is applied;
- the log names the full map and the option that sizes it, `meshlet_map_failures` counts it, and
  /healthz shows it (its last error now, a failing verdict after repeated failures);
- when room appears (two Services removed) the agent converges on its own: `echo` reaches both
  endpoints and /healthz is clean again, without a restart.
"""

from __future__ import annotations

import re
import textwrap
import time

import pytest
from runtime_agent_helpers import write_atomically

pytestmark = pytest.mark.kernel

ECHO_IP, TWO_IP, THREE_IP, EMPTY_IP = "10.96.77.10", "10.96.77.11", "10.96.77.12", "10.96.77.13"


def service(name: str, ip: str, endpoints: list[str] | None) -> str:
    text = textwrap.dedent(f"""\
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: mesh}}
        spec:
          clusterIP: {ip}
          clusterIPs: [{ip}]
          ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
        """)
    if endpoints is None:
        return text
    listed = "\n".join(f"  - addresses: [{ep}]\n    conditions: {{ready: true}}" for ep in endpoints)
    return text + textwrap.dedent(f"""\
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: {name}-1
          namespace: mesh
          labels: {{kubernetes.io/service-name: {name}}}
        addressType: IPv4
        ports: [{{name: http, port: 8080, protocol: TCP}}]
        endpoints:
        """) + listed + "\n"


def cluster(*services: str) -> str:
    return "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh}\n" + "".join(services)


def map_full_failures(agent) -> float:
    _, metrics = agent.get("/metrics")
    found = re.search(r'^meshlet_map_failures_total\{map="endpoints",reason="full"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_change_that_does_not_fit_keeps_the_old_state_applies_the_rest_and_converges(world):
    a, b = world.pods["mesh/echo-a"].ipv4, world.pods["mesh/echo-b"].ipv4
    path = world.manifests_dir / "cluster.yaml"
    write_atomically(path, cluster(service("echo", ECHO_IP, [a]), service("two", TWO_IP, [b]),
                                   service("three", THREE_IP, [a])))
    agent = world.agent(extra=["--map-size", "endpoints=3"])
    agent.wait_ready()
    echo = world.connect_loop(address=ECHO_IP)
    echo.wait_for(5)
    assert {line.get("peer") for line in echo.lines()} == {"echo-a"}

    # Does not fit: echo's second endpoint. Fits: a new Service without endpoints.
    write_atomically(path, cluster(service("echo", ECHO_IP, [a, b]), service("two", TWO_IP, [b]),
                                   service("three", THREE_IP, [a]), service("empty", EMPTY_IP, [])))
    empty = world.connect_loop(address=EMPTY_IP)
    agent.wait_until(lambda: any(line.get("error") == "ECONNREFUSED" for line in empty.lines()),
                     "the change that fits applied (the new Service refuses)", timeout=30)
    agent.wait_until(lambda: map_full_failures(agent) >= 1, "meshlet_map_failures counts the full map", timeout=30)
    refused_from = time.time()
    log = agent.log_text()
    assert re.search(r"event=sync\.failed .*map endpoints is full \(--map-size endpoints=3\); kept the old "
                     r"state of group mesh/echo:http", log), log[-3000:]
    code, health = agent.get("/healthz")
    assert "map endpoints is full" in health["lastError"], health
    # Repeated failures make /healthz fail (Settings.failing_writes_threshold).
    agent.wait_until(lambda: agent.get("/healthz")[0] == 503, "/healthz failing while the map is full", timeout=60)
    code, health = agent.get("/healthz")
    assert any("map endpoints is full" in reason for reason in health["reasons"]), health

    # All that time, echo kept its old state: its old endpoint only, never a failure.
    while_full = [line for line in echo.lines() if line["t"] > refused_from]
    assert len(while_full) >= 5 and {line.get("peer") for line in while_full} == {"echo-a"}, while_full[:5]

    # Room appears: two Services go; the retry writes echo's new set without a restart.
    write_atomically(path, cluster(service("echo", ECHO_IP, [a, b]), service("empty", EMPTY_IP, [])))
    agent.wait_until(lambda: agent.get("/healthz")[0] == 200 and "lastError" not in agent.get("/healthz")[1],
                     "/healthz clean after room appeared", timeout=60)
    converged_at = time.time()
    echo.wait_for(len(echo.lines()) + 40, timeout=60)
    after = [line for line in echo.lines() if line["t"] > converged_at]
    assert {line.get("peer") for line in after} == {"echo-a", "echo-b"}, after[:10]
    assert not [line for line in echo.lines() if "error" in line], "a connection to echo failed"
    assert agent.proc.poll() is None, "the agent restarted"
