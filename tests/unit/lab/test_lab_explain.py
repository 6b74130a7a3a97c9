"""`meshlet explain` on map images made by the real planner (agent.datapath.plan), decoded by
agent.datapath.dump as `meshlet maps dump` decodes the pinned maps: the same bytes the agent
pins. A route with weights, a consumer route, a reject, affinity, and opt-out."""

import pytest

from agent.datapath.dump import decode
from agent.datapath.plan import plan
from agent.errors import UserError
from agent.explain import Client, Target, cross_check, explain_connection, parse_target, render
from agent.model import (BackendGroup, ClientPod, DesiredState, Endpoint, FrontendKey, FrontendState,
                         GroupKey, RouteRef, Verdict, WeightedGroup)

V1 = GroupKey("shop", "checkout-v1", "http", "TCP", 4)
V2 = GroupKey("shop", "checkout-v2", "http", "TCP", 4)
CART = GroupKey("shop", "cart", "http", "TCP", 4)
PRODUCER = RouteRef("HTTPRoute", "shop", "checkout-split", 0)
CONSUMER = RouteRef("HTTPRoute", "web", "checkout-canary", 0)

STATE = DesiredState(
    frontends={
        FrontendKey("10.96.10.10", 80, "TCP"): FrontendState(
            "shop", "checkout", "http", (WeightedGroup(80, V1), WeightedGroup(20, V2)), PRODUCER),
        FrontendKey("10.96.10.10", 80, "TCP", "web"): FrontendState(
            "shop", "checkout", "http", (WeightedGroup(1, V2),), CONSUMER),
        FrontendKey("10.96.20.10", 80, "TCP"): FrontendState(
            "shop", "cart", "http", (WeightedGroup(1, CART),)),
        FrontendKey("10.96.30.10", 80, "TCP"): FrontendState(
            "shop", "broken", "http", (), RouteRef("HTTPRoute", "shop", "broken", 0)),
        FrontendKey("10.96.40.10", 80, "TCP"): FrontendState(
            "shop", "half", "http", (WeightedGroup(1, None), WeightedGroup(3, V1)),
            RouteRef("HTTPRoute", "shop", "half", 0)),
    },
    groups={
        V1: BackendGroup(V1, (Endpoint("10.244.1.11", 8080), Endpoint("10.244.1.12", 8080)), Verdict.FORWARD),
        V2: BackendGroup(V2, (Endpoint("10.244.1.21", 8080), Endpoint("10.244.1.22", 8080)), Verdict.FORWARD),
        CART: BackendGroup(CART, (Endpoint("10.244.2.11", 8080),), Verdict.FORWARD, affinity_timeout=600),
    },
    clients={
        "uid-web": ClientPod("uid-web", "web", "web-client"),
        "uid-skip": ClientPod("uid-skip", "web", "sidecar-pod", skip=True),
    },
)
IMAGE = decode(plan(STATE, {"uid-web": 1001, "uid-skip": 1002}).expand())
CHECKOUT = Target("10.96.10.10", 80, "TCP")


def shares(ex):
    return [(g.group, round(g.share, 6), g.verdict) for g in ex.groups]


def test_producer_route_with_weights_for_a_client_without_consumer_routes():
    ex = explain_connection(IMAGE, Client("batch", "batch-client"), CHECKOUT)
    assert ex.frontend and ex.scope == "default" and ex.route == str(PRODUCER)
    assert shares(ex) == [(str(V1), 0.8, "forward"), (str(V2), 0.2, "forward")]
    assert [(e.endpoint, e.share) for e in ex.groups[0].endpoints] == [
        ("10.244.1.11:8080", 0.5), ("10.244.1.12:8080", 0.5)]
    text = "\n".join(render(ex))
    assert "route     HTTPRoute shop/checkout-split rule 0" in text
    assert "80.0%  shop/checkout-v1:http/tcp/v4" in text and "forward 100%" in text


def test_consumer_route_replaces_the_producer_route_for_its_namespace():
    for client in (Client("web", "web-client"), Client("web", "web-client", cgroup_id=1001)):
        ex = explain_connection(IMAGE, client, CHECKOUT)
        assert ex.scope == "web" and ex.route == str(CONSUMER)
        assert shares(ex) == [(str(V2), 1.0, "forward")]
        assert "consumer view of namespace web" in "\n".join(render(ex))


def test_a_pod_unknown_to_the_datapath_and_a_node_process_get_the_default_view():
    unknown = explain_connection(IMAGE, Client("web", "new-pod", cgroup_id=4242), CHECKOUT)
    assert unknown.scope == "default" and unknown.route == str(PRODUCER)
    assert "not in the datapath's clients map" in unknown.client_note
    node = explain_connection(IMAGE, Client(None, None), CHECKOUT)
    assert node.scope == "default" and node.route == str(PRODUCER)


def test_reject_verdicts_whole_and_partial():
    empty = explain_connection(IMAGE, Client("batch", "c"), Target("10.96.30.10", 80, "TCP"))
    assert empty.verdict.startswith("reject: ECONNREFUSED") and not empty.groups
    half = explain_connection(IMAGE, Client("batch", "c"), Target("10.96.40.10", 80, "TCP"))
    assert shares(half)[0][1:] == (0.25, "reject")
    assert half.verdict == "forward 75% to the endpoints above; reject 25% with ECONNREFUSED"


