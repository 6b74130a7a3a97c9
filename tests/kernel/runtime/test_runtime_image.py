"""The image, run as shipped: daemonset/daemonset.yaml's containers under podman, with real traffic.

Root only (marked `kernel`). `scripts/image.sh` builds the image (cached: seconds when nothing
changed; a fresh machine makes the Debian base once). Then, from that image, the DaemonSet's
`node-init` and `agent` containers run EXACTLY as the manifest specifies them: security context
(privileged or not, user, capabilities, read-only root), volume mounts with their propagation,
arguments with $(VAR) expansion, environment from the downward API and the memory limit are read
from the manifest and mapped onto podman's flags (tests/podman_daemonset.py), never restated
here. What the kubelet adds is added as it would: the API server's address and the
ServiceAccount's token and CA. Only the node's paths are replaced: the host cgroup2 root by the
lab's cgroup subtree, the node's /sys/fs/bpf by a directory of our own in bpffs.

The API server is the stand-in (tests/standin_apiserver.py) over HTTPS, enforcing
daemonset/rbac.yaml for the agent's ServiceAccount. Lab pods connect to a Service in a loop
(tests/kernel/runtime/runtime_agent_helpers.ConnectLoop); a user would check that connections
follow the Service, then a producer route, then a consumer route (for its namespace only); that
`podman stop`, `podman kill` and `podman start` of the agent fail no connection; and that the
uninstall DaemonSet's container, from the same image, detaches everything.

Safety: the lab's own netns and cgroup subtree; containers named meshlet-test-*, removed by name
(`podman rm -f`) at the end, also on failure, then `meshlet uninstall` on our bpffs directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from podman_daemonset import container, daemonset, podman_run_args
from runtime_agent_helpers import CLUSTER_IP, REPO, ConnectLoop, endpoint_slice, service
from standin_apiserver import StandInApiServer
from standin_rbac import Policy

from agent.lab.pods import Lab, unique_lab_name
from agent.model import CONTROLLER_NAME

pytestmark = pytest.mark.kernel

DAEMONSET = Path(REPO) / "daemonset" / "daemonset.yaml"
UNINSTALL = Path(REPO) / "daemonset" / "uninstall" / "daemonset.yaml"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": f"{REPO}/image/containers.conf"}
NODE = "lab-node"
BUILD_TIMEOUT = 1500  #: a fresh machine makes the Debian base and pip-installs the dependencies
READY_TIMEOUT = 180.0  #: the agent compiles its programs with bcc at each start
PORT_TIMEOUT = 900.0  #: for another run of this test on the machine to finish with the port


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image() -> str:
    done = subprocess.run(["bash", f"{REPO}/scripts/image.sh"], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, f"make image failed:\n{done.stderr[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lab():
    with Lab(unique_lab_name("img")) as lab:
        lab.add_pod("default", "client", echo_ports=())
        lab.add_pod("other", "client", echo_ports=())
        for name in ("echo-a", "echo-b", "echo-c"):
            lab.add_pod("mesh", name)
        yield lab


@pytest.fixture
def tls(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "apiserver.crt", tmp_path / "apiserver.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=standin-apiserver", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture
def node(lab, tmp_path):
    """Our stand-in for the node's /sys/fs/bpf, the container names, and cleanup of both."""
    bpffs = f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:10]}"
    os.makedirs(bpffs)
    names = {c: f"meshlet-test-{c}-{uuid.uuid4().hex[:8]}" for c in ("node-init", "agent", "uninstall")}
    loops: list[ConnectLoop] = []
    podman_parents_before = set(podman_cgroup_parents())
    try:
        yield bpffs, names, loops
    finally:
        for loop in loops:
            loop.stop()
        for name in names.values():
            podman("rm", "--force", "--time", "5", name, check=False)
        agent_bpffs = os.path.join(bpffs, "meshlet")
        subprocess.run([sys.executable, "-m", "agent", "uninstall", "--bpffs", agent_bpffs,
                        "--cgroup-root", lab.cgroup_root], cwd=REPO, capture_output=True, timeout=60)
        shutil.rmtree(bpffs, ignore_errors=True)
        # podman (cgroupfs manager) makes its parent cgroup (and conmon's below it) in every
        # hierarchy and leaves them: remove the ones this test made, deepest first (rmdir refuses
        # a cgroup still in use, so nothing in use goes).
        for parent in set(podman_cgroup_parents()) - podman_parents_before:
            for below, _, _ in sorted(os.walk(parent), key=lambda entry: -len(entry[0])):
                try:
                    os.rmdir(below)
                except OSError:
                    pass


