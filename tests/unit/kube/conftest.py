"""Fixtures for the Kubernetes layer: a stand-in API server, a real client pointed at it, a sink.

The API server here is `tests/standin_apiserver.py`, a stand-in (not Kubernetes) that speaks the
list/watch wire protocol; the client is the official `kubernetes.client.ApiClient`, so requests
travel over real sockets through the same connection pool the agent uses.
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

# pytest puts tests/ (home of tests/conftest.py) and this directory on sys.path.
from kube_testing import RecordingSink
from standin_apiserver import StandInApiServer


@pytest.fixture
def apiserver():
    server = StandInApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api_client(apiserver):
    config = k8s.Configuration()
    config.host = apiserver.url
    api = k8s.ApiClient(config)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def sink():
    return RecordingSink()
