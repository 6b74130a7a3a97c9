"""daemonset/ against the Kubernetes schemas and against the agent's real CLI, sources and listener.

Offline: kubernetes-validate checks every manifest against the OpenAPI schemas of one Kubernetes
version (strict: unknown fields fail). The rest reads the manifests and compares them with what
the code actually does: the click commands' options (agent.runtime.cli.run,
agent.datapath.cli.uninstall), the kinds the sources list and watch (agent.sources), the Lease
the elector writes (agent.runtime.leader), and the paths the listener answers (a real Listener
on a free loopback port). A flag renamed in the CLI or a kind added to a source fails here.
"""

from __future__ import annotations

import shlex
import urllib.error
import urllib.request
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

from agent.datapath.cli import uninstall as uninstall_command
from agent.runtime.cli import run as run_command
from agent.runtime.settings import parse_listen

DAEMONSET_DIR = Path(__file__).resolve().parents[3] / "daemonset"
KUBERNETES_VERSION = "1.30"  #: the oldest release we support with Gateway API GAMMA routes


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in DAEMONSET_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[dict]:
    return [doc for path in manifest_files() for doc in documents(path)]


def one(kind: str, name: str) -> dict:
    (found,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(pod_spec: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec.get("initContainers", []) + pod_spec["containers"] if c["name"] == name]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """--name=value arguments as {--name: value}; every flag in the manifests uses the = form."""
    out = {}
    for arg in args[1:]:
        assert arg.startswith("--") and "=" in arg, f"write flags as --name=value: {arg}"
        name, value = arg.split("=", 1)
        out[name] = value
    return out


def options_of(command: click.Command) -> set[str]:
    return {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}


def agent_pod() -> dict:
    return one("DaemonSet", "meshlet")["spec"]["template"]["spec"]


def mount_path_of(ctr: dict, volume: str) -> dict:
    (found,) = [m for m in ctr["volumeMounts"] if m["name"] == volume]
    return found


def host_path_of(pod_spec: dict, volume: str) -> str:
    (found,) = [v for v in pod_spec["volumes"] if v["name"] == volume]
    return found["hostPath"]["path"]


def volume_under(pod_spec: dict, ctr: dict, path: str) -> tuple[str, str]:
    """(volume, host path) of the mount that holds `path` in the container."""
    best = max((m for m in ctr["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")),
               key=lambda m: len(m["mountPath"]), default=None)
    assert best is not None, f"{path} is not on any volume of {ctr['name']}"
    return best["name"], host_path_of(pod_spec, best["name"])


# --- schemas and kustomize -------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DAEMONSET_DIR)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", sorted(DAEMONSET_DIR.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.parent.relative_to(DAEMONSET_DIR.parent)))
def test_each_kustomization_lists_exactly_the_manifests_beside_it(kustomization):
    listed = documents(kustomization)[0]["resources"]
    beside = sorted(p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == beside


def test_every_namespaced_object_is_in_the_agent_namespace():
    namespaced = [o for o in objects() if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"meshlet-system"}
    assert one("Namespace", "meshlet-system")


# --- flags against the real CLI --------------------------------------------------------------------


def test_agent_args_are_options_of_the_real_run_command():
    agent = container(agent_pod(), "agent")
    assert agent["args"][0] == "run"
    unknown = set(flags(agent["args"])) - options_of(run_command)
    assert not unknown, f"not options of `meshlet run`: {unknown}"


def test_uninstall_args_are_options_of_the_real_uninstall_command():
    pod = one("DaemonSet", "meshlet-uninstall")["spec"]["template"]["spec"]
    ctr = container(pod, "uninstall")
    assert ctr["args"][0] == "uninstall"
    unknown = set(flags(ctr["args"])) - options_of(uninstall_command)
    assert not unknown, f"not options of `meshlet uninstall`: {unknown}"


def test_uninstall_removes_what_the_agent_made():
    agent = flags(container(agent_pod(), "agent")["args"])
    pod = one("DaemonSet", "meshlet-uninstall")["spec"]["template"]["spec"]
    ctr = container(pod, "uninstall")
    undo = flags(ctr["args"])
    assert undo["--bpffs"] == agent["--bpffs"] and undo["--cgroup-root"] == agent["--cgroup-root"]
    # ... and they are the same host directories in both pods.
    for flag in ("--bpffs", "--cgroup-root"):
        assert volume_under(pod, ctr, undo[flag])[1] == volume_under(agent_pod(), container(agent_pod(), "agent"),
                                                                      agent[flag])[1]


def test_node_name_comes_from_the_downward_api():
    agent = container(agent_pod(), "agent")
    assert flags(agent["args"])["--node-name"] == "$(NODE_NAME)"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


# --- mounts --------------------------------------------------------------------------------------


def test_bpffs_is_the_hosts_and_reaches_the_host_from_node_init():
    pod = agent_pod()
    agent, init = container(pod, "agent"), container(pod, "node-init")
    bpffs = flags(agent["args"])["--bpffs"]
    assert volume_under(pod, agent, bpffs) == ("bpffs", "/sys/fs/bpf")
    assert mount_path_of(agent, "bpffs")["mountPropagation"] == "HostToContainer"
    init_mount = mount_path_of(init, "bpffs")
    assert init_mount["mountPropagation"] == "Bidirectional"
    assert init["securityContext"]["privileged"] is True  # the API requires it for Bidirectional
    assert flags(init["args"])["--bpffs-mount"] == init_mount["mountPath"]


def test_cgroup_root_is_the_hosts_cgroup2_root():
    pod = agent_pod()
    agent, init = container(pod, "agent"), container(pod, "node-init")
    root = flags(agent["args"])["--cgroup-root"]
    # The mount itself, not a directory below it: the programs attach to the host's root.
    assert mount_path_of(agent, "host-cgroup")["mountPath"] == root
    assert host_path_of(pod, "host-cgroup") == "/sys/fs/cgroup"
    assert flags(init["args"])["--cgroup-root"] == root == mount_path_of(init, "host-cgroup")["mountPath"]


def test_kernel_headers_are_mounted_read_only_at_the_node_paths():
    pod = agent_pod()
    agent = container(pod, "agent")
    for volume, path in (("lib-modules", "/lib/modules"), ("usr-src", "/usr/src")):
        mount = mount_path_of(agent, volume)
        assert (mount["mountPath"], mount.get("readOnly"), host_path_of(pod, volume)) == (path, True, path)


# --- probes against the real listener ------------------------------------------------------------


def test_probes_reach_the_listen_address_over_the_host_network():
    pod = agent_pod()
    agent = container(pod, "agent")
    host, port = parse_listen(flags(agent["args"])["--listen"])
    assert pod["hostNetwork"] is True  # the kubelet (host netns) reaches 127.0.0.1 only then
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"]) == (host, port), probe
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_real_listener_answers_the_probe_paths():
    from agent.runtime.health import Health
    from agent.runtime.http import Listener, RouteStatusBoard
    from agent.runtime.metrics import Metrics

    agent = container(agent_pod(), "agent")
    listener = Listener(("127.0.0.1", 0), Health(60.0, 3), Metrics(), RouteStatusBoard())
    listener.start()
    try:
        host, port = listener.address
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = agent[probe]["httpGet"]["path"]
            try:
                status = urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5).status
            except urllib.error.HTTPError as err:
                status = err.code
            assert status in (200, 503), f"{probe} {path}: HTTP {status}"  # an answer, not a 404
    finally:
        listener.stop()


def test_the_listen_default_agrees_with_the_manifest():
    """The manifest spells the default out; if the CLI's default moves, this notices."""
    (listen,) = [p for p in run_command.params if p.name == "listen"]
    assert flags(container(agent_pod(), "agent")["args"])["--listen"] == listen.default


# --- RBAC: exactly what the code uses ------------------------------------------------------------


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for r in rules for group in r["apiGroups"]
            for resource in r["resources"] for verb in r["verbs"]}