def podman_cgroup_parents() -> list[str]:
    """podman's parent cgroup (cgroupfs manager) in each mounted hierarchy, where it exists."""
    return [str(p) for p in Path("/sys/fs/cgroup").glob("*/libpod_parent")] + \
        [str(p) for p in Path("/sys/fs/cgroup").glob("libpod_parent")]


# --- the cluster's objects -------------------------------------------------------------------------

def route(namespace: str, name: str, backend: str) -> dict:
    """An HTTPRoute on mesh/echo: a producer route in mesh, a consumer route elsewhere (GAMMA)."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "namespace": "mesh", "port": 80}],
                     "rules": [{"backendRefs": [{"name": backend, "namespace": "mesh", "port": 80}]}]}}


def pod_object(pod) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
            "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "lab"}]},
            "status": {"phase": "Running", "podIP": pod.ipv4, "podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}]}}


def populate(api: StandInApiServer, lab) -> None:
    api.serve_crd("HTTPRoute")
    for namespace in ("default", "other", "mesh", "meshlet-system"):
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    for pod in lab.pods.values():
        api.create(pod_object(pod))
    api.create(service("echo", CLUSTER_IP))
    api.create(endpoint_slice("echo", lab.pods["mesh/echo-a"].ipv4))
    for index, backend in enumerate(("echo-b", "echo-c"), start=11):
        api.create(service(backend, f"10.96.77.{index}"))
        api.create(endpoint_slice(backend, lab.pods[f"mesh/{backend}"].ipv4))
    # ReferenceGrant-free: the consumer route's backends are in the Service's namespace (mesh).


# --- helpers ---------------------------------------------------------------------------------------

def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def wait(predicate, what: str, timeout: float, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s\n{diagnose()}")


def port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


def peers_since(loop: ConnectLoop, since: float) -> list:
    return [line.get("peer") or line.get("error") for line in loop.lines() if line["t"] > since]


def settled_on(loop: ConnectLoop, peer: str, since: float):
    """True once the last five connections started after `since` all reached `peer`."""
    recent = peers_since(loop, since)[-5:]
    return len(recent) == 5 and set(recent) == {peer}


# --- the test --------------------------------------------------------------------------------------

def test_the_image_runs_as_the_daemonset_specifies(image, lab, node, tls, tmp_path):
    bpffs, names, loops = node
    ds = daemonset(DAEMONSET)
    namespace = ds["metadata"]["namespace"]
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    policy = Policy.from_manifest((Path(REPO) / "daemonset" / "rbac.yaml").read_text(), namespace, account)
    token = f"token-{uuid.uuid4().hex}"
    with StandInApiServer(rbac=policy, token=token, tls=tls) as api:
        populate(api, lab)
        # What the kubelet gives every pod with a ServiceAccount: the API server's address, and
        # the token, CA and namespace files (automountServiceAccountToken).
        secrets = tmp_path / "serviceaccount"
        secrets.mkdir()
        (secrets / "token").write_text(token)
        shutil.copy(tls[0], secrets / "ca.crt")
        (secrets / "namespace").write_text(namespace)
        port = api.url.rsplit(":", 1)[1]
        kubelet_env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        kubelet_mounts = [f"{secrets}:/var/run/secrets/kubernetes.io/serviceaccount:ro"]
        host_paths = {"/sys/fs/bpf": bpffs, "/sys/fs/cgroup": lab.cgroup_root}
        downward = {"spec.nodeName": NODE, "metadata.namespace": namespace}

        def run_args(ds_: dict, name: str, ctr_name: str, kubelet: bool = True) -> list[str]:
            automount = ds_["spec"]["template"]["spec"].get("automountServiceAccountToken", True)
            return ["run", "--name", name, *podman_run_args(
                ds_, container(ds_, ctr_name), image, host_paths, downward,
                kubelet_env if kubelet and automount else {}, kubelet_mounts if kubelet and automount else [])]

        # node-init: runs to completion first, as an init container.
        done = podman(*run_args(ds, names["node-init"], "node-init"), timeout=120, check=False)
        assert done.returncode == 0, f"node-init failed:\n{done.stdout}{done.stderr}"
        assert "node-init: bpffs on /sys/fs/bpf, cgroup2 root at /run/meshlet/cgroup" in done.stdout

        # The agent. Its listener is the manifest's fixed host port: another run of this test on
        # the machine (a second checkout) must be done with it first.
        listen = next(a for a in container(ds, "agent")["args"] if a.startswith("--listen=")).split("=", 1)[1]
        wait(lambda: port_free(listen), f"{listen} free (another agent container listens there)", PORT_TIMEOUT)
        agent_args = run_args(ds, names["agent"], "agent")
        podman(*agent_args[:1], "--detach", *agent_args[1:])
        base = f"http://{listen}"

        def logs() -> str:
            done = podman("logs", names["agent"], check=False)
            return (done.stdout + done.stderr)[-4000:]

        def ready() -> bool:
            state = podman("inspect", "--format", "{{.State.Status}}", names["agent"], check=False).stdout.strip()
            assert state == "running", f"the agent container is {state}:\n{logs()}"
            return get(f"{base}/readyz")[0] == 200

        wait(ready, "the agent container's /readyz", READY_TIMEOUT, logs)

        # The Service, then a producer route, then a consumer route for the default namespace.
        consumer = ConnectLoop(lab.pods["default/client"], tmp_path / "default.jsonl")
        loops.append(consumer)
        other = ConnectLoop(lab.pods["other/client"], tmp_path / "other.jsonl")
        loops.append(other)
        start = time.time()
        wait(lambda: settled_on(consumer, "echo-a", start) and settled_on(other, "echo-a", start),
             "both clients reach the Service's endpoint echo-a", 30, lambda: str(peers_since(consumer, start)[-10:]))
        start = time.time()
        api.create(route("mesh", "producer", "echo-b"))
        wait(lambda: settled_on(consumer, "echo-b", start) and settled_on(other, "echo-b", start),
             "both clients follow the producer route to echo-b", 30, lambda: str(peers_since(other, start)[-10:]))
        start = time.time()
        api.create(route("default", "consumer", "echo-c"))
        wait(lambda: settled_on(consumer, "echo-c", start), "the default namespace follows its consumer route",
             30, lambda: str(peers_since(consumer, start)[-10:]))
        assert set(peers_since(other, start)) == {"echo-b"}, "a consumer route changed another namespace"
        # The elected agent writes our status on the producer route (RBAC allowing it).
        wait(lambda: any(p.get("controllerName") == CONTROLLER_NAME for p in
                         ((api.get("HTTPRoute", "mesh", "producer") or {}).get("status") or {}).get("parents", [])),
             "the agent writes the producer route's status", 30, logs)

        # Stop (SIGTERM, then the grace period), kill (SIGKILL), start: no connection fails.
        start = time.time()
        grace = ds["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        podman("stop", "--time", str(grace), names["agent"], timeout=grace + 60)
        podman("start", names["agent"])
        wait(ready, "the agent's /readyz after podman stop and start", READY_TIMEOUT, logs)
        podman("kill", names["agent"])
        podman("start", names["agent"])
        wait(ready, "the agent's /readyz after podman kill and start", READY_TIMEOUT, logs)
        consumer.wait_for(len(consumer.lines()) + 20)
        for loop, peer in ((consumer, "echo-c"), (other, "echo-b")):
            seen = peers_since(loop, start)
            assert len(seen) > 20 and set(seen) == {peer}, f"across the restarts: {sorted(set(seen))}"

        # Uninstall: the agent DaemonSet goes first (README), then the uninstall DaemonSet's
        # container, from the same image, detaches and unpins.
        podman("stop", "--time", str(grace), names["agent"], timeout=grace + 60)
        uninstall = daemonset(UNINSTALL)
        init_name = uninstall["spec"]["template"]["spec"]["initContainers"][0]["name"]
        done = podman(*run_args(uninstall, names["uninstall"], init_name), timeout=180, check=False)
        assert done.returncode == 0, f"uninstall failed:\n{done.stdout}{done.stderr}"
        start = time.time()
        wait(lambda: len(peers_since(consumer, start)) >= 3 and "echo-c" not in peers_since(consumer, start)[-3:],
             "connections stop being translated after the uninstall", 30)
        assert all(p not in ("echo-a", "echo-b", "echo-c") for p in peers_since(consumer, start)[-3:])
        assert not os.listdir(bpffs) or not os.listdir(os.path.join(bpffs, "meshlet")), os.listdir(bpffs)
