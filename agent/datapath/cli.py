"""`meshlet maps dump`, `meshlet trace` and `meshlet uninstall`: the pinned datapath, no agent needed.

Role: a thin command-line layer over agent.datapath.dump (read-only decoding),
agent.datapath.trace (live decisions) and agent.datapath.loader.uninstall. None of them compiles
anything or imports bcc. The table and
the JSON come from the same records (dump.MapsView); JSON keys are the record field names and
are stable for scripts.
"""

from __future__ import annotations

import json
import os

import click

from agent.datapath import dump as D
from agent.datapath import loader
from agent.datapath import trace as T
from agent.model import host_port


#: WHICH -> (column headers, row -> cells)
COLUMNS = {
    "frontends": (("FRONTEND", "PROTO", "SCOPE", "VERDICT", "SPLIT", "ROUTE"), lambda r: (
        host_port(r.address, r.port), r.protocol, r.scope or "-",
        r.verdict + (" (has scopes)" if r.has_scopes else ""),
        ", ".join(f"{s.share:.4g} {s.group}" for s in r.split) or "-", r.route or "-")),
    "groups": (("GROUP", "VERDICT", "ENDPOINTS", "AFFINITY", "PASSIVE-HEALTH", "SET"), lambda r: (
        r.group, r.verdict, str(r.count), f"{r.affinity_timeout}s" if r.affinity_timeout else "-",
        "on" if r.passive_health else "off", f"{r.set_id:#018x}")),
    "endpoints": (("GROUP", "INDEX", "ENDPOINT", "SET"), lambda r: (
        r.group or "(stale set)", str(r.index), host_port(r.address, r.port), f"{r.set_id:#018x}")),
    "members": (("SET", "ENDPOINT", "INDEX"), lambda r: (
        f"{r.set_id:#018x}", host_port(r.address, r.port), str(r.index))),
    "affinity": (("NETNS-COOKIE", "GROUP", "ENDPOINT", "IDLE"), lambda r: (
        str(r.netns_cookie), r.group, r.endpoint, f"{r.idle_seconds:.1f}s")),
    "clients": (("CGROUP-ID", "NAMESPACE", "SKIP"), lambda r: (
        str(r.cgroup_id), r.scope, "yes" if r.skip else "no")),
    "counters": (("OUTCOME", "CONNECTIONS"), lambda r: (r.outcome, str(r.total))),
    "names": (("ID", "NAME"), lambda r: (f"{r.id:#018x}", r.name)),
    "health": (("ENDPOINT", "FAILURES", "EJECTIONS", "BACKOFF-LEFT", "SKIPPED-IN"), lambda r: (
        r.endpoint, str(r.failures), str(r.ejections),
        f"{r.backoff_left_seconds:.1f}s" if r.backoff_left_seconds else "-", ", ".join(r.skipped_in) or "-")),
}


def format_table(headers, rows) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


def dump_json(view: D.MapsView, which: str | None = None) -> str:
    """What `meshlet maps dump [WHICH] -o json` prints (the golden tests compare this text)."""
    return json.dumps(view.as_json(which), indent=2, sort_keys=True)


@click.group()
def maps():
    """Read the datapath's pinned maps (no running agent needed).

    \b
    Example:
      meshlet maps dump frontends
      meshlet maps dump -o json | jq '.groups[] | select(.count == 0)'
    """


@maps.command()
@click.argument("which", required=False, type=click.Choice(D.DUMPABLE))
@click.option("--bpffs", default=loader.DEFAULT_BPFFS, show_default=True, help="The agent's bpffs directory.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def dump(which, bpffs, output):
    """Print the pinned maps, decoded: addresses, ports, verdicts, shares and names.

    WHICH is one map (default: all of them). JSON keys are stable for scripts.

    \b
    Example:
      meshlet maps dump frontends --bpffs /sys/fs/bpf/meshlet
      meshlet maps dump counters -o json
    """
    view = D.read_maps(bpffs)
    if output == "json":
        click.echo(dump_json(view, which))
        return
    tables = [which] if which else list(D.DUMPABLE)
    for i, table in enumerate(tables):
        headers, cells = COLUMNS[table]
        if len(tables) > 1:
            click.echo(("\n" if i else "") + f"# {table}")
        click.echo(format_table(headers, [cells(r) for r in getattr(view, table)]))


@click.command()
@click.option("--bpffs", default=loader.DEFAULT_BPFFS, show_default=True, help="The agent's bpffs directory.")
@click.option("--cgroup-root", default=None,
              help="The cgroup the agent attached to: checked afterwards for programs still attached.")
def uninstall(bpffs, cgroup_root):
    """Detach meshlet's programs and remove every pin under --bpffs.

    Stop the agent first (a running agent would attach again). Connections already established
    are not affected; new ones are no longer translated.

    \b
    Example:
      meshlet uninstall --bpffs /sys/fs/bpf/meshlet --cgroup-root /sys/fs/cgroup
    """
    removed = loader.uninstall(bpffs)
    for path in removed:
        click.echo(f"removed {path}")
    if not removed:
        click.echo(f"nothing pinned under {bpffs}")
    if cgroup_root:
        left = loader.attached_programs(cgroup_root)
        if left:
            from agent.errors import UserError

            raise UserError(f"programs named like ours are still attached to {cgroup_root}: "
                            f"{', '.join(left)}; hint: another meshlet with a different --bpffs attached them")
        click.echo(f"no meshlet program attached to {os.path.abspath(cgroup_root)}")


@click.command()
@click.option("--from", "source", metavar="NS/POD", help="Only connections from this pod (of this node).")
@click.option("--to", "target", metavar="ADDR[:PORT][/PROTO]", help="Only connections to this frontend.")
@click.option("--verdict", "verdicts", multiple=True, type=click.Choice(list(T.VERDICTS)),
              help="Only these verdicts (repeat the option for several; default: all).")
@click.option("--count", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after this many events (0: until Ctrl-C).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: one object per line, keys stable for scripts.")
@click.option("--bpffs", default=loader.DEFAULT_BPFFS, show_default=True, help="The agent's bpffs directory.")
def trace(source, target, verdicts, count, output, bpffs):
    """Print the datapath's decisions as they happen, with names; tracing is off again on exit.

    One line per decision: a connect(), or the first datagram of an unconnected UDP socket to a
    frontend. The filters run in the kernel. Needs only the pins: works while the agent is down.
    A trace killed without a chance to clean up switches itself off within seconds.

    \b
    Example:
      meshlet trace --from default/client --to 10.96.0.10:80/tcp
      meshlet trace --verdict reject --verdict unreachable -o json --count 10
    """
    flt = T.Filter(tuple(verdicts) or tuple(T.VERDICTS), T.parse_to(target) if target else None)
    table = T.TableWriter()
    if output == "table":
        click.echo(table.row(T.COLUMNS))

    def emit(event):
        if output == "json":
            click.echo(json.dumps(T.as_json(event), sort_keys=True))
        else:
            click.echo(table.row(T.table_cells(event)))

    summary = T.trace(bpffs, source, flt, count, emit, ready=lambda text: click.echo(f"meshlet: {text}", err=True))
    lost = f"; {summary.dropped} lost to a full ring or perf buffer (narrow the filters)" if summary.dropped else ""
    click.echo(f"meshlet: {summary.events} events{lost}; tracing is off", err=True)
