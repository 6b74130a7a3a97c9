"""`meshlet run --kubeconfig` end to end: a stand-in API server, the real agent, real connections.

Root only (marked `kernel`). The API server is tests/standin_apiserver.py, a STAND-IN that speaks
the Kubernetes list/watch wire protocol on 127.0.0.1 (it is not Kubernetes). The agent runs as a
subprocess on the lab's cgroup subtree with its own bpffs directory (see conftest.py for the
safety rules and the cleanup).

What a user would check: in Kubernetes mode the agent lists and watches, programs a route's
split, is ready, elects itself the Route status writer (it is alone) and writes our status
entry on the Route; /status/routes shows the same; a change through the API (the route deleted)
reaches new connections within 1 s.
"""

from __future__ import annotations

import time

import pytest
from runtime_agent_helpers import CLUSTER_IP
from standin_apiserver import StandInApiServer

from agent.model import CONTROLLER_NAME

pytestmark = pytest.mark.kernel

OTHER_IP = "10.96.77.11"


def service(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "mesh"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def endpoint_slice(service_name: str, ip: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "mesh",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "to-b", "namespace": "mesh"},
    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
             "rules": [{"backendRefs": [{"name": "echo-b", "port": 80}]}]},
}


@pytest.fixture
def apiserver():
    server = StandInApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kubeconfig(path, url: str):
    path.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: standin, cluster: {{server: "{url}"}}}}]
users: [{{name: test, user: {{token: standin-token}}}}]
contexts: [{{name: standin, context: {{cluster: standin, user: test}}}}]
current-context: standin
""")
    return path


def wait(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_kubernetes_mode_programs_routes_writes_status_and_follows_changes(world, apiserver, tmp_path):
    apiserver.serve_crd("HTTPRoute")
    apiserver.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}})
    apiserver.create(service("echo", CLUSTER_IP))
    apiserver.create(endpoint_slice("echo", world.pods["mesh/echo-a"].ipv4))
    apiserver.create(service("echo-b", OTHER_IP))
    apiserver.create(endpoint_slice("echo-b", world.pods["mesh/echo-b"].ipv4))
    apiserver.create(ROUTE)

    agent = world.agent(source=["--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", apiserver.url))])
    agent.wait_ready()
    loop = world.connect_loop()
    loop.wait_for(10)
    assert {line.get("peer") for line in loop.lines()} == {"echo-b"}, loop.lines()[:5]

    code, routes = agent.get("/status/routes")
    assert code == 200 and [(r["kind"], r["name"]) for r in routes] == [("HTTPRoute", "to-b")]
    accepted = {c["type"]: c["status"] for c in routes[0]["parents"][0]["conditions"]}
    assert accepted == {"Accepted": "True", "ResolvedRefs": "True"}

    def written_status():
        obj = apiserver.get("HTTPRoute", "mesh", "to-b")
        return [p for p in (obj.get("status") or {}).get("parents", []) if p.get("controllerName") == CONTROLLER_NAME]

    (ours,) = wait(written_status, "the elected agent writes our status entry on the Route")
    assert ours["parentRef"] == ROUTE["spec"]["parentRefs"][0]
    assert "meshlet_leader 1.0" in agent.get("/metrics")[1]

    deleted_at = time.time()
    apiserver.delete("HTTPRoute", "mesh", "to-b")
    time.sleep(1.5)
    after = [line for line in loop.lines() if line["t"] > deleted_at]
    assert after and not [line for line in after if "error" in line], after[:5]
    followed = [line["t"] - deleted_at for line in after if line["peer"] == "echo-a"]
    assert followed and followed[0] < 1.0, "the route's removal did not reach new connections within 1 s"
    assert agent.get("/status/routes")[1] == []
    assert agent.get("/healthz")[0] == 200
