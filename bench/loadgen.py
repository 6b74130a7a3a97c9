"""Build and drive the C load generator (bench/loadgen.c).

May touch: bench/out/ (the compiled binary, target and sample files) and the processes it starts,
which enter only the namespaces (and cgroups) they are given.

A sample is one connection attempt: errno (0 = success), latency in ns (connect() alone for TCP,
sendto..recvfrom for UDP), the endpoint address the server saw the connection arrive on, and for
UDP the source address of the reply (it must be the address the client sent to) and sendto()
alone. The UDP round trip includes waking the server process, so on a busy machine it follows
the scheduler more than the datapath; sendto() alone holds the first datagram's datapath cost
(hooks, conntrack, NAT, veth delivery all run inside the call).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UserError

SOURCE = Path(__file__).with_name("loadgen.c")
OUT_DIR = Path(__file__).with_name("out")


@dataclass(frozen=True)
class Sample:
    errno: int
    latency_ns: int
    endpoint: str  #: "-" when the attempt failed
    reply_source: str  #: UDP only; "-" for TCP
    send_ns: int = 0  #: UDP only: sendto() alone, the first datagram's whole output path


@dataclass(frozen=True)
class Sequence:
    samples: list[Sample]
    elapsed_ns: int  #: wall time of the whole sequence (connect, send, recv, close each time)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.errno)


def build(out_dir: Path = OUT_DIR) -> Path:
    """Compile loadgen.c unless the binary is newer than the source; return the binary's path."""
    binary = out_dir / "loadgen"
    out_dir.mkdir(parents=True, exist_ok=True)
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise UserError(f"could not compile {SOURCE}: {result.stderr.strip()} (is gcc installed?)")
    return binary


def run_sequence(
    binary: Path,
    kind: str,
    netns_path: str,
    targets: list[tuple[str, int]],
    workdir: Path,
    cgroup: Path | None = None,
) -> Sequence:
    """One new connection (kind "crr") or UDP socket (kind "udp") per target, in order."""
    targets_file = workdir / "targets.txt"
    out_file = workdir / "samples.txt"
    targets_file.write_text("".join(f"{ip} {port}\n" for ip, port in targets))
    cmd = [str(binary), kind, "--netns", netns_path, "--targets", str(targets_file), "--out", str(out_file)]
    if cgroup is not None:
        cmd += ["--cgroup", str(cgroup)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30 + 0.1 * len(targets))
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {kind} failed: {result.stderr.strip()}")
    summary = json.loads(result.stdout)
    samples = []
    for line in out_file.read_text().splitlines():
        err, latency, endpoint, source, send = line.split()
        samples.append(Sample(int(err), int(latency), endpoint, source, int(send)))
    return Sequence(samples, summary["elapsed_ns"])


def run_stream(
    binary: Path, netns_path: str, target: tuple[str, int], seconds: float, cgroup: Path | None = None
) -> float:
    """Bytes per second the server received on one established TCP connection."""
    cmd = [str(binary), "stream", "--netns", netns_path, "--target", target[0], "--port", str(target[1]),
           "--seconds", str(seconds)]
    if cgroup is not None:
        cmd += ["--cgroup", str(cgroup)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen stream failed: {result.stderr.strip()}")
    summary = json.loads(result.stdout)
    return summary["bytes"] / (summary["elapsed_ns"] / 1e9)
