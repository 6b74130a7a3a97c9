"""The real agent under a bench: `meshlet run` in Kubernetes mode against the stand-in API server.

Role: what the idle and churn rows share. `start_agent` serves `cluster` from the tests' stand-in
API server (tests/standin_apiserver.py: not Kubernetes, it speaks the list/watch protocol) on
loopback, starts `meshlet run` with a kubeconfig pointing at it, `--cgroup-root` and a bpffs
directory of the lab's, and waits for /readyz. Everything it starts is registered with the lab,
so it is stopped and removed at the lab's close, also on failure.

May touch: loopback, a bpffs directory under /sys/fs/bpf named after the lab's run id, `scratch`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.topology import Lab


@dataclass
class RunningAgent:
    proc: subprocess.Popen
    port: int
    log_path: Path
    apiserver: object  #: the stand-in API server holding the cluster (update() drives churn)

    def log_tail(self, lines: int = 3) -> str:
        return " / ".join(self.log_path.read_text().strip().splitlines()[-lines:])[-600:]

    def cpu_seconds(self) -> float:
        """utime + stime of the agent (all its threads), in seconds."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as answer:
            return answer.read().decode()


def start_agent(lab: Lab, scratch: Path, cluster: list[dict], cgroup_root: Path, purpose: str,
                ready_timeout: float = 300.0) -> RunningAgent | str:
    """The running agent once /readyz says 200, or a one-line reason it is not."""
    from agent.datapath import uninstall
    from bench import controlplane as cp

    bpffs = Path("/sys/fs/bpf") / f"meshlet-bench-{lab.run_id}-{purpose}"
    lab.on_close(f"meshlet pins in {bpffs}", lambda: uninstall(str(bpffs)))
    apiserver = cp._standin_apiserver(cluster)
    lab.on_close("the stand-in API server", apiserver.stop)
    port = cp._free_loopback_port()
    cmd = [cp.PYTHON, "-m", "agent", "run", "--kubeconfig",
           str(cp._kubeconfig(Path(scratch, "kubeconfig"), apiserver.url)), "--node-name", cp.NODE_NAME,
           "--cgroup-root", str(cgroup_root), "--bpffs", str(bpffs), "--listen", f"127.0.0.1:{port}"]
    log_path = Path(scratch, f"agent-{purpose}.log")
    with open(log_path, "w") as log:  # a file, not a pipe: a chatty agent must never block on us
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).resolve().parent.parent)
    lab.on_close(f"meshlet run pid {proc.pid}", lambda: cp._stop(proc))
    agent = RunningAgent(proc, port, log_path, apiserver)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return agent
        except OSError:
            pass
        time.sleep(0.05)
    return f"agent not ready: {agent.log_tail()}"


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics answer (0 when absent), e.g. sample(text, "x_count", mode="full")."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in metrics_text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def full_syncs(metrics_text: str) -> tuple[float, float]:
    """(count, seconds) of the agent's full reconciles so far (meshlet_sync_duration_seconds)."""
    name = "meshlet_sync_duration_seconds"
    return sample(metrics_text, f"{name}_count", mode="full"), sample(metrics_text, f"{name}_sum", mode="full")


def check_window(before: str, after: str) -> dict:
    """The agent's periodic map check between two /metrics answers: steps, their seconds, the
    bucket bound of the longest step (meshlet_map_check_step_seconds) and cycles completed."""
    name = "meshlet_map_check_step_seconds"
    b, a = histogram_buckets(before, name), histogram_buckets(after, name)
    delta = {le: a.get(le, 0) - b.get(le, 0) for le in sorted(a)}
    steps = delta.get(float("inf"), 0)
    longest = next((le for le, cumulative in delta.items() if cumulative >= steps), None) if steps else None
    return {"check_steps": int(steps),
            "check_step_s": round(sample(after, f"{name}_sum") - sample(before, f"{name}_sum"), 3),
            "check_step_max_le_ms": None if longest in (None, float("inf")) else longest * 1000,
            "check_cycles": int(sample(after, "meshlet_map_check_cycles_total")
                                - sample(before, "meshlet_map_check_cycles_total"))}


_BUCKET = re.compile(r'^(?P<name>\w+)_bucket\{le="(?P<le>[^"]+)"\} (?P<count>\S+)$')


def histogram_buckets(metrics_text: str, name: str) -> dict[float, float]:
    """Cumulative counts by upper bound (le) of one unlabelled histogram in a /metrics answer."""
    buckets = {}
    for line in metrics_text.splitlines():
        match = _BUCKET.match(line)
        if match and match["name"] == name:
            buckets[float(match["le"])] = float(match["count"])
    return buckets
