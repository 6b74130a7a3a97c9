"""`meshlet lab`: a persistent lab of pods for people to poke around in.

Role: `up` builds a lab (agent.lab.pods) from the Pods of a manifests directory (the same files
`meshlet run --manifests` reads) and leaves it running; `down` removes exactly what `up` made;
`exec` runs a command inside a pod; `status` shows the labs that are up.

May touch: what agent.lab.pods touches, and the state files /run/meshlet-lab/<name>.json (the
record of everything a lab made, so that `down` removes exactly that, also from another shell)
with the echo servers' logs beside them in /run/meshlet-lab/<name>/. /run is a tmpfs: a reboot
forgets the labs, and removes them too.
"""

from __future__ import annotations

import json
import os
import sys

import click

from agent.errors import UserError

STATE_DIR = "/run/meshlet-lab"
DEFAULT_NAME = "local"


def state_file(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def load_state(name: str) -> dict:
    try:
        with open(state_file(name)) as f:
            return json.load(f)
    except FileNotFoundError:
        up = ", ".join(list_labs()) or "none"
        raise UserError(f"no lab named {name!r} is up (labs up: {up}); "
                        "hint: meshlet lab up --name NAME, or meshlet lab status") from None
    except ValueError as err:
        raise UserError(f"{state_file(name)} is not valid JSON ({err}); hint: remove the lab's "
                        "netns (ip netns list | grep meshlet-) and cgroup by hand, then the file") from None


def list_labs() -> list[str]:
    try:
        names = os.listdir(STATE_DIR)
    except FileNotFoundError:
        return []
    return sorted(name[:-5] for name in names if name.endswith(".json"))


def _lab_from(name: str):
    from agent.lab.pods import Lab

    return Lab.from_state(load_state(name))


name_option = click.option("--name", default=DEFAULT_NAME, show_default=True,
                           help="which lab (several can be up at once)")


@click.group()
def lab():
    """A local lab of pods: network namespaces, kubelet cgroups, an echo server in each pod.

    \b
    Example:
      meshlet lab up --manifests examples/demo
      meshlet lab exec batch/batch-client -- ip addr
      meshlet lab down
    """


@lab.command()
@name_option
@click.option("--manifests", type=click.Path(file_okay=False), default=None,
              help="directory whose Pod objects become lab pods [default: examples/demo]")
@click.option("--layout", type=click.Choice(["systemd", "cgroupfs"]), default="systemd",
              show_default=True, help="the kubelet cgroup driver to imitate")
def up(name, manifests, layout):
    """Build a lab from the Pods in a manifests directory and leave it running.

    Each Pod gets a netns with its status.podIPs (an address is allocated for a family it
    lacks), a veth to the lab's bridge, a cgroup where the kubelet would put it (by metadata.uid),
    and an echo server on its containerPorts (TCP and UDP) answering with the pod's name.

    \b
    Example:
      meshlet lab up --name local --manifests examples/demo
    """
    from agent.lab.manifests import add_pods, default_manifests_dir, node_names, pod_specs, read_objects
    from agent.lab.pods import Lab

    manifests = manifests or default_manifests_dir()
    if os.path.exists(state_file(name)):
        raise UserError(f"a lab named {name!r} is already up; hint: meshlet lab down --name {name}, "
                        "or pick another --name")
    objects = read_objects(manifests)
    specs = pod_specs(objects)
    if not specs:
        raise UserError(f"no Pod objects in {manifests}; hint: the lab makes one pod per Pod object")
    with Lab(name, layout=layout, log_dir=os.path.join(STATE_DIR, name)) as made:
        click.echo(f"lab {name}: cgroup root {made.cgroup_root}, node netns {made.node_netns}")
        add_pods(made, specs, progress=lambda line: click.echo(f"  {line}"))
        made.keep(state_file(name))
    nodes = node_names(objects)
    node = nodes[0] if len(nodes) == 1 else "NODE"
    client = specs[0]
    click.echo(f"\nlab {name} is up ({len(specs)} pods). Next:\n"
               f"  meshlet run --manifests {manifests} --cgroup-root {made.cgroup_root} "
               f"--bpffs /sys/fs/bpf/meshlet-lab-{name} --node-name {node}\n"
               f"  meshlet lab exec {client.namespace}/{client.name} -- "
               f"{sys.executable} -m agent.lab.client tcp ADDR PORT --count 100\n"
               f"  meshlet lab down" + ("" if name == DEFAULT_NAME else f" --name {name}"))


@lab.command()
@name_option
def down(name):
    """Remove everything a lab made: processes, network namespaces, cgroups.

    \b
    Example:
      meshlet lab down --name local
    """
    made = _lab_from(name)
    leftovers = _destroy(made)
    if leftovers:
        raise UserError(f"lab {name}: could not remove {'; '.join(leftovers)}; hint: stop what "
                        f"still uses it (a `meshlet run` on {made.cgroup_root}?) and run this again")
    os.unlink(state_file(name))
    log_dir = os.path.join(STATE_DIR, name)
    if os.path.isdir(log_dir):
        for entry in os.listdir(log_dir):
            os.unlink(os.path.join(log_dir, entry))
        os.rmdir(log_dir)
    click.echo(f"lab {name} is down")


def _destroy(made) -> list[str]:
    from agent.lab.pods import destroy_record

    return destroy_record(made.record)


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name, pod, command):
    """Run COMMAND inside POD (its container cgroup, then its network namespace).

    POD is NAMESPACE/NAME, or NAME when it is unambiguous.

    \b
    Example:
      meshlet lab exec batch/batch-client -- .venv/bin/python -m agent.lab.client tcp 10.96.10.10 80 --count 50
    """
    target = _lab_from(name).pod(pod)
    target.exec_here(list(command))


@lab.command()
@click.option("--name", default=None, help="one lab [default: every lab that is up]")
@click.option("-o", "output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status(name, output):
    """Show the labs that are up and their pods.

    \b
    Example:
      meshlet lab status -o json
    """
    names = [name] if name else list_labs()
    labs = [_status(load_state(n)) for n in names]
    if output == "json":
        click.echo(json.dumps(labs, indent=1))
        return
    if not labs:
        click.echo("no lab is up (meshlet lab up)")
    for entry in labs:
        click.echo(f"lab {entry['name']}: cgroup root {entry['cgroup_root']}, node netns {entry['node_netns']}")
        rows = [("POD", "IPV4", "IPV6", "UID", "ECHO")]
        rows += [(p["pod"], p["ipv4"] or "-", p["ipv6"] or "-", p["uid"], p["echo"]) for p in entry["pods"]]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _status(state: dict) -> dict:
    from agent.lab.pods import NETNS_DIR, Pod

    pods = []
    for data in state["pods"]:
        pod = Pod.from_json(data)
        alive = pod.echo_pid is not None and os.path.exists(f"/proc/{pod.echo_pid}")
        pods.append({
            "pod": pod.ref, "uid": pod.uid, "ipv4": pod.ipv4, "ipv6": pod.ipv6,
            "netns": pod.netns, "netns_present": os.path.exists(os.path.join(NETNS_DIR, pod.netns)),
            "cgroup": pod.cgroup, "echo": ("up " if alive else "down ") + ",".join(map(str, pod.echo_ports)),
        })
    return {"name": state["name"], "cgroup_root": state["cgroup_root"],
            "node_netns": state["node_netns"], "pods": pods}
