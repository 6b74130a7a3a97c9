"""The kernel feature probe on this kernel, and the programs an older kernel gets, with real traffic.

Root only (marked `kernel`): see conftest.py for what is made and removed. The probe loads only
unpinned test programs and maps and attaches nothing. The older kernel's programs (no
bpf_set_retval, no getpeername hooks) are compiled here from a stand-in probe result, attached in
place of the session's behind the same pinned links, and the session's are put back afterwards.
"""

import os
import uuid

import pytest

from agent.datapath import Datapath, bpfsys, features, loader, uapi
from agent.errors import UserError

pytestmark = pytest.mark.kernel

EVERYTHING = {name: True for name in features.NAMES}
#: A stand-in probe result: what a Linux 5.7 kernel would answer.
LINUX_5_7 = {**EVERYTHING, "set_retval": False, "getpeername4": False, "getpeername6": False}
REJECTED_TCP, REJECTED_UDP, SERVED = "10.96.0.31", "10.96.0.32", "10.96.0.33"


def test_the_probe_finds_every_feature_on_this_kernel():
    found = features.probe()
    assert set(found) == set(features.NAMES)
    assert [name for name, present in found.items() if not present] == []
    support = features.decide(found)
    assert support.disabled == () and support.hooks == tuple(uapi.HOOKS)


def test_the_probe_answers_no_for_what_the_kernel_does_not_have():
    # So that "every feature found" above is the kernel's answer, not the probe's habit.
    assert features.hook_available(9999) is False
    assert features.helper_available(100_000) is False


def test_a_kernel_missing_a_required_feature_is_refused_before_anything_is_made(lab):
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UserError, match=r"lacks .*bpf links on cgroups .*Linux >= 5\.7"):
        Datapath.open(bpffs, lab.cgroup_root, kernel_features={**EVERYTHING, "cgroup_links": False})
    assert not os.path.exists(bpffs), "refused before compiling: no map was created"


def program_behind_links(bpffs: str) -> dict[str, int]:
    """hook -> id of the program its pinned link runs."""
    out = {}
    for hook in uapi.HOOKS:
        fd = bpfsys.obj_get(os.path.join(loader.links_dir(bpffs), hook))
        try:
            out[hook] = bpfsys.link_info(fd)[1]
        finally:
            os.close(fd)
    return out


def test_without_set_retval_a_rejection_fails_with_eperm_and_getpeername_links_are_left_alone(
        datapath, shares, client, lab, bpffs):
    web = shares.group("web", ["web-1"])
    dns = shares.group("dns", [], protocol="UDP")
    datapath.reconcile(shares.state({
        shares.fe(REJECTED_TCP, 80): shares.split(),  # no backendRefs: rejected
        shares.fe(REJECTED_UDP, 53, "UDP"): shares.split((1, dns), service="dns"),  # no endpoints
        shares.fe(SERVED, 80): shares.split((1, web)),
    }, [web, dns], shares.clients()), shares.cgroups())
    before = program_behind_links(bpffs)
    older = Datapath.open(bpffs, lab.cgroup_root, datapath.sizes, kernel_features=LINUX_5_7)
    try:
        loaded = tuple(h for h in uapi.HOOKS if not h.startswith("getpeername"))
        assert tuple(older.programs.fds) == loaded
        older.attach()
        after = program_behind_links(bpffs)
        assert all(after[h] != before[h] for h in loaded), "the older kernel's programs run"
        assert after["getpeername4"] == before["getpeername4"] and after["getpeername6"] == before["getpeername6"]

        rejected = datapath.counters()["rejected"]
        assert client.client("tcp", REJECTED_TCP, 80, 2)["errors"] == {"EPERM": 2}
        assert client.client("udp", REJECTED_UDP, 53, 2, "--unconnected")["errors"] == {"EPERM": 2}
        assert datapath.counters()["rejected"] - rejected == 4, "still counted as rejections"
        assert client.client("tcp", SERVED, 80, 2)["peers"] == {"web-1": 2}, "translation is unchanged"
    finally:
        datapath.attach()  # the session's programs, back behind the same links
        older.close()
    assert program_behind_links(bpffs) == before
    assert client.client("tcp", REJECTED_TCP, 80, 1)["errors"] == {"ECONNREFUSED": 1}
