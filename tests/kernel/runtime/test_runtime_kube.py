"""`meshlet run --kubeconfig` end to end: a stand-in API server, the real agent, real connections.

Root only (marked `kernel`). The API server is tests/standin_apiserver.py, a STAND-IN that speaks
the Kubernetes list/watch wire protocol on 127.0.0.1 (it is not Kubernetes). The agent runs as a
subprocess on the lab's cgroup subtree with its own bpffs directory (see conftest.py for the
safety rules and the cleanup).

The stand-in enforces RBAC: every request is authorized as the agent's ServiceAccount against the
ClusterRole and Role of daemonset/rbac.yaml (403 otherwise), so a verb the agent uses and the
manifest does not grant fails these tests. The agent gets POD_NAMESPACE as the DaemonSet sets it.

What a user would check: in Kubernetes mode the agent lists and watches, programs a route's
split, is ready, elects itself the Route status writer (it is alone) and writes our status
entry on the Route; /status/routes shows the same; a change through the API (the route deleted)
reaches new connections, none go back. With the status grant taken away, the datapath is the same,
the agent says why in its log (retrying with a growing pause) and in /healthz, which stays 200.
"""

from __future__ import annotations

import time

import pytest
import yaml
from runtime_agent_helpers import CLUSTER_IP, REPO, endpoint_slice, service
from standin_apiserver import GATEWAY_GROUP, StandInApiServer
from standin_rbac import Policy

from agent.model import CONTROLLER_NAME

pytestmark = pytest.mark.kernel

OTHER_IP = "10.96.77.11"


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "to-b", "namespace": "mesh"},
    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
             "rules": [{"backendRefs": [{"name": "echo-b", "port": 80}]}]},
}


RBAC_YAML = f"{REPO}/daemonset/rbac.yaml"


def agent_identity() -> tuple[str, str]:
    """The agent's ServiceAccount (namespace, name), as daemonset.yaml names it."""
    with open(f"{REPO}/daemonset/daemonset.yaml") as f:
        ds = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "DaemonSet")
    return ds["metadata"]["namespace"], ds["spec"]["template"]["spec"]["serviceAccountName"]


def rbac_policy() -> Policy:
    with open(RBAC_YAML) as f:
        return Policy.from_manifest(f.read(), *agent_identity())


def agent_env() -> dict:
    """What the DaemonSet's downward API gives the agent (the Lease's namespace)."""
    return {"POD_NAMESPACE": agent_identity()[0]}


@pytest.fixture
def apiserver():
    server = StandInApiServer(rbac=rbac_policy(), token="standin-token")
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

    agent = world.agent(source=["--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", apiserver.url))],
                        env=agent_env())
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
    after = loop.switched_to("echo-a", deleted_at)  # the route's removal reaches new connections
    assert not [line for line in after if "error" in line], after[:5]
    first = next(i for i, line in enumerate(after) if line["peer"] == "echo-a")
    assert not [line for line in after[first:] if line["peer"] != "echo-a"], after[first:first + 5]
    assert agent.get("/status/routes")[1] == []
    assert agent.get("/healthz")[0] == 200


def test_without_the_route_status_grant_the_agent_says_why_and_routes_as_before(world, apiserver, tmp_path):
    apiserver.rbac = rbac_policy().without(GATEWAY_GROUP, "httproutes/status", "update")
    apiserver.serve_crd("HTTPRoute")
    apiserver.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}})
    apiserver.create(service("echo", CLUSTER_IP))
    apiserver.create(endpoint_slice("echo", world.pods["mesh/echo-a"].ipv4))
    apiserver.create(service("echo-b", OTHER_IP))
    apiserver.create(endpoint_slice("echo-b", world.pods["mesh/echo-b"].ipv4))
    apiserver.create(ROUTE)

    agent = world.agent(source=["--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", apiserver.url))],
                        env=agent_env())
    agent.wait_ready()
    loop = world.connect_loop()
    loop.wait_for(10)
    lines = loop.lines()
    assert lines and {line.get("peer") for line in lines} == {"echo-b"}, lines[:5]

    status_path = "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/to-b/status"
    denied = wait(lambda: len(apiserver.requests_for_path(status_path)) >= 4 and apiserver.requests_for_path(status_path),
                  "four refused status writes", timeout=60)
    # Retried with a pause that grows (1 s, 2 s, 4 s ...), never in a tight loop.
    gaps = [b.at - a.at for a, b in zip(denied, denied[1:])][:3]
    assert all(gap >= 0.9 * 2 ** i for i, gap in enumerate(gaps)), gaps
    assert apiserver.get("HTTPRoute", "mesh", "to-b").get("status") is None

    log = agent.log_text().replace('\\"', '"')  # logfmt escapes the quotes inside a value
    assert ('httproutes.gateway.networking.k8s.io "to-b" is forbidden: User '
            '"system:serviceaccount:meshlet-system:meshlet" cannot update resource "httproutes/status"') in log
    assert "daemonset/rbac.yaml" in log
    code, health = agent.get("/healthz")
    assert code == 200 and "cannot update resource \"httproutes/status\"" in health["routeStatusError"], health
    assert {line.get("peer") for line in loop.lines()[len(lines):]} == {"echo-b"}
