"""The demo's core, short form: a real `meshlet run` on a lab, real connections from client pods.

Root, bcc and cgroup BPF (marked `kernel`). The demo attaches only to its lab's cgroup subtree,
uses its own bpffs directory, and removes everything; this test checks that too.
"""

import os

import pytest

from agent.lab.demo import AFTER_EDIT, BEFORE_EDIT, run_demo
from agent.lab.pods import NETNS_DIR, cgroup2_mount

pytestmark = pytest.mark.kernel


def test_demo_short_shows_the_split_the_consumer_override_and_affinity():
    lines = []
    result = run_demo(short=True, say=lines.append)
    checks = result.checks
    by = {(c.step, c.probe.client, c.probe.service): c for c in checks}
    assert len(by) == len(BEFORE_EDIT) + len(AFTER_EDIT), "every probe ran once"
    failed = ["\n".join(lines)] if not all(c.ok for c in checks) else []
    assert not failed, failed[0]

    split = by["before the edit", BEFORE_EDIT[0].client, BEFORE_EDIT[0].service]
    assert 0.65 < split.share("shop/checkout-v1") < 0.95  # 80/20 (within the demo's tolerance)
    override = by["before the edit", BEFORE_EDIT[1].client, BEFORE_EDIT[1].service]
    assert override.share("shop/checkout-v2") == 1.0  # the consumer route, web only
    refused = by["before the edit", BEFORE_EDIT[4].client, BEFORE_EDIT[4].service]
    assert refused.share("error ECONNREFUSED") == 1.0  # no endpoints: refused (A9)
    for probe in BEFORE_EDIT[2:4]:
        (row,) = by["before the edit", probe.client, probe.service].rows  # affinity: a single pod took them all
        assert row.share == 1.0 and row.bucket.startswith("shop/cart-")
    moved = by["after the edit", AFTER_EDIT[0].client, AFTER_EDIT[0].service]
    assert 0.3 < moved.share("shop/checkout-v1") < 0.7  # 50/50 after the live edit
    assert by["after the edit", AFTER_EDIT[1].client, AFTER_EDIT[1].service].share("shop/checkout-v2") == 1.0

    # explain, on the live pins: web sees its consumer route, batch the producer's 80/20
    web = result.explanations["web/web-client", "shop/checkout"]
    batch = result.explanations["batch/batch-client", "shop/checkout"]
    legacy = result.explanations["batch/batch-client", "shop/legacy"]
    assert legacy.verdict == "reject 100% with ECONNREFUSED"
    assert web.scope == "web" and web.route == "HTTPRoute web/checkout-canary rule 0"
    assert [round(g.share, 3) for g in web.groups] == [1.0]
    assert batch.scope == "default" and batch.route == "HTTPRoute shop/checkout-split rule 0"
    assert [round(g.share, 3) for g in batch.groups] == [0.8, 0.2]
    assert "Accepted=True" in web.agent_note

    assert [n for n in os.listdir(NETNS_DIR) if n.startswith("meshlet-demo")] == []
    assert [d for d in os.listdir(cgroup2_mount()) if d.startswith("meshlet-lab-demo")] == []
    assert [d for d in os.listdir("/sys/fs/bpf") if d.startswith("meshlet-demo-")] == []
