"""What `meshlet trace` costs a connect(): the connect4 program's own time, tracing off and on.

    python -m bench.trace_cost                  # 5 rounds x 2000 connects per state; ~1 minute
    python -m bench.trace_cost --rounds 1 --connects 200 --json out.json

Four states. First "compiled out": the programs a kernel without any trace channel gets (no trace
code at all, -DHAVE_RINGBUF and -DTRACE_PERF_BUFFER left out), i.e. the connect cost before
`meshlet trace` existed; then the programs with tracing, three states interleaved round by round
so a drift of the machine hits all three alike:
- off: no trace running (the program pays one array lookup of the control map);
- on, filtered out: a trace running whose in-kernel filter (another frontend) drops every
  decision (the lookup, the clock read and the comparisons);
- on: a trace taking every decision, with a consumer emptying the ring buffer as `meshlet trace`
  does (the event is written to the ring; decisions lost to a full ring are counted and reported).
Last, "on, perf buffer": the fallback a kernel without ring buffers gets (-DTRACE_PERF_BUFFER,
compiled here from a probe answer without ring buffers, as MESHLET_PRETEND_NO_RINGBUF gives), a trace taking every
decision with a consumer emptying the per-CPU perf buffers; measured in a phase of its own (one
datapath is attached at a time), like "compiled out".

The figure is the kernel's own per-program counter (kernel.bpf_stats_enabled, restored after):
run_time_ns / run_cnt of connect4 over the round, nanoseconds per connect(), median over rounds.
Everything runs in what bench.topology makes (a client and a server network namespace, a cgroup
subtree, the loadgen client and server) and a bpffs directory of its own, all removed at the end,
also on failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import uuid
from pathlib import Path

from bench.progtime import enable_program_stats, program_stats

STATES = ("compiled out", "off", "on, filtered out", "on", "on, perf buffer")
TRACED = ("off", "on, filtered out", "on")  #: interleaved on the ring-buffer programs
PERF = "on, perf buffer"
FRONTEND, OTHER, PORT = "10.96.0.10", "10.96.0.99", 80
ENDPOINT = "10.244.0.1"  #: in the server netns' local pod range (bench.topology)


class Drain(threading.Thread):
    """Empties the ring buffer (or the perf buffers) while a trace is on, as `meshlet trace` would."""

    def __init__(self, ring):
        super().__init__(daemon=True)
        self.ring, self.events, self.stopping = ring, 0, threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.ring.wait(0.05)
            self.events += sum(1 for _ in self.ring.records())

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        self.events += sum(1 for _ in self.ring.records())
        return self.events


def measure_plain(open_datapath, measure, bpffs: str, rounds: int, log) -> list[float]:
    """ns per connect of the programs without trace code, one sample per round."""
    from agent.datapath import uninstall

    out = []
    dp = open_datapath(bpffs, channel=None)
    try:
        measure(dp, warm=True)
        for round_no in range(rounds):
            out.append(measure(dp))
            print(f"trace cost: round {round_no + 1}/{rounds} compiled out: {out[-1]:.0f} ns", file=log)
    finally:
        dp.close()
        uninstall(bpffs)  # detaches: the traced programs run alone afterwards
    return out


def measure_perf(open_datapath, measure, bpffs: str, rounds: int, log) -> tuple[list[float], int, int]:
    """ns per connect of the perf-buffer fallback with a trace taking every decision, one sample
    per round; (samples, events read, events dropped)."""
    from agent.datapath import trace as T
    from agent.datapath import uninstall

    out, events = [], 0
    dp = open_datapath(bpffs, channel="perf")
    try:
        control, buffers = T.Control(bpffs), T.PerfBuffers(bpffs)
        try:
            dropped_before = control.dropped
            measure(dp, warm=True)
            for round_no in range(rounds):
                control.start(T.Filter(), T.monotonic_ns() + 3600 * 10**9)
                drain = Drain(buffers)
                drain.start()
                try:
                    out.append(measure(dp))
                finally:
                    control.off()
                    events += drain.stop()
                print(f"trace cost: round {round_no + 1}/{rounds} {PERF}: {out[-1]:.0f} ns", file=log)
            return out, events, control.dropped - dropped_before
        finally:
            control.off()
            buffers.close()
            control.close()
    finally:
        dp.close()
        uninstall(bpffs)


def measure_traced(dp, measure, bpffs: str, rounds: int, samples: dict, log) -> tuple[int, int]:
    """The TRACED states interleaved, one sample each per round; (events read, events dropped)."""
    from agent.datapath import trace as T

    events = 0
    control, ring = T.Control(bpffs), T.Ring(bpffs)
    try:
        dropped_before = control.dropped
        measure(dp, warm=True)
        for round_no in range(rounds):
            for state_name in TRACED:
                drain = None
                if state_name != "off":
                    ring.skip_pending()
                    flt = T.Filter(to=T.To(OTHER)) if state_name == "on, filtered out" else T.Filter()
                    control.start(flt, T.monotonic_ns() + 3600 * 10**9)
                    drain = Drain(ring)
                    drain.start()
                try:
                    samples[state_name].append(measure(dp))
                finally:
                    control.off()
                    if drain is not None:
                        events += drain.stop()
                print(f"trace cost: round {round_no + 1}/{rounds} {state_name}: {samples[state_name][-1]:.0f} ns",
                      file=log)
        return events, control.dropped - dropped_before
    finally:
        control.off()
        ring.close()
        control.close()


def run(rounds: int = 5, connects: int = 2000, log=sys.stderr) -> dict:
    import tempfile

    from agent.datapath import Datapath, MapSizes
    from agent.datapath.features import probe
    from agent.model import BackendGroup, DesiredState, Endpoint, FrontendKey, FrontendState, GroupKey, Verdict, \
        WeightedGroup
    from bench import loadgen
    from bench.synth import TARGET_PORT
    from bench.topology import Lab

    key = GroupKey("bench", "web", "http", "TCP", 4)
    group = BackendGroup(key, (Endpoint(ENDPOINT, TARGET_PORT),), Verdict.FORWARD)
    state = DesiredState(frontends={FrontendKey(FRONTEND, PORT, "TCP", ""): FrontendState(
        "bench", "web", "http", (WeightedGroup(1, key),))}, groups={key: group})
    samples: dict[str, list[float]] = {s: [] for s in STATES}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="meshlet-trace-cost-") as tmp:
        workdir = Path(tmp)
        binary = loadgen.build(workdir / "bin")
        pair = lab.pair("trace", route_services=False)
        lab.server(binary, pair)
        root = lab.cgroup_subtree("trace")
        client = lab.child_cgroup(root, "client")
        if not enable_program_stats(lab):
            raise RuntimeError("cannot turn on kernel.bpf_stats_enabled: this row needs the kernel's program counters")

        def open_datapath(bpffs: str, channel: str | None) -> Datapath:
            """channel: the trace channel to compile for ("ringbuf", "perf"), None: no trace code."""
            from agent.datapath import uninstall

            present = dict(probe())
            present["ringbuf"] = present["ringbuf"] and channel == "ringbuf"
            present["perf_output"] = present["perf_output"] and channel is not None
            lab.on_close(f"meshlet pins in {bpffs}", lambda: uninstall(bpffs))
            dp = Datapath.open(bpffs, str(root), MapSizes(affinity=1024, clients=64), kernel_features=present)
            dp.reconcile(state, {})
            dp.attach()
            return dp

        def measure(dp: Datapath, warm: bool = False) -> float:
            """ns inside connect4 per connect() over one round (warm: 50 connects, not measured:
            caches, the socket storage's first use)."""
            fd = dp.programs.fds["connect4"]
            before = program_stats(fd)
            seq = loadgen.run_sequence(binary, "crr", pair.cli_path, [(FRONTEND, PORT)] * (50 if warm else connects),
                                       workdir, client)
            after = program_stats(fd)
            if seq.errors:
                raise RuntimeError(f"{seq.errors} of {len(seq.samples)} connects failed")
            return (after[0] - before[0]) / (after[1] - before[1])

        bpffs = f"/sys/fs/bpf/meshlet-bench-trace-{lab.run_id}"
        samples["compiled out"] = measure_plain(open_datapath, measure, bpffs + "-plain", rounds, log)
        samples[PERF], perf_events, perf_dropped = measure_perf(open_datapath, measure, bpffs + "-perf", rounds, log)
        dp = open_datapath(bpffs, channel="ringbuf")
        try:
            events, dropped = measure_traced(dp, measure, bpffs, rounds, samples, log)
        finally:
            dp.close()
    return {"rounds": rounds, "connects": connects, "events": events, "dropped": dropped,
            "perf_events": perf_events, "perf_dropped": perf_dropped,
            "ns_per_connect": {s: round(statistics.median(v), 1) for s, v in samples.items()},
            "samples": {s: [round(x, 1) for x in v] for s, v in samples.items()}}


def markdown(record: dict) -> str:
    ns = record["ns_per_connect"]
    lines = ["| tracing | connect4 program, ns per connect() (median of rounds) | vs compiled out |", "|---|---|---|"]
    for state in STATES:
        lines.append(f"| {state} | {ns[state]:.0f} | {ns[state] - ns['compiled out']:+.0f} |")
    lines.append("")
    lines.append(f"{record['rounds']} rounds x {record['connects']} connects per state; {record['events']} events "
                 f"read, {record['dropped']} dropped (ring buffer); {record['perf_events']} read, "
                 f"{record['perf_dropped']} dropped (perf buffers).")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connects", type=int, default=2000, help="connect() calls per state and round")
    p.add_argument("--json", type=Path, help="also write the record here")
    args = p.parse_args(argv)
    record = run(args.rounds, args.connects)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))


if __name__ == "__main__":
    main()
