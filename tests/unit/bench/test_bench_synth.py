"""The synthetic Services, their DesiredState, and the percentile helper."""

from agent.model import Verdict
from bench import stats
from bench.synth import desired_state, make_services, with_endpoint_replaced


def test_services_have_k_distinct_sorted_endpoints_even_when_the_pool_wraps():
    services = make_services(50_000, 10)
    assert services[-1].vip == "10.96.195.80"
    for svc in (services[0], services[6553], services[49_999]):
        assert len(set(svc.endpoints)) == 10
        assert list(svc.endpoints) == sorted(svc.endpoints, key=lambda ip: f"{ip}:8080")
    assert sum("udp" in s.protocols for s in services) == 5000


def test_endpoint_change_swaps_exactly_one_endpoint():
    svc = make_services(40, 10)[33]
    for generation in range(20):
        new = with_endpoint_replaced(svc, generation)
        assert len(set(new.endpoints)) == 10
        assert len(set(svc.endpoints) - set(new.endpoints)) == 1


def test_desired_state_has_one_frontend_and_group_per_port():
    services = make_services(20, 3)
    state = desired_state(services)
    assert len(state.frontends) == 20 + 2  # udp twins at index 0 and 10
    assert len(state.groups) == 22
    for fe in state.frontends.values():
        (share,) = fe.split
        group = state.groups[share.group]
        assert group.verdict is Verdict.FORWARD and len(group.endpoints) == 3
        assert list(group.endpoints) == sorted(group.endpoints)


def test_percentiles():
    summary = stats.summarize_ns(list(range(1000, 101_001, 1000)))  # 1..101 us
    assert summary["p50"] == 51.0 and summary["p01"] == 2.0 and summary["count"] == 101
    assert stats.summarize_ns([]) == {"count": 0}