def test_cluster_role_grants_exactly_what_the_sources_and_status_writer_use():
    from agent.sources.kube import core_kinds
    from agent.sources.kubeapi import GATEWAY_GROUP, ROUTE_PLURALS

    read = {(k.group, k.plural) for k in core_kinds("any-node").values()}
    read |= {(GATEWAY_GROUP, plural) for plural in ROUTE_PLURALS.values()}
    want = {(g, r, v) for g, r in read for v in ("get", "list", "watch")}
    want |= {(GATEWAY_GROUP, f"{plural}/status", v) for plural in ROUTE_PLURALS.values() for v in ("update", "patch")}
    assert granted(one("ClusterRole", "meshlet")["rules"]) == want


def test_leases_only_in_the_agent_namespace():
    from agent.runtime.leader import LEASES

    role = one("Role", "meshlet-leader-election")
    assert role["metadata"]["namespace"] == "meshlet-system"
    assert granted(role["rules"]) == {(LEASES.group, LEASES.plural, v)
                                      for v in ("get", "list", "watch", "create", "update")}


def test_bindings_bind_the_agents_service_account_and_nothing_else():
    sa = one("ServiceAccount", "meshlet")
    assert agent_pod()["serviceAccountName"] == sa["metadata"]["name"]
    for kind, role_kind, role in (("ClusterRoleBinding", "ClusterRole", "meshlet"),
                                  ("RoleBinding", "Role", "meshlet-leader-election")):
        binding = one(kind, role)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshlet", "namespace": "meshlet-system"}]
    roles = [o for o in objects() if o["kind"] in ("ClusterRole", "Role")]
    assert sorted(r["metadata"]["name"] for r in roles) == ["meshlet", "meshlet-leader-election"]
    uninstall = one("DaemonSet", "meshlet-uninstall")["spec"]["template"]["spec"]
    assert uninstall["automountServiceAccountToken"] is False


