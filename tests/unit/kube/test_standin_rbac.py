"""The stand-in API server's RBAC mode decides as Kubernetes would for daemonset/rbac.yaml.

Table tests for the authorizer (tests/standin_rbac.py) against the shipped manifest, and one
request over HTTP through the official client: a verb the manifest does not grant gets 403 with
the real server's Status, a missing token 401.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from standin_apiserver import StandInApiServer
from standin_rbac import Policy, request_attributes

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_manifest((REPO / "daemonset" / "rbac.yaml").read_text(), "meshlet-system", "meshlet")


@pytest.mark.parametrize("method, path, query, allowed", [
    ("GET", "/api/v1/pods", {"fieldSelector": "spec.nodeName=n1"}, True),
    ("GET", "/api/v1/pods", {"watch": "true"}, True),
    ("GET", "/api/v1/services", {}, True),
    ("GET", "/api/v1/nodes/n1", {}, True),
    ("POST", "/api/v1/namespaces/mesh/pods", {}, False),
    ("DELETE", "/api/v1/namespaces/mesh/services/echo", {}, False),
    ("GET", "/api/v1/namespaces/mesh/secrets", {}, False),
    ("GET", "/apis/discovery.k8s.io/v1/endpointslices", {"watch": "1"}, True),
    ("GET", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/r", {}, True),
    ("PUT", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/r/status", {}, True),
    ("PATCH", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/grpcroutes/r/status", {}, True),
    ("PUT", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/r", {}, False),
    # The Lease: the Role grants it in the agent's own namespace only.
    ("POST", "/apis/coordination.k8s.io/v1/namespaces/meshlet-system/leases", {}, True),
    ("PUT", "/apis/coordination.k8s.io/v1/namespaces/meshlet-system/leases/meshlet", {}, True),
    ("DELETE", "/apis/coordination.k8s.io/v1/namespaces/meshlet-system/leases/meshlet", {}, False),
    ("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", {}, False),
    ("GET", "/apis/coordination.k8s.io/v1/leases", {}, False),
    # Discovery is open to every authenticated user.
    ("GET", "/api", {}, True),
    ("GET", "/apis/gateway.networking.k8s.io/v1", {}, True),
])
def test_the_agents_service_account_gets_what_rbac_yaml_grants(policy, method, path, query, allowed):
    assert policy.allows(request_attributes(method, path, query)) is allowed


def test_without_takes_one_verb_on_one_resource_away(policy):
    put = request_attributes("PUT", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/r/status", {})
    patch = request_attributes("PATCH", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/httproutes/r/status", {})
    grpc = request_attributes("PUT", "/apis/gateway.networking.k8s.io/v1/namespaces/mesh/grpcroutes/r/status", {})
    cut = policy.without("gateway.networking.k8s.io", "httproutes/status", "update")
    assert (cut.allows(put), cut.allows(patch), cut.allows(grpc)) == (False, True, True)


def test_over_http_a_verb_not_granted_is_403_with_the_real_status_and_no_token_is_401(policy):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with StandInApiServer(rbac=policy, token="sa-token") as server:
        server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}})
        configuration = client.Configuration()
        configuration.host = server.url
        configuration.api_key = {"authorization": "Bearer sa-token"}
        core = client.CoreV1Api(client.ApiClient(configuration))
        assert [n.metadata.name for n in core.list_namespace().items] == ["mesh"]
        with pytest.raises(ApiException) as denied:
            core.delete_namespace("mesh")
        status = json.loads(denied.value.body)
        assert (denied.value.status, status["kind"], status["reason"], status["code"]) == (403, "Status", "Forbidden", 403)
        assert status["message"] == ('namespaces "mesh" is forbidden: User "system:serviceaccount:meshlet-system:meshlet" '
                                     'cannot delete resource "namespaces" in API group "" at the cluster scope')

        configuration.api_key = {}
        with pytest.raises(ApiException) as anonymous:
            client.CoreV1Api(client.ApiClient(configuration)).list_namespace()
        assert anonymous.value.status == 401
