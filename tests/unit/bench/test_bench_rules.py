"""The iptables and nftables layouts the benchmark loads: structure, probabilities, partial syncs."""

import re
from fractions import Fraction

import pytest

from bench import iptables_rules, nft_rules
from bench.synth import Service, make_services, with_endpoint_replaced

SVC1 = Service(index=1, vip="10.96.0.2", endpoints=("10.244.0.1", "10.244.0.2", "10.244.0.3"), protocols=("tcp",))


def nat_lines(text: str) -> list[str]:
    return text.split("*nat\n", 1)[1].split("COMMIT", 1)[0].splitlines()


def chain_rules(text: str, chain: str) -> list[str]:
    return [line for line in nat_lines(text) if line.startswith(f"-A {chain} ")]


def test_iptables_service_layout_for_one_service():
    text = iptables_rules.full_restore([SVC1], large=False)
    svc = "KUBE-SVC-36T36KX4FZGWUHUS"
    assert (
        '-A KUBE-SERVICES -m comment --comment "bench/svc-00001:p80 cluster IP" -m tcp -p tcp '
        f"-d 10.96.0.2 --dport 80 -j {svc}"
    ) in nat_lines(text)
    rules = chain_rules(text, svc)
    assert rules[0].endswith("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ")
    assert rules[1] == (
        f'-A {svc} -m comment --comment "bench/svc-00001:p80 -> 10.244.0.1:8080" '
        "-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-VOIHXV4PYR66WOVG"
    )
    assert "--probability 0.5000000000" in rules[2]
    assert "statistic" not in rules[3]
    assert chain_rules(text, "KUBE-SEP-VOIHXV4PYR66WOVG") == [
        "-A KUBE-SEP-VOIHXV4PYR66WOVG -m comment --comment bench/svc-00001:p80 -s 10.244.0.1 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-VOIHXV4PYR66WOVG -m comment --comment bench/svc-00001:p80 -m tcp -p tcp "
        "-j DNAT --to-destination 10.244.0.1:8080",
    ]
    assert nat_lines(text)[-1].startswith('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports')


@pytest.mark.parametrize("k", [1, 2, 3, 7, 10])
def test_iptables_cascade_gives_every_endpoint_one_kth(k):
    svc = Service(index=0, vip="10.96.0.1", endpoints=tuple(f"10.244.1.{j + 1}" for j in range(k)), protocols=("tcp",))
    rules = chain_rules(iptables_rules.full_restore([svc], large=False), iptables_rules.service_chain(svc, "tcp"))[1:]
    assert len(rules) == k
    remaining, shares = Fraction(1), []
    for rule in rules:
        match = re.search(r"--probability (\S+)", rule)
        p = Fraction(match.group(1)) if match else Fraction(1)
        shares.append(remaining * p)
        remaining -= remaining * p
    assert remaining == 0
    assert all(abs(float(s) - 1 / k) < 1e-9 for s in shares)


def test_large_cluster_drops_comments_from_svc_to_sep_and_sep_rules_only():
    services = make_services(101, 10)  # 1010 endpoints + udp twins > 1000
    assert iptables_rules.is_large_cluster(services)
    assert not iptables_rules.is_large_cluster(make_services(10, 10))
    text = iptables_rules.full_restore(services)
    svc0 = services[0]
    chain = iptables_rules.service_chain(svc0, "tcp")
    rules = chain_rules(text, chain)
    assert "cluster IP" in rules[0]  # the masquerade rule keeps its comment
    assert all("comment" not in rule for rule in rules[1:])
    assert all("comment" not in r for r in chain_rules(text, iptables_rules.endpoint_chains(svc0, "tcp")[0]))
    assert all("comment" in r for r in chain_rules(text, "KUBE-SERVICES"))


def test_iptables_rule_counts_follow_the_scale_table():
    n, k = 50, 4
    services = [Service(i, f"10.96.0.{i + 1}", tuple(f"10.244.{i}.{j + 1}" for j in range(k)), ("tcp",)) for i in range(n)]
    text = iptables_rules.full_restore(services)
    lines = nat_lines(text)
    chains = [line for line in lines if line.startswith(":KUBE-SVC-") or line.startswith(":KUBE-SEP-")]
    per_service = [line for line in lines if line.startswith("-A KUBE-SVC-") or line.startswith("-A KUBE-SEP-")]
    services_rules = [line for line in lines if line.startswith("-A KUBE-SERVICES") and "nodeports" not in line]
    assert len(chains) == n * (1 + k)
    assert len(services_rules) == n
    assert len(per_service) == n * (1 + k + 2 * k)


