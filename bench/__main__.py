"""`python -m bench` / `meshlet-bench`: run the benchmarks and write JSON, plots and RESULTS.md.

    python -m bench                      # --short: N = 100, 1000; a few minutes
    python -m bench --medium             # N = 100, 1000, 10000 (nft -f alone takes minutes at 10k)
    python -m bench --full               # N = 100, 1000, 10000, 50000 (hours with the firewalls)
    python -m bench --sizes 100,10000 --modes direct,meshlet,nftables --rounds 5
    python -m bench --report-only bench/out/results-....json   # regenerate RESULTS.md and plots
    python -m bench --cleanup            # remove what a killed run left behind
    python -m bench --soak               # churn soak: 10k Services, 50 endpoint changes/s, 10 min
    python -m bench --sizes 50000 --no-controlplane --reuse bench/out/results-A.json   # add N=50k

Needs root (network namespaces, cgroups, BPF). Everything runs in namespaces and cgroups the
bench makes and removes; the root netns is never changed. Errors a user can meet (no root, no
gcc, no cgroup2) are one line with a hint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from agent.errors import UserError
from bench import report
from bench.modes import ALL_MODES

SHORT = {"sizes": [100, 1000], "cp_sizes": [1000, 10000], "rounds": 3, "conns": 3000}
MEDIUM = {"sizes": [100, 1000, 10000], "cp_sizes": [1000, 10000, 50000], "rounds": 3, "conns": 3000}
FULL = {"sizes": [100, 1000, 10000, 50000], "cp_sizes": [1000, 10000, 50000], "rounds": 5, "conns": 5000}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants numbers separated by commas, not {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--sizes wants positive numbers, e.g. 100,1000")
    return sizes


def _modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0]!r}; choose from {','.join(ALL_MODES)}")
    return modes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshlet-bench", description=__doc__.split("\n\n")[0])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--short", action="store_true", help="N = 100, 1000 (the default)")
    scale.add_argument("--medium", action="store_true", help="N = 100, 1000, 10000")
    scale.add_argument("--full", action="store_true", help="N = 100, 1000, 10000, 50000")
    p.add_argument("--sizes", type=_sizes, help="datapath N values, e.g. 100,1000,10000,50000")
    p.add_argument("--cp-sizes", type=_sizes, help="control-plane N values (default by scale)")
    p.add_argument("--modes", type=_modes, default=list(ALL_MODES), help=f"subset of {','.join(ALL_MODES)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds per N (repetitions)")
    p.add_argument("--conns", type=int, help="connections to random Services per mode and round")
    p.add_argument("--position-conns", type=int, default=300, help="per chain position, mode and round")
    p.add_argument("--udp", type=int, default=500, help="UDP first datagrams per mode and round")
    p.add_argument("--stream-seconds", type=float, default=1.0, help="stream test length per round")
    p.add_argument("--changes", type=int, default=5, help="one-Service changes applied per mode")
    p.add_argument("--endpoints", type=int, default=10, help="endpoints per Service (k)")
    p.add_argument("--apply-timeout", type=float, default=600.0,
                   help="seconds one full rule-set load may take before the mode is reported as timed out")
    p.add_argument("--cp-changes", type=int, default=200, help="endpoint changes timed in the control plane")
    p.add_argument("--cp-profile", action="store_true",
                   help="also write a cProfile of each control-plane child to the --out directory")
    p.add_argument("--no-datapath", action="store_true", help="skip the datapath benchmark")
    p.add_argument("--reuse", type=Path, metavar="JSON", action="append", default=[],
                   help="add the datapath and control-plane records of an earlier results file to this "
                        "run's (repeatable; RESULTS.md names the files). Combine with --no-datapath / "
                        "--no-controlplane to measure only what is missing")
    p.add_argument("--no-controlplane", action="store_true", help="skip the control-plane benchmark")
    p.add_argument("--no-idle", action="store_true", help="skip the idle-cost benchmark (the agent's CPU "
                   "on a busy node's cgroup tree, nothing changing)")
    p.add_argument("--no-churn", action="store_true", help="skip the churn benchmark (endpoint changes at a "
                   "steady rate into the real agent)")
    p.add_argument("--churn-services", type=int, help="churn N (default: the largest control-plane N)")
    p.add_argument("--churn-rate", type=float, default=500.0, help="endpoint changes per second")
    p.add_argument("--churn-seconds", type=float, default=60.0, help="churn window in seconds")
    p.add_argument("--idle-seconds", type=float,
                   help="idle-cost window in seconds (default: the agent's full reconcile interval, 60)")
    p.add_argument("--soak", action="store_true", help="run only the churn soak (bench/soak.py): the real "
                   "agent under endpoint and route churn while lab clients connect; JSON to --out")
    p.add_argument("--soak-services", type=int, default=10_000, help="soak: Services")
    p.add_argument("--soak-seconds", type=float, default=600.0, help="soak: churn window in seconds")
    p.add_argument("--soak-endpoint-rate", type=float, default=50.0, help="soak: EndpointSlice changes per second")
    p.add_argument("--soak-route-rate", type=float, default=1.0, help="soak: HTTPRoute edits per second")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("out"), help="JSON/PNG directory")
    p.add_argument("--results-md", type=Path, default=report.RESULTS_MD, help="markdown file to write")
    p.add_argument("--note", default="", help="a sentence for RESULTS.md about the run's conditions")
    p.add_argument("--report-only", type=Path, metavar="JSON", help="only regenerate plots and markdown")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces, cgroups and pins a killed run left behind, then exit")
    return p


def run(args) -> dict:
    from bench import controlplane, datapath_bench

    scale = FULL if args.full else MEDIUM if args.medium else SHORT
    sizes = args.sizes or scale["sizes"]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stamp": time.strftime("%Y%m%d-%H%M%S"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": report.machine_info(),
        "note": args.note,
        "datapath": [],
        "controlplane": [],
        "idle": [],
        "churn": [],
    }
    work = args.out / f"work-{results['stamp']}"
    if not args.no_datapath:
        plan = datapath_bench.DatapathPlan(
            sizes=sizes,
            modes=args.modes,
            k=args.endpoints,
            rounds=args.rounds or scale["rounds"],
            crr_per_round=args.conns or scale["conns"],
            position_conns=args.position_conns,
            udp_per_round=args.udp,
            stream_seconds=args.stream_seconds,
            changes=args.changes,
            apply_timeout=args.apply_timeout,
        )
        results["datapath"] = datapath_bench.run(plan, work)
    if not args.no_controlplane:
        cp_sizes = args.cp_sizes or scale["cp_sizes"]
        results["controlplane"] = controlplane.run(cp_sizes, args.endpoints, args.cp_changes,
                                                   args.out if args.cp_profile else None)

    if not args.no_idle:
        from bench import idle

        results["idle"] = [idle.run(args.idle_seconds)]

    if not args.no_churn:
        from bench import churn

        n = args.churn_services or max(args.cp_sizes or scale["cp_sizes"])
        results["churn"] = [churn.run(n, args.churn_rate, args.churn_seconds)]

    for path in args.reuse:
        earlier = json.loads(path.read_text())
        results["datapath"] += earlier.get("datapath", [])
        results["controlplane"] += earlier.get("controlplane", [])
        for row in ("idle", "churn"):
            if not results[row]:  # a run's own figure wins over an earlier one
                results[row] = earlier.get(row, [])
        results.setdefault("reused", []).append(f"{path.name} ({earlier['date']}, `{earlier['command']}`)")
        results["reused"] += earlier.get("reused", [])  # and what that run had reused, in turn
    results["loadavg_end"] = os.getloadavg()
    return results


def publish(results: dict, args, json_path: Path | None) -> None:
    plots = report.plot(results, args.out)
    report.write_markdown(report.render_markdown(results, plots, json_path, args.results_md), args.results_md)
    print(f"results: {json_path}\nmarkdown: {args.results_md}\nplots: {', '.join(map(str, plots))}")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        if args.report_only:
            results = json.loads(args.report_only.read_text())
            publish(results, args, args.report_only.resolve())
            return
        if os.geteuid() != 0:
            raise UserError("the benchmark needs root (network namespaces, cgroups, BPF); run it with sudo")
        if args.cleanup:
            from bench.topology import remove_leftovers

            print("\n".join(remove_leftovers()) or "nothing left behind")
            return
        if args.soak:
            from bench import soak

            record = soak.run(args.soak_services, args.soak_seconds, args.soak_endpoint_rate, args.soak_route_rate)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
            path.write_text(json.dumps(record, indent=1))
            print(json.dumps({k: v for k, v in record.items() if k != "samples"}, indent=1))
            print(f"soak: {'ok' if record['ok'] else 'FAILED'}; record in {path}")
            sys.exit(0 if record["ok"] else 1)
        results = run(args)
        path = report.write_json(results, args.out)
        publish(results, args, path.resolve())
    except UserError as err:
        print(f"meshlet-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
