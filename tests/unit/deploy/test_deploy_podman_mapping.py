"""The DaemonSet -> `podman run` mapping the image test relies on (tests/podman_daemonset.py).

The image test runs the shipped image with these flags, so the mapping must carry every setting
of the manifest that changes what the container may do, and refuse what it does not know.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from podman_daemonset import container, daemonset, podman_run_args

REPO = Path(__file__).resolve().parents[3]
DS = daemonset(REPO / "daemonset" / "daemonset.yaml")
HOST_PATHS = {"/sys/fs/bpf": "/sys/fs/bpf/meshlet-test-x", "/sys/fs/cgroup": "/sys/fs/cgroup/lab"}
DOWNWARD = {"spec.nodeName": "n1", "metadata.namespace": "meshlet-system"}


def flags(ds: dict, name: str) -> list[str]:
    return podman_run_args(ds, container(ds, name), "img", HOST_PATHS, DOWNWARD, {"K": "v"}, ["/s:/secrets:ro"])


def test_the_agent_gets_its_capabilities_read_only_root_mounts_env_and_args():
    args = flags(DS, "agent")
    agent = container(DS, "agent")
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and "--cap-drop=all" in args
    assert [a for a in args if a.startswith("--cap-add=")] == [f"--cap-add=CAP_{c}" for c in caps["add"]]
    assert "--privileged" not in args and ["--user", "0"] == args[args.index("--user"):args.index("--user") + 2]
    assert "--read-only" in args and "--read-only-tmpfs=false" in args and "--network=host" in args
    volumes = [args[i + 1] for i, a in enumerate(args) if a == "--volume"]
    assert "/sys/fs/bpf/meshlet-test-x:/sys/fs/bpf:rw,rslave" in volumes
    assert "/sys/fs/cgroup/lab:/run/meshlet/cgroup:ro,rprivate" in volumes
    assert "/lib/modules:/lib/modules:ro,rprivate" in volumes and "/s:/secrets:ro" in volumes
    assert "--tmpfs" in args and args[args.index("--tmpfs") + 1] == f"/tmp:rw,size={64 * 2**20}"
    assert {"NODE_NAME=n1", "POD_NAMESPACE=meshlet-system", "K=v"} <= {args[i + 1] for i, a in enumerate(args) if a == "--env"}
    image_at = args.index("img")
    assert args[image_at + 1:] == [a.replace("$(NODE_NAME)", "n1") for a in agent["args"]]
    assert "--node-name=n1" in args[image_at + 1:]


def test_node_init_is_privileged_with_bidirectional_bpffs():
    args = flags(DS, "node-init")
    assert "--privileged" in args
    assert "/sys/fs/bpf/meshlet-test-x:/sys/fs/bpf:rw,rshared" in [args[i + 1] for i, a in enumerate(args) if a == "--volume"]


def test_a_capability_removed_from_the_manifest_is_removed_from_the_container():
    ds = copy.deepcopy(DS)
    container(ds, "agent")["securityContext"]["capabilities"]["add"].remove("SYS_ADMIN")
    assert "--cap-add=CAP_SYS_ADMIN" not in flags(ds, "agent")


@pytest.mark.parametrize("change", [
    lambda c: c["securityContext"].update(procMount="Unmasked"),
    lambda c: c["env"].append({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}),
    lambda c: c["volumeMounts"].append({"name": "cfg", "mountPath": "/cfg"}),
])
def test_what_the_mapping_does_not_know_fails_instead_of_being_dropped(change):
    ds = copy.deepcopy(DS)
    ds["spec"]["template"]["spec"]["volumes"].append({"name": "cfg", "configMap": {"name": "x"}})
    change(container(ds, "agent"))
    with pytest.raises(AssertionError):
        flags(ds, "agent")
