"""The `meshlet` command line: a thin shell over the subcommands that live beside their code.

The command names and flags are a contract (DESIGN.md, "The command line"): scripts and tests
outside the project rely on them. Subcommands are imported lazily so that `meshlet maps dump`
never pays for the Kubernetes client, and `meshlet --help` works on a machine without bcc.
Errors a user can meet are printed as one line with a hint (agent.errors.UserError), never a
traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from agent.errors import UserError

#: command name -> "module:attribute" of the click command or group
SUBCOMMANDS = {
    "run": "agent.runtime.cli:run",
    "maps": "agent.datapath.cli:maps",
    "explain": "agent.explain:explain",
    "uninstall": "agent.datapath.cli:uninstall",
    "trace": "agent.datapath.cli:trace",
    "lab": "agent.lab.cli:lab",
    "demo": "agent.lab.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


def _print_version(ctx, _param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from agent.runtime.metrics import build_info  # the same facts as meshlet_build_info

    info = build_info()
    click.echo(f"meshlet {info['version']} (git {info['revision']}, map layout v{info['layout_version']}, "
               f"kernel {info['kernel']})")
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version, git revision, map layout version and kernel, then exit.")
def cli():
    """meshlet: Kubernetes Service routing in the kernel, at the cgroup socket hooks.

    \b
    Example:
      meshlet run --manifests examples/demo --cgroup-root /sys/fs/cgroup/meshlet-lab
      meshlet maps dump frontends -o json
    """


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as err:
        click.echo(f"meshlet: error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