def test_kube_services_follows_the_given_order():
    services = make_services(20, 3, udp_every=0)
    order = list(reversed(services))
    rules = [r for r in nat_lines(iptables_rules.full_restore(order)) if r.startswith("-A KUBE-SERVICES -m comment --comment \"bench")]
    assert [re.search(r"-d (\S+)", r).group(1) for r in rules] == [s.vip for s in order]


def test_iptables_partial_sync_rewrites_only_the_changed_service():
    services = make_services(30, 3, udp_every=0)
    old = services[7]
    new = with_endpoint_replaced(old, 0)
    order = [new if s is old else s for s in services]
    text = iptables_rules.partial_restore(order, old, new, large=False)
    assert "-I " not in text  # the jumps from built-in chains are installed once, by the full sync
    declared = {line[1:].split()[0] for line in nat_lines(text) if line.startswith(":")}
    assert {c for c in declared if c.startswith("KUBE-SVC-")} == {iptables_rules.service_chain(new, "tcp")}
    gone = set(iptables_rules.endpoint_chains(old, "tcp")) - set(iptables_rules.endpoint_chains(new, "tcp"))
    assert len(gone) == 1
    assert [line for line in nat_lines(text) if line.startswith("-X ")] == [f"-X {c}" for c in gone]
    assert gone <= declared  # flushed (declared) before it is deleted
    assert len([r for r in nat_lines(text) if r.startswith("-A KUBE-SERVICES")]) == 30 + 1


def test_nft_layout_declares_every_chain_before_naming_it():
    services = make_services(30, 3)
    text = nft_rules.full_ruleset(services, "10.250.0.1")
    declared = set()
    for line in text.splitlines():
        match = re.match(r"add chain ip kube-proxy (\S+)", line)
        if match:
            declared.add(match.group(1))
        for target in re.findall(r"(?:goto|jump) ([^\s,}]+)", line):
            assert target in declared, line


def test_nft_service_layout():
    text = nft_rules.full_ruleset([SVC1], "10.250.0.1")
    chain = "service-64MF4EB6-bench/svc-00001/tcp/p80"
    assert (f"add rule ip kube-proxy {chain} ip daddr 10.96.0.2 tcp dport 80 ip saddr != 10.244.0.0/16 "
            "jump mark-for-masquerade") in text
    assert f"add rule ip kube-proxy {chain} numgen random mod 3 vmap {{ 0 : goto endpoint-O2K3SIWJ-" in text
    ep = "endpoint-O2K3SIWJ-bench/svc-00001/tcp/p80__10.244.0.1/8080"
    assert f"add rule ip kube-proxy {ep} meta l4proto tcp dnat to 10.244.0.1:8080" in text
    assert f"add element ip kube-proxy service-ips {{ 10.96.0.2 . tcp . 80 : goto {chain} }}" in text
    assert "ip daddr { 10.96.0.0/16 } drop" in text
    assert "add element ip kube-proxy nodeport-ips { 10.250.0.1 }" in text


def test_nft_elements_are_batched():
    services = make_services(2500, 1, udp_every=0)
    text = nft_rules.full_ruleset(services, "10.250.0.1")
    batches = [line for line in text.splitlines() if line.startswith("add element ip kube-proxy service-ips")]
    assert len(batches) == 3
    assert sum(line.count(" : goto ") for line in batches) == 2500


def test_nft_partial_sync():
    old = make_services(5, 3, udp_every=0)[2]
    new = with_endpoint_replaced(old, 0)
    (gone,) = set(old.endpoints) - set(new.endpoints)
    (added,) = set(new.endpoints) - set(old.endpoints)
    lines = nft_rules.partial_ruleset(old, new).splitlines()
    gone_chain = nft_rules.endpoint_chain(old, "tcp", gone)
    assert lines[0] == f"add chain ip kube-proxy {nft_rules.endpoint_chain(new, 'tcp', added)}"
    assert f"flush chain ip kube-proxy {nft_rules.service_chain(new, 'tcp')}" in lines
    assert lines[-2:] == [f"flush chain ip kube-proxy {gone_chain}", f"delete chain ip kube-proxy {gone_chain}"]
    assert not any("element" in line for line in lines)
