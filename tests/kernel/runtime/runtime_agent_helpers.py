"""Shared by the runtime's kernel tests: the agent as a subprocess, a connect loop in a pod.

Root only. Safety: the lab (agent.lab.pods) makes its own network namespaces (no route off the
machine) and its own cgroup subtree; the agent runs with `--cgroup-root` that subtree and its own
bpffs directory /sys/fs/bpf/meshlet-test-<random>, and attaches nowhere else. Every agent and
connect loop is stopped by its pid, and `meshlet uninstall` detaches and unpins, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CLUSTER_IP = "10.96.77.10"
NODE = "lab-node"
#: Compiling the BPF programs takes seconds; much more on a loaded CI machine.
READY_TIMEOUT = 120.0

#: A client that connects in a loop and prints one JSON line per connection: when it started,
#: and the pod that answered or the errno. It runs inside a lab pod until the test kills it.
CONNECT_LOOP = textwrap.dedent("""
    import errno, json, socket, sys, time
    addr, port, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while True:
        started = time.time()
        try:
            with socket.create_connection((addr, port), timeout=2) as sock:
                data = b""
                while True:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
            line = {"t": started, "peer": data.decode().strip() or None}
            if not line["peer"]:
                line = {"t": started, "error": "EOF"}
        except OSError as err:
            line = {"t": started, "error": errno.errorcode.get(err.errno or 0, type(err).__name__)}
        print(json.dumps(line), flush=True)
        time.sleep(pause)
""")


def manifests(endpoint_ips: list[str], service: str = "echo", cluster_ip: str = CLUSTER_IP, port: int = 80,
              protocol: str = "TCP", port_name: str = "http") -> str:
    """Namespace mesh, one Service there (target port 8080, the echo pods' port) and its slice."""
    endpoints = "\n".join(f"  - addresses: [{ip}]\n    conditions: {{ready: true}}" for ip in endpoint_ips)
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Namespace
        metadata: {{name: mesh}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: {service}, namespace: mesh}}
        spec:
          clusterIP: {cluster_ip}
          clusterIPs: [{cluster_ip}]
          ports: [{{name: {port_name}, port: {port}, protocol: {protocol}, targetPort: 8080}}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: {service}-1
          namespace: mesh
          labels: {{kubernetes.io/service-name: {service}}}
        addressType: IPv4
        ports: [{{name: {port_name}, port: 8080, protocol: {protocol}}}]
        endpoints:
        """) + endpoints + "\n"


def service(name: str, ip: str) -> dict:
    """A Service in mesh as the API server serves it: port http 80/TCP to target port 8080."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "mesh"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def endpoint_slice(service_name: str, ip: str) -> dict:
    """The one EndpointSlice of `service` with one ready endpoint."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "mesh",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


def write_atomically(path, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class AgentProcess:
    """`meshlet run` as a subprocess of the test (stopped by its pid); `source` is
    ["--manifests", DIR] or ["--kubeconfig", FILE]; `env` is added to the test's environment."""

    def __init__(self, source: list[str], cgroup_root: str, bpffs: str, log_path, extra: list[str] = (),
                 env: dict | None = None, cwd: str = REPO):
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "agent", "run", *source,
                     "--cgroup-root", cgroup_root, "--bpffs", bpffs, "--listen", "127.0.0.1:0",
                     "--node-name", NODE, *extra]
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})})
        self.address: str | None = None

    def log_text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_listening(self, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            found = re.findall(r"event=http\.listening address=(\S+)", self.log_text())
            if found:
                self.address = found[-1]
                return self.address
            time.sleep(0.05)
        raise AssertionError(f"agent did not listen within {timeout}s:\n{self.log_text()[-3000:]}")

    def get(self, path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=2) as resp:
                body = resp.read().decode()
                code = resp.status
        except urllib.error.HTTPError as err:
            body, code = err.read().decode(), err.code
        try:
            return code, json.loads(body)
        except ValueError:
            return code, body

    def wait_until(self, predicate, what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"agent: {what} not reached within {timeout}s:\n{self.log_text()[-3000:]}")

    def wait_ready(self) -> None:
        self.wait_listening()
        self.wait_until(lambda: self.get("/readyz")[0] == 200, "/readyz 200")

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class ConnectLoop:
    """CONNECT_LOOP running in a pod; `lines()` parses what it printed so far."""

    def __init__(self, pod, out_path, pause: float = 0.02, address: str = CLUSTER_IP, port: int = 80):
        self.out_path = out_path
        self._out = open(out_path, "w")
        self.proc = pod.popen([sys.executable, "-c", CONNECT_LOOP, address, str(port), str(pause)],
                              stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    def lines(self) -> list[dict]:
        with open(self.out_path) as f:
            return [json.loads(line) for line in f if line.startswith("{") and line.endswith("}\n")]

    def switched_to(self, peer: str, since: float, then: int = 20, timeout: float = 30.0) -> list[dict]:
        """The lines started after `since`, once `then` more connections followed the first one
        that reached `peer` (polling with a generous deadline: how fast a change arrives is the
        benchmark's event-to-map row, not a test's bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [line for line in self.lines() if line["t"] > since]
            reached = [i for i, line in enumerate(after) if line.get("peer") == peer]
            if reached and len(after) - reached[0] > then:
                return after
            time.sleep(0.05)
        raise AssertionError(f"new connections did not reach {peer} within {timeout}s: {self.lines()[-5:]}")

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