# --- scheduling and privileges -------------------------------------------------------------------


def test_runs_on_every_node_and_updates_one_node_at_a_time():
    ds = one("DaemonSet", "meshlet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_agent_has_its_listed_capabilities_and_no_privilege():
    agent = container(agent_pod(), "agent")
    ctx = agent["securityContext"]
    assert ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE",
                                                            "SYS_RESOURCE"]}
    assert agent["resources"]["requests"].keys() == {"cpu", "memory"}


def test_each_added_capability_has_a_comment_saying_why():
    text = (DAEMONSET_DIR / "daemonset.yaml").read_text().splitlines()
    for cap in container(agent_pod(), "agent")["securityContext"]["capabilities"]["add"]:
        (line,) = [i for i, line in enumerate(text) if line.strip() == f"- {cap}"]
        start = line
        while text[start - 1].strip().startswith("#"):
            start -= 1
        assert text[start].strip().startswith(f"# {cap}:"), f"no comment block above {cap} starting '# {cap}:'"


def test_pre_stop_leaves_the_datapath_alone():
    command = container(agent_pod(), "agent")["lifecycle"]["preStop"]["exec"]["command"]
    words = shlex.split(" ".join(command))
    assert "meshlet" not in words and "uninstall" not in words and "rm" not in words


def test_the_daemonset_sets_every_map_size_and_each_is_valid():
    from agent.datapath.layout import SIZED_MAPS
    from agent.runtime.settings import parse_map_sizes

    args = [arg.split("=", 1)[1] for arg in container(agent_pod(), "agent")["args"] if arg.startswith("--map-size=")]
    assert sorted(arg.split("=")[0] for arg in args) == sorted(SIZED_MAPS)
    parse_map_sizes(args)