def test_affinity_and_default_balancing():
    ex = explain_connection(IMAGE, Client("batch", "c"), Target("10.96.20.10", 80, "TCP"))
    assert ex.route is None and ex.groups[0].affinity_timeout == 600
    assert "ClientIP affinity 600 s" in "\n".join(render(ex))


def test_opted_out_pods_and_non_frontends_are_untouched():
    skip = explain_connection(IMAGE, Client("web", "sidecar-pod", cgroup_id=1002), CHECKOUT)
    assert skip.verdict.startswith("untouched: the client opted out")
    miss = explain_connection(IMAGE, Client("web", "web-client"), Target("10.96.10.10", 81, "TCP"))
    assert not miss.frontend and miss.verdict.startswith("untouched: not a Service frontend")
    udp = explain_connection(IMAGE, Client("web", "web-client"), Target("10.96.10.10", 80, "UDP"))
    assert not udp.frontend


def test_targets_parse_with_a_hint_on_error():
    assert parse_target("10.96.0.10:53/udp") == Target("10.96.0.10", 53, "UDP")
    assert parse_target("[fd00::a]:80") == Target("fd00::a", 80, "TCP")
    assert parse_target("[::ffff:10.96.0.10]:80") == Target("10.96.0.10", 80, "TCP")
    for bad in ("10.96.0.10", "10.96.0.10:80/sctp", "nohost:80", "10.96.0.10:0"):
        with pytest.raises(UserError, match="hint"):
            parse_target(bad)


def test_cross_check_names_the_agents_view_or_says_it_could_not():
    ex = explain_connection(IMAGE, Client("web", "web-client"), CHECKOUT)
    routes = [{"kind": "HTTPRoute", "namespace": "web", "name": "checkout-canary", "parents": [
        {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"},
                        {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs"}]}]}]
    assert cross_check(ex, routes, "U").endswith("HTTPRoute web/checkout-canary: Accepted=True, ResolvedRefs=True")
    assert "does not list" in cross_check(ex, [], "U")
    assert cross_check(ex, None, "U", "connection refused").startswith("could not reach the agent at U")


def test_cli_errors_are_one_line_with_a_hint(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "agent", "explain", "--from", "web/web-client",
                           "--to", "10.96.10.10:80", "--bpffs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no meshlet maps pinned" in done.stderr and "hint" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "agent", "explain", "--from", "web",
                          "--to", "10.96.10.10:80"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "NAMESPACE/POD" in bad.stderr and bad.stderr.count("\n") == 1


def test_the_command_finds_the_pods_cgroup_through_the_agents_status_pods():
    # The production lookup (agent.explain.agent_pod_cgroups) against a real listener: the pod
    # is then known by its cgroup, so its opt-out is seen; an unknown pod falls back to its namespace.
    from agent.explain import agent_pod_cgroups, explain_text
    from agent.runtime.health import Health
    from agent.runtime.http import Listener, PodBoard, RouteStatusBoard
    from agent.runtime.metrics import Metrics

    pods = PodBoard()
    pods.publish([{"namespace": "web", "name": "sidecar-pod", "uid": "uid-skip", "cgroup_id": 1002}])
    health = Health(30, 3, unapplied_since=lambda: None, waiting_for=lambda: [])
    listener = Listener(("127.0.0.1", 0), health, Metrics(), RouteStatusBoard(), pods)
    listener.start()
    try:
        url = f"http://127.0.0.1:{listener.address[1]}"
        lookup = agent_pod_cgroups(url)
        skip = explain_text(lambda: IMAGE, "web/sidecar-pod", "10.96.10.10:80", lookup, url)
        assert skip.verdict.startswith("untouched: the client opted out")
        other = explain_text(lambda: IMAGE, "web/web-client", "10.96.10.10:80", lookup, url)
        assert other.scope == "web" and "cgroup is unknown" in other.client_note
        assert other.agent_note.startswith(f"agent at {url} does not list HTTPRoute web/checkout-canary")
    finally:
        listener.stop()


def test_explain_says_what_happens_to_existing_sockets_when_their_endpoint_goes():
    tcp = "\n".join(render(explain_connection(IMAGE, Client("batch", "batch-client"), CHECKOUT)))
    assert "existing  established connections keep their endpoint when it leaves (A14)" in tcp
    assert "--terminate-tcp=true" in tcp
    dns_key = GroupKey("kube-system", "dns", "dns", "UDP", 4)
    udp_state = DesiredState(
        frontends={FrontendKey("10.96.0.10", 53, "UDP"): FrontendState("kube-system", "dns", "dns",
                                                                       (WeightedGroup(1, dns_key),))},
        groups={dns_key: BackendGroup(dns_key, (Endpoint("10.244.3.10", 53),), Verdict.FORWARD)})
    ex = explain_connection(decode(plan(udp_state, {}).expand()), Client("batch", "batch-client"),
                            Target("10.96.0.10", 53, "UDP"))
    udp = "\n".join(render(ex))
    assert "existing  a connected UDP socket whose endpoint leaves" in udp and "picks again" in udp
    assert ex.as_json()["existing"] == ex.existing
    untouched = explain_connection(IMAGE, Client("batch", "batch-client"), Target("10.96.99.99", 80, "TCP"))
    assert "existing" not in "\n".join(render(untouched)), "nothing to say for a non-frontend"
