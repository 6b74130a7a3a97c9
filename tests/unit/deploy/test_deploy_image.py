"""The Dockerfile and the image's entrypoint, checked as text (fast, no container engine).

The image itself is built and run as the DaemonSet runs it by
tests/kernel/runtime/test_runtime_image.py (podman). Here the
Dockerfile is read as text: the base image of both stages, the packages (nothing in the final
stage that only the build needs), the venv with the system site packages (bcc is Debian's), every
COPY source present in the repository, the labels, a non-root default user, and an entrypoint that
ends in the real `meshlet` console script. The entrypoint script itself runs here (it is plain sh): its header
preflight must refuse a missing header tree with the fix, and pass the rest through to meshlet.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import yaml

from agent.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "image" / "entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, FROM first."""
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def test_both_stages_build_on_debian_bookworm_slim():
    assert args_of("FROM") == ["debian:bookworm-slim AS build", "debian:bookworm-slim"]


def test_build_stage_makes_a_venv_that_sees_debians_bcc():
    build = [rest for word, rest in stages()[0] if word == "RUN"]
    run_venv = next(rest for rest in build if "venv" in rest and "pip install" in rest)
    assert "-m venv --system-site-packages /opt/meshlet/venv" in run_venv
    assert "--no-cache-dir" in run_venv and "pip uninstall" in run_venv


def test_final_stage_installs_what_runs_and_nothing_only_the_build_needs():
    final = stages()[-1]
    run_apt = next(rest for word, rest in final if word == "RUN" and "apt-get install" in rest)
    assert "--no-install-recommends" in run_apt and "rm -rf /var/lib/apt/lists/*" in run_apt
    packages = set(run_apt.split())
    assert {"python3", "python3-bpfcc", "util-linux", "iproute2", "ca-certificates"} <= packages
    assert not packages & {"python3-venv", "python3-pip", "build-essential", "gcc", "clang"}
    assert ("COPY", "--from=build /opt/meshlet /opt/meshlet") in final
    assert any(word == "RUN" and "import bcc, agent.cli" in rest for word, rest in final)


def test_the_host_ca_bundle_reaches_pip_in_the_build_stage_only():
    """scripts/image.sh mounts the host's bundle for the build; no layer of the image keeps it."""
    text = DOCKERFILE.read_text()
    assert "HOST_CA_BUNDLE" in "".join(rest for _, rest in stages()[0])
    assert "HOST_CA_BUNDLE" not in "".join(rest for _, rest in stages()[-1])
    assert not re.search(r"^(COPY|ADD)\s.*(\.crt|\.pem)", text, re.M)


def test_every_copy_source_is_in_the_repository_and_not_docker_ignored():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for rest in args_of("COPY"):
        if rest.startswith("--from="):
            continue  # from the build stage, not the repository
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source.split("/")[0] not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_bpf_sources_ship_beside_the_agent_package():
    """The loader finds bpf/ as the agent package's sibling: the image must keep that shape."""
    copies = {shlex.split(rest)[0]: shlex.split(rest)[-1] for rest in args_of("COPY")}
    assert copies["agent"] == "./agent" and copies["bpf"] == "./bpf"
    assert args_of("WORKDIR") == ["/opt/meshlet"]
    assert any(" -e ." in rest for rest in args_of("RUN"))  # editable: agent/ stays in /opt/meshlet, beside bpf/


def test_version_labels():
    labels = " ".join(args_of("LABEL"))
    for key in ("version", "revision", "source", "title"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels


def test_default_user_is_not_root_and_the_daemonset_opts_into_root():
    (user,) = args_of("USER")
    assert user not in ("0", "root")
    ds = next(d for d in yaml.safe_load_all((REPO / "daemonset" / "daemonset.yaml").read_text()) if d)
    agent = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    assert agent["securityContext"]["runAsUser"] == 0


def test_entrypoint_runs_the_real_meshlet_console_script():
    (entrypoint,) = args_of("ENTRYPOINT")
    (copy,) = [rest for rest in args_of("COPY") if rest.startswith("image/entrypoint.sh ")]
    assert json.loads(entrypoint) == [copy.split()[1]]  # JSON form, the path the script is copied to
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["meshlet"] == "agent.cli:main"
    assert "${MESHLET_BIN:-/opt/meshlet/venv/bin/meshlet}" in ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK)


def test_daemonset_commands_are_meshlet_subcommands_or_node_init():
    for path in (REPO / "daemonset").rglob("daemonset.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = doc["spec"]["template"]["spec"]
            for ctr in pod.get("initContainers", []) + pod["containers"]:
                if "command" in ctr:
                    continue  # overrides the entrypoint (the uninstall pod's `sleep`)
                assert ctr["args"][0] in set(SUBCOMMANDS) | {"node-init"}, (path.name, ctr["name"])


def run_entrypoint(*args, release="0.0.0-missing", tmp_path=None):
    env = dict(os.environ, MESHLET_KERNEL_RELEASE=release, MESHLET_BIN="echo",
               MESHLET_MODULES_DIR=str(tmp_path))
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=30)


def test_preflight_explains_missing_kernel_headers(tmp_path):
    done = run_entrypoint("run", "--node-name=n1", tmp_path=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert "no kernel headers for Linux 0.0.0-missing" in done.stderr
    assert "apt-get install linux-headers-0.0.0-missing" in done.stderr


def test_preflight_names_a_dangling_headers_link(tmp_path):
    (tmp_path / "6.1.0-9-amd64").mkdir()
    (tmp_path / "6.1.0-9-amd64" / "build").symlink_to("/nonexistent/linux-headers-6.1.0-9-amd64")
    done = run_entrypoint("run", release="6.1.0-9-amd64", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "points at /nonexistent/linux-headers-6.1.0-9-amd64, which is not in the container" in done.stderr


def test_with_headers_present_run_reaches_meshlet_unchanged(tmp_path):
    (tmp_path / "6.1.0-9-amd64" / "build" / "include" / "linux").mkdir(parents=True)
    (tmp_path / "6.1.0-9-amd64" / "build" / "include" / "linux" / "kconfig.h").touch()
    done = run_entrypoint("run", "--node-name=n1", release="6.1.0-9-amd64", tmp_path=tmp_path)
    assert (done.returncode, done.stdout) == (0, "run --node-name=n1\n")


def test_other_commands_need_no_headers(tmp_path):
    done = run_entrypoint("uninstall", "--bpffs=/sys/fs/bpf/meshlet", tmp_path=tmp_path)
    assert (done.returncode, done.stdout) == (0, "uninstall --bpffs=/sys/fs/bpf/meshlet\n")
