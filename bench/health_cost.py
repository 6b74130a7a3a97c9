"""What passive health costs: the connect4 program's own time with the health check off and on,
and the sockops program's time per connection.

    python -m bench.health_cost                  # 5 rounds x 2000 connects per state; ~1 minute
    python -m bench.health_cost --rounds 1 --connects 200 --json out.json

Three states of one Service of three endpoints, interleaved round by round so a drift of the
machine hits all of them alike (SEMANTICS A17; `--passive-health off` is the first):
- off: the group's GROUP_PASSIVE_HEALTH flag clear: connect does nothing for passive health;
- on: the flag set, nothing ejected (the usual case): one read of the ejected-sets filter
  (no lookup of the set's ejections) and the socket's watch written for sockops;
- on, one ejected: an ejection of one endpoint in the set's entry (and the set's flag in the
  ejected-sets filter, as sockops sets it): the lookup hits and the pick steps over the ejected
  index (pick_healthy).

The figures are the kernel's own per-program counters (kernel.bpf_stats_enabled, restored after):
run_time_ns of connect4 and of sockops over the round divided by the connect4 runs, nanoseconds
per connect(), median over rounds. Everything runs in what bench.topology makes (a client and a
server network namespace, a cgroup subtree, the loadgen client and server) and a bpffs directory
of its own, all removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from bench.progtime import enable_program_stats, program_stats

STATES = ("off", "on", "on, one ejected")
FRONTEND, PORT = "10.96.0.10", 80
ENDPOINTS = ("10.244.0.1", "10.244.0.2", "10.244.0.3")  #: in the server netns' local pod range


def run(rounds: int = 5, connects: int = 2000, log=sys.stderr) -> dict:
    import tempfile

    from agent.datapath import Datapath, MapSizes
    from agent.datapath import entries as E
    from agent.datapath import layout as L
    from agent.datapath import plan as P
    from agent.model import BackendGroup, DesiredState, Endpoint, FrontendKey, FrontendState, GroupKey, Verdict, \
        WeightedGroup
    from bench import loadgen
    from bench.synth import TARGET_PORT
    from bench.topology import Lab

    key = GroupKey("bench", "web", "http", "TCP", 4)
    group = BackendGroup(key, tuple(Endpoint(a, TARGET_PORT) for a in ENDPOINTS), Verdict.FORWARD)
    frontends = {FrontendKey(FRONTEND, PORT, "TCP", ""): FrontendState("bench", "web", "http", (WeightedGroup(1, key),))}

    def state(on: bool) -> DesiredState:
        return DesiredState(frontends=frontends, groups={key: dataclasses.replace(group, passive_health=on)})

    set_sid = P.set_id(P.group_id(key), group.endpoints)
    set_key = bytes(L.U64(set_sid))
    samples: dict[str, dict[str, list[float]]] = {s: {"connect4": [], "sockops": []} for s in STATES}
    reached: dict[str, set[str]] = {s: set() for s in STATES}  #: endpoints the connects arrived at
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="meshlet-health-cost-") as tmp:
        workdir = Path(tmp)
        binary = loadgen.build(workdir / "bin")
        pair = lab.pair("health", route_services=False)
        lab.server(binary, pair)
        root = lab.cgroup_subtree("health")
        client = lab.child_cgroup(root, "client")
        if not enable_program_stats(lab):
            raise RuntimeError("cannot turn on kernel.bpf_stats_enabled: this row needs the kernel's program counters")
        bpffs = f"/sys/fs/bpf/meshlet-bench-health-{lab.run_id}"

        from agent.datapath import uninstall

        lab.on_close(f"meshlet pins in {bpffs}", lambda: uninstall(bpffs))
        dp = Datapath.open(bpffs, str(root), MapSizes(affinity=1024, clients=64))
        try:
            if "sockops" not in dp.programs.fds:
                raise RuntimeError("this kernel lacks the sock_ops hook with socket storage: passive health is off")
            dp.reconcile(state(True), {})
            dp.attach()

            def measure(warm: bool = False, seen: set | None = None) -> tuple[float, float]:
                """ns inside connect4 and inside sockops per connect() over one round (warm: 50
                connects, not measured)."""
                fds = dp.programs.fds["connect4"], dp.programs.fds["sockops"]
                before = [program_stats(fd) for fd in fds]
                seq = loadgen.run_sequence(binary, "crr", pair.cli_path,
                                           [(FRONTEND, PORT)] * (50 if warm else connects), workdir, client)
                after = [program_stats(fd) for fd in fds]
                if seq.errors:
                    raise RuntimeError(f"{seq.errors} of {len(seq.samples)} connects failed")
                if seen is not None:
                    seen.update(sample.endpoint.rsplit(":", 1)[0] for sample in seq.samples)
                runs = after[0][1] - before[0][1]
                return (after[0][0] - before[0][0]) / runs, (after[1][0] - before[1][0]) / runs

            measure(warm=True)
            for round_no in range(rounds):
                for name in STATES:
                    dp.reconcile(state(name != "off"), {})
                    ejections, eject_filter = dp.maps["ejections"], dp.maps["eject_filter"]
                    flag_key = bytes(L.U32(E.eject_filter_slot(set_sid)))
                    if name == "on, one ejected":
                        value = L.SetEjections()
                        value.slot[0].index = 2
                        value.slot[0].until_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9
                        # As sockops does: the set's filter flag first, then its ejections entry.
                        eject_filter.update(flag_key, bytes(L.U64(1)))
                        ejections.update(set_key, bytes(value))
                    try:
                        connect_ns, sockops_ns = measure(seen=reached[name])
                    finally:
                        ejections.delete(set_key)
                        eject_filter.update(flag_key, bytes(L.U64(0)))  # the other states: never ejected
                        dp.maps["health"].delete_batch(dp.maps["health"].keys())
                    samples[name]["connect4"].append(connect_ns)
                    samples[name]["sockops"].append(sockops_ns)
                    print(f"health cost: round {round_no + 1}/{rounds} {name}: connect4 {connect_ns:.0f} ns, "
                          f"sockops {sockops_ns:.0f} ns", file=log)
        finally:
            dp.close()
    return {"rounds": rounds, "connects": connects, "reached": {s: sorted(v) for s, v in reached.items()},
            "ns_per_connect": {s: {p: round(statistics.median(v), 1) for p, v in d.items()} for s, d in samples.items()},
            "samples": {s: {p: [round(x, 1) for x in v] for p, v in d.items()} for s, d in samples.items()}}


def markdown(record: dict) -> str:
    ns = record["ns_per_connect"]
    lines = ["| passive health | connect4 program, ns per connect() | vs off | sockops program, ns per connect() |",
             "|---|---|---|---|"]
    for state in STATES:
        c = ns[state]["connect4"]
        lines.append(f"| {state} | {c:.0f} | {c - ns['off']['connect4']:+.0f} | {ns[state]['sockops']:.0f} |")
    lines.append("")
    lines.append(f"Medians of {record['rounds']} rounds x {record['connects']} connects per state.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.health_cost", description=__doc__.split("\n\n")[0])
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
