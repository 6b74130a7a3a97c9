"""Real connections through the socket programs: frontend -> endpoint, and what the client sees.

Root only (marked `kernel`): see conftest.py for what is made and removed. Clients run the lab
client (agent.lab.client) inside a pod: N connections from one process, a JSON histogram back.
"""

import pytest

from conftest import ECHO_PORT, fe

pytestmark = pytest.mark.kernel

SVC4, SVC6 = "10.96.0.10", "fd00:96::10"


def test_tcp_connect_to_a_frontend_reaches_an_endpoint_and_getpeername_shows_the_frontend(
        datapath, shares, client):
    web = shares.group("web", ["web-1"])
    datapath.reconcile(shares.state({fe(SVC4, 80): shares.split((1, web))}, [web]), {})
    result = client.client("tcp", SVC4, 80, 5)
    assert result["peers"] == {"web-1": 5}, result
    assert result["errors"] == {}
    assert result["getpeername"] == [f"{SVC4}:80"]
    assert datapath.counters()["translated"] >= 5
