"""kube-proxy's chain names and probabilities, against the concrete checks of BASELINES.md."""

from bench import iptables_rules, naming, nft_rules
from bench.synth import Service


def test_iptables_chain_names_match_kube_proxy():
    spn = naming.service_port_name("bench", "svc-00001", "p80")
    assert spn == "bench/svc-00001:p80"
    assert naming.iptables_service_chain(spn, "tcp") == "KUBE-SVC-36T36KX4FZGWUHUS"
    assert naming.iptables_endpoint_chain(spn, "tcp", "10.244.0.1:8080") == "KUBE-SEP-VOIHXV4PYR66WOVG"


def test_unnamed_port_uses_namespace_and_name_only():
    assert naming.service_port_name("ns", "web", "") == "ns/web"


def test_nft_chain_names_match_kube_proxy():
    name = naming.nft_service_name("bench", "svc-00001", "tcp", "p80")
    assert naming.nft_chain("service-", name) == "service-64MF4EB6-bench/svc-00001/tcp/p80"
    ep = naming.nft_endpoint_name(name, "10.244.0.1", 8080)
    assert naming.nft_chain("endpoint-", ep) == "endpoint-O2K3SIWJ-bench/svc-00001/tcp/p80__10.244.0.1/8080"


def test_long_nft_chain_names_are_cut_to_240_with_an_ellipsis():
    chain = naming.nft_chain("service-", "ns/" + "x" * 300 + "/tcp/p")
    assert len(chain) == 240 and chain.endswith("...")
    assert naming.nft_chain("service-", "ns/short/tcp/p").endswith("ns/short/tcp/p")


def test_probabilities_for_three_endpoints():
    assert [naming.statistic_probability(j, 3) for j in range(2)] == ["0.3333333333", "0.5000000000"]


def test_generators_use_the_same_names():
    svc = Service(index=1, vip="10.96.0.2", endpoints=("10.244.0.1", "10.244.0.2", "10.244.0.3"), protocols=("tcp",))
    assert iptables_rules.service_chain(svc, "tcp") == "KUBE-SVC-36T36KX4FZGWUHUS"
    assert iptables_rules.endpoint_chains(svc, "tcp")[0] == "KUBE-SEP-VOIHXV4PYR66WOVG"
    assert nft_rules.service_chain(svc, "tcp") == "service-64MF4EB6-bench/svc-00001/tcp/p80"
    assert nft_rules.endpoint_chain(svc, "tcp", "10.244.0.1") == (
        "endpoint-O2K3SIWJ-bench/svc-00001/tcp/p80__10.244.0.1/8080"
    )
