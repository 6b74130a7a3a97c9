"""The datapath benchmark: every mode side by side, per number of Services N.

For one N: build the Services, shuffle their order (kube-proxy emits Go-map order), set up every
mode in its own namespaces and time its full apply; then, in `rounds` rounds, each mode in a fresh
random order runs the same connection sequences (uniformly random Services; Services at the start,
middle and end of the KUBE-SERVICES chain; UDP first datagrams; one established stream). Running
the modes interleaved, round after round, spreads the machine's background noise evenly over them:
the figures that matter are ratios between modes measured in the same run. Modes with programs of
their own (meshlet) also report the kernel's time inside them (bpf_stats): connect4 per translated
connect, connect4 per connect to an address that is no frontend (the frontend miss: what every
other connection on the node pays, measured by connecting to the endpoints' own addresses), and
sendmsg4 per first datagram of a new UDP socket. Finally every mode
applies the same endpoint changes (timed) and is checked to reach the new endpoint set.

May touch: what topology.Lab and the modes make, and files in the work directory.

Each connection's reply names the endpoint the server saw, so every record also says whether each
mode reached only endpoints of the Service it aimed at ("wrong_endpoint" must be 0), and for the
position targets how connections spread over the k endpoints (the smoke test checks balance).
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, stats
from bench.modes import MODE_CLASSES, ApplyFailed, ApplyTimeout, Mode
from bench.synth import TARGET_PORT, Service, make_services, with_endpoint_replaced
from bench.topology import Lab

POSITIONS = ("start", "middle", "end")


@dataclass
class DatapathPlan:
    sizes: list[int]
    modes: list[str]
    k: int = 10
    rounds: int = 3
    crr_per_round: int = 3000
    position_conns: int = 300  #: per position and round
    udp_per_round: int = 500
    miss_per_round: int = 500  #: connects to non-frontend addresses (modes with programs only)
    stream_seconds: float = 1.0
    changes: int = 5
    warmup: int = 300
    apply_timeout: float = 300.0
    seed: int = 6
    udp_every: int = 10
    log: object = field(default=sys.stderr, repr=False)


@dataclass
class _ModeRun:
    mode: Mode
    record: dict
    crr: list = field(default_factory=list)  #: connect() latencies (ns), pooled over rounds
    crr_elapsed_ns: int = 0
    crr_count: int = 0
    round_p50: list = field(default_factory=list)
    positions: dict = field(default_factory=lambda: {p: [] for p in POSITIONS})
    udp: list = field(default_factory=list)
    udp_send: list = field(default_factory=list)
    stream: list = field(default_factory=list)
    reached: dict = field(default_factory=dict)  #: position -> Counter(endpoint)
    wrong_endpoint: int = 0
    wrong_source: int = 0
    errors: Counter = field(default_factory=Counter)
    program: Counter = field(default_factory=Counter)  #: "<hook> ns" / "<hook> runs" over the crr rounds
    miss_program: Counter = field(default_factory=Counter)  #: the same over the frontend-miss connects
    udp_program: Counter = field(default_factory=Counter)  #: the same over the UDP first datagrams
    wrong_miss: int = 0  #: frontend-miss connects that did not arrive at the address dialled


def _say(plan: DatapathPlan, text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=plan.log, flush=True)


def chain_positions(order: list[Service]) -> dict[str, Service]:
    """The Services at ~0 %, 50 % and 100 % of the KUBE-SERVICES chain."""
    return {"start": order[0], "middle": order[len(order) // 2], "end": order[-1]}


def run_size(plan: DatapathPlan, n: int, binary: Path, workdir: Path, skip: dict[str, str]) -> list[dict]:
    """All modes at N Services; returns one record per mode. `skip` maps mode -> reason to skip
    (it is updated when a mode's apply times out, so larger N do not try again)."""
    services = make_services(n, plan.k, plan.udp_every)
    rng = random.Random(plan.seed * 1_000_003 + n)
    order = services[:]
    rng.shuffle(order)
    positions = chain_positions(order)
    udp_services = [s for s in services if "udp" in s.protocols]
    workdir.mkdir(parents=True, exist_ok=True)

    with Lab() as lab:
        runs: list[_ModeRun] = []
        for name in plan.modes:
            record = {"mode": name, "services": n, "endpoints_per_service": plan.k, "status": "ok"}
            reason = skip.get(name) or MODE_CLASSES[name].unavailable()
            if reason:
                record.update(status="skipped", reason=reason)
                runs.append(_ModeRun(None, record))
                continue
            mode = MODE_CLASSES[name](lab, workdir, plan.apply_timeout)
            _say(plan, f"N={n} {name}: setting up")
            try:
                mode.setup()
                lab.server(binary, mode.pair)
                if mode.applies:
                    record["apply_full_s"] = round(mode.apply_full(order), 4)
                    _say(plan, f"N={n} {name}: full apply {record['apply_full_s']} s")
            except ApplyTimeout as err:
                record.update(status="timeout", reason=str(err), apply_full_s=None,
                              apply_full_timeout_s=plan.apply_timeout)
                skip[name] = f"its full apply timed out at N={n}"
                _say(plan, f"N={n} {name}: {err}")
                mode = None
            except ApplyFailed as err:
                record.update(status="failed", reason=str(err), apply_full_s=None)
                skip[name] = f"its full apply failed at N={n}"
                _say(plan, f"N={n} {name}: {err}")
                mode = None
            except Exception as err:  # one broken mode must not hide the others' figures
                record.update(status="failed", reason=f"{type(err).__name__}: {err}")
                _say(plan, f"N={n} {name}: setup failed: {err}")
                mode = None
            runs.append(_ModeRun(mode, record))
        active = [r for r in runs if r.mode is not None]

        for r in active:
            _warm_up(plan, r, services, binary, workdir, rng)
        for round_no in range(plan.rounds):
            _say(plan, f"N={n}: round {round_no + 1}/{plan.rounds}")
            # One Service sequence per round, shared by all modes; only the direct mode's endpoint
            # draw differs (it has to pick an endpoint itself).
            seq = [rng.choice(services) for _ in range(plan.crr_per_round)]
            udp_seq = [rng.choice(udp_services) for _ in range(plan.udp_per_round)] if udp_services else []
            for r in rng.sample(active, len(active)):
                _measure_round(plan, r, round_no, seq, udp_seq, positions, order[0], binary, workdir)

        _changes(plan, active, services, order, rng, binary, workdir)
        return [_finish(r) for r in runs]


def _warm_up(plan, r, services, binary, workdir, rng):
    draw = random.Random(1)
    targets = [r.mode.address(rng.choice(services), "tcp", draw) for _ in range(plan.warmup)]
    loadgen.run_sequence(binary, "crr", r.mode.pair.cli_path, targets, workdir, r.mode.cgroup)


def _check(r: _ModeRun, sequence, services, position=None, udp=False):
    for sample, service in zip(sequence.samples, services):
        if sample.errno:
            r.errors[sample.errno] += 1
            continue
        if sample.endpoint not in service.endpoints:
            r.wrong_endpoint += 1
        if udp and sample.reply_source not in (service.vip, sample.endpoint):
            r.wrong_source += 1
        if position:
            r.reached.setdefault(position, Counter())[sample.endpoint] += 1


def _measure_round(plan, r: _ModeRun, round_no, seq, udp_seq, positions, stream_service, binary, workdir):
    mode = r.mode
    draw = random.Random(round_no)  # the direct mode's endpoint choices
    targets = [mode.address(s, "tcp", draw) for s in seq]
    with _program_time(mode, r.program):
        crr = loadgen.run_sequence(binary, "crr", mode.pair.cli_path, targets, workdir, mode.cgroup)
    _check(r, crr, seq)
    ok = [s.latency_ns for s in crr.samples if not s.errno]
    r.crr += ok
    r.crr_elapsed_ns += crr.elapsed_ns
    r.crr_count += len(ok)
    if ok:
        r.round_p50.append(statistics.median(ok) / 1000)
    for position, service in positions.items():
        targets = [mode.address(service, "tcp", draw) for _ in range(plan.position_conns)]
        run = loadgen.run_sequence(binary, "crr", mode.pair.cli_path, targets, workdir, mode.cgroup)
        _check(r, run, [service] * len(targets), position=position)
        r.positions[position] += [s.latency_ns for s in run.samples if not s.errno]
    if udp_seq:
        targets = [mode.address(s, "udp", draw) for s in udp_seq]
        with _program_time(mode, r.udp_program):
            udp = loadgen.run_sequence(binary, "udp", mode.pair.cli_path, targets, workdir, mode.cgroup)
        _check(r, udp, udp_seq, udp=True)
        r.udp += [s.latency_ns for s in udp.samples if not s.errno]
        r.udp_send += [s.send_ns for s in udp.samples if not s.errno]
    if plan.miss_per_round and hasattr(mode, "program_stats"):
        # Connects the programs must leave alone: each endpoint dialled by its own address.
        targets = [(draw.choice(s.endpoints), TARGET_PORT) for s in seq[:plan.miss_per_round]]
        with _program_time(mode, r.miss_program):
            miss = loadgen.run_sequence(binary, "crr", mode.pair.cli_path, targets, workdir, mode.cgroup)
        for sample, (address, _) in zip(miss.samples, targets):
            if sample.errno:
                r.errors[sample.errno] += 1
            elif sample.endpoint != address:
                r.wrong_miss += 1
    if plan.stream_seconds > 0:
        target = mode.address(stream_service, "tcp", draw)
        r.stream.append(loadgen.run_stream(binary, mode.pair.cli_path, target, plan.stream_seconds, mode.cgroup))


@contextmanager
def _program_time(mode: Mode, into: Counter):
    """Add the time and runs of `mode`'s programs during the block to `into` ("<hook> ns" /
    "<hook> runs"); nothing for a mode without programs."""
    if not hasattr(mode, "program_stats"):
        yield
        return
    before = mode.program_stats()
    yield
    for hook, (ns, runs) in mode.program_stats().items():
        into[f"{hook} ns"] += ns - before[hook][0]
        into[f"{hook} runs"] += runs - before[hook][1]


def _per_run(counter: Counter, hook: str) -> float | None:
    """Mean ns per run of `hook` in `counter`, None when it never ran."""
    runs = counter.get(f"{hook} runs")
    return round(counter[f"{hook} ns"] / runs, 1) if runs else None


def _changes(plan, active, services, order, rng, binary, workdir):
    """The same endpoint changes applied to every mode, timed; then each mode must reach exactly
    the last changed Service's new endpoints."""
    if not plan.changes:
        return
    by_index = {s.index: s for s in services}
    current = order[:]
    last = None
    for generation in range(plan.changes):
        old = rng.choice(current)
        new = with_endpoint_replaced(old, generation)
        current = [new if s.index == old.index else s for s in current]
        by_index[new.index] = new
        for r in active:
            if not r.mode.applies:
                continue
            try:
                seconds = r.mode.apply_change(current, old, new)
            except (ApplyTimeout, ApplyFailed) as err:
                r.record["change_error"] = str(err)
                continue
            r.record.setdefault("apply_change_s", []).append(round(seconds, 5))
        last = new
    for r in active:
        draw = random.Random(7)
        targets = [r.mode.address(last, "tcp", draw) for _ in range(max(50, 10 * len(last.endpoints)))]
        run = loadgen.run_sequence(binary, "crr", r.mode.pair.cli_path, targets, workdir, r.mode.cgroup)
        reached = Counter(s.endpoint for s in run.samples if not s.errno)
        r.record["after_change"] = {
            "service": last.index,
            "expected": list(last.endpoints),
            "reached": dict(sorted(reached.items())),
            "errors": sum(1 for s in run.samples if s.errno),
        }


def _finish(r: _ModeRun) -> dict:
    record = r.record
    if r.mode is None:
        return record
    record["connect_us"] = stats.summarize_ns(r.crr)
    record["connect_p50_per_round_us"] = [round(v, 2) for v in r.round_p50]
    record["conn_per_s"] = round(r.crr_count / (r.crr_elapsed_ns / 1e9), 1) if r.crr_elapsed_ns else None
    record["positions_us"] = {p: stats.summarize_ns(v) for p, v in r.positions.items()}
    record["udp_us"] = stats.summarize_ns(r.udp)
    record["udp_send_us"] = stats.summarize_ns(r.udp_send)
    record["stream_gbit_s"] = round(statistics.median(r.stream) * 8 / 1e9, 3) if r.stream else None
    record["stream_gbit_s_all"] = [round(v * 8 / 1e9, 3) for v in r.stream]
    record["wrong_endpoint"] = r.wrong_endpoint
    record["wrong_udp_reply_source"] = r.wrong_source
    record["errors"] = {str(k): v for k, v in sorted(r.errors.items())}
    record["reached_at_positions"] = {p: dict(sorted(c.items())) for p, c in r.reached.items()}
    runs = r.program.get("connect4 runs")
    if runs:
        record["program_ns_per_connect"] = round(r.program["connect4 ns"] / runs, 1)
        if r.program.get("sockops runs"):
            # sock_ops runs several times per connection (SYN, state changes, ...): per connect().
            record["sockops_ns_per_connect"] = round(r.program["sockops ns"] / runs, 1)
    if r.miss_program:
        record["miss_program_ns_per_connect"] = _per_run(r.miss_program, "connect4")
        record["wrong_miss_endpoint"] = r.wrong_miss
    if r.udp_program:
        record["sendmsg_program_ns_per_datagram"] = _per_run(r.udp_program, "sendmsg4")
    if record.get("apply_change_s"):
        record["apply_change"] = stats.summarize_seconds(record["apply_change_s"])
    return record


def run(plan: DatapathPlan, workdir: Path) -> list[dict]:
    binary = loadgen.build()
    skip: dict[str, str] = {}
    records = []
    for n in plan.sizes:
        try:
            records += run_size(plan, n, binary, workdir / f"n{n}", skip)
        finally:
            shutil.rmtree(workdir / f"n{n}", ignore_errors=True)  # rule files reach 100s of MB at 50k
    return records
