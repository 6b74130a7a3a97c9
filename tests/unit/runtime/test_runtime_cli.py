"""`meshlet run` flags and settings, and the log line formats."""

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import logs
from agent.errors import UserError
from agent.runtime.cli import build_settings
from agent.runtime.settings import DEFAULT_BPFFS, default_cgroup_root, parse_listen


@pytest.fixture
def cgroup_dir(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("")
    return root


def settings(**kw):
    args = dict(manifests=None, kubeconfig=None, node_name="n1", cgroup_root=None, bpffs=DEFAULT_BPFFS,
                listen="127.0.0.1:9966", log_format="kv")
    args.update(kw)
    return build_settings(**args)


def test_defaults_and_flags(tmp_path, cgroup_dir, monkeypatch):
    monkeypatch.setenv("NODE_NAME", "from-env")
    s = settings(manifests=tmp_path, node_name=None, cgroup_root=cgroup_dir)
    assert s.node_name == "from-env" and s.manifests == tmp_path and s.listen == ("127.0.0.1", 9966)
    assert s.bpffs == DEFAULT_BPFFS and s.kubeconfig is None


@pytest.mark.parametrize("kw, message", [
    ({"manifests": "missing"}, "--manifests .* is not a directory"),
    ({"kubeconfig": "missing"}, "--kubeconfig .* is not a file"),
    ({"listen": "9966"}, "not ADDR:PORT"),
    ({"listen": "localhost:9966"}, "not an IP address"),
])
def test_bad_flags_are_one_line_user_errors(tmp_path, cgroup_dir, kw, message):
    kw = {k: (tmp_path / v if k in ("manifests", "kubeconfig") else v) for k, v in kw.items()}
    with pytest.raises(UserError, match=message):
        settings(cgroup_root=cgroup_dir, **kw)


def test_manifests_and_kubeconfig_exclude_each_other(tmp_path, cgroup_dir):
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text("")
    with pytest.raises(UserError, match="exclude each other"):
        settings(manifests=tmp_path, kubeconfig=kubeconfig, cgroup_root=cgroup_dir)


def test_cgroup_root_must_be_cgroup2(tmp_path):
    with pytest.raises(UserError, match="not a cgroup2 directory"):
        settings(manifests=tmp_path, cgroup_root=tmp_path)


def test_cgroup2_root_comes_from_proc_mounts(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("sysfs /sys sysfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert str(default_cgroup_root(str(mounts))) == "/sys/fs/cgroup/unified"
    mounts.write_text("sysfs /sys sysfs rw 0 0\n")
    with pytest.raises(UserError, match="no cgroup2"):
        default_cgroup_root(str(mounts))


def test_listen_accepts_ipv6_and_port_zero():
    assert parse_listen("[::1]:0") == ("::1", 0)


def _log_line(fmt):
    out = io.StringIO()
    logs.configure(fmt, stream=out)
    try:
        logs.get_logger("loop").info("sync.done", mode="full", seconds=0.25, note="two words")
        logging.getLogger("agent.other").warning("plain %s", "text")
    finally:
        logs.configure("kv")
    return out.getvalue().splitlines()


def test_key_value_log_lines():
    event, plain = _log_line("kv")
    assert " level=info component=loop event=sync.done mode=full seconds=0.25 note=\"two words\"" in event
    assert 'event=log msg="plain text"' in plain


def test_json_log_lines():
    event, plain = (json.loads(line) for line in _log_line("json"))
    assert event["event"] == "sync.done" and event["seconds"] == 0.25 and event["component"] == "loop"
    assert plain["msg"] == "plain text" and plain["level"] == "warning"


def test_manifests_mode_never_imports_the_kubernetes_client():
    code = ("import sys, agent.runtime.cli, agent.sources.manifests, agent.sources.cgroups; "
            "print('kubernetes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_unreadable_kubeconfig_is_a_user_error(tmp_path):
    from agent.runtime.cli import kube_api_client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(UserError, match="cannot load the Kubernetes config from --kubeconfig .*hint"):
        kube_api_client(kubeconfig)


class RecordingStatusWriter:
    """Stand-in for agent.runtime.status_writer.StatusWriter: records passes, can fail some."""

    def __init__(self, fail: int = 0):
        import threading

        self.passes: list[dict] = []
        self.forgets = 0
        self.fail = fail
        self.event = threading.Event()

    def forget(self):
        self.forgets += 1

    def write(self, statuses):
        self.passes.append(dict(statuses))
        self.event.set()
        if self.fail:
            self.fail -= 1
            raise RuntimeError("API server away (stand-in)")


def test_status_publisher_writes_only_while_leading_and_retries():
    from agent.model import RouteId
    from agent.runtime.cli import StatusPublisher
    from agent.runtime.metrics import Metrics

    writer = RecordingStatusWriter(fail=1)
    metrics = Metrics()
    publisher = StatusPublisher(writer, metrics)
    publisher.RETRY_INITIAL = 0.05
    publisher.start()
    try:
        publisher.publish({RouteId("HTTPRoute", "mesh", "r"): "status-1"})
        assert not writer.event.wait(0.3), "a standby agent never writes status"
        publisher.started_leading()
        deadline = time.monotonic() + 30  # generous: a loaded machine is slow at times
        while len(writer.passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(writer.passes) == 2, "a failed pass is retried"
        assert writer.forgets == 1
        assert metrics.registry.get_sample_value("meshlet_leader") == 1
        publisher.stopped_leading()
        writer.event.clear()
        publisher.publish({RouteId("HTTPRoute", "mesh", "r"): "status-2"})
        assert not writer.event.wait(0.3)
        assert metrics.registry.get_sample_value("meshlet_leader") == 0
    finally:
        publisher.stop()


def test_a_cgroup2_mount_point_with_a_space_is_found(tmp_path):
    # /proc/mounts writes a space in a mount point as \040 (agent.mounts decodes it).
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /run/my\\040cgroup cgroup2 rw 0 0\n")
    assert str(default_cgroup_root(str(mounts))) == "/run/my cgroup"


def test_map_sizes_are_parsed_with_defaults_for_the_rest():
    from agent.datapath.layout import MapSizes
    from agent.runtime.settings import parse_map_sizes

    sizes = parse_map_sizes(["frontends=1000", "endpoints = 2_000"])
    assert sizes == MapSizes(frontends=1000, endpoints=2000)
    assert parse_map_sizes([]) == MapSizes()


@pytest.mark.parametrize("text, words", [
    ("frontend=10", "NAME=ENTRIES with NAME one of frontends, groups"),
    ("frontends", "NAME=ENTRIES"),
    ("frontends=many", "not a whole number"),
    ("frontends=0", "from 1 to"),
    ("frontends=99999999999", "from 1 to"),
])
def test_a_bad_map_size_is_one_clear_error(text, words):
    from agent.errors import UserError
    from agent.runtime.settings import parse_map_sizes

    with pytest.raises(UserError) as err:
        parse_map_sizes([text])
    assert words in str(err.value) and "--map-size" in str(err.value)


def test_run_help_lists_each_map_size_and_its_kernel_memory():
    from click.testing import CliRunner

    from agent.datapath.layout import SIZED_MAPS
    from agent.runtime.cli import run

    out = CliRunner().invoke(run, ["--help"]).output
    assert "--map-size NAME=ENTRIES" in out
    for name in SIZED_MAPS:
        assert f"  {name} " in out
    assert "MiB up front" in out


def test_resize_refusal_says_both_ways_on():
    from agent.datapath.loader import resize_refusal

    text = resize_refusal("/sys/fs/bpf/meshlet/v3/maps", [("frontends", 131072, 1000)])
    assert "frontends 1000 (pinned: 131072)" in text
    assert "start with --map-size frontends=131072 to keep serving" in text
    assert "`meshlet uninstall`" in text and "then start with --map-size frontends=1000" in text


@pytest.mark.parametrize("argv, on", [([], True), (["--passive-health", "on"], True), (["--passive-health", "off"], False)])
def test_passive_health_flag_reaches_the_settings_and_the_resolver(cgroup_dir, monkeypatch, argv, on):
    from click.testing import CliRunner

    from agent.runtime import cli

    seen = {}

    class Recorder:
        def __init__(self, s):
            seen["settings"] = s

        def run(self):
            return 0

    monkeypatch.setattr(cli, "Agent", Recorder)
    done = CliRunner().invoke(cli.run, ["--cgroup-root", str(cgroup_dir), "--node-name", "n1", *argv])
    assert done.exit_code == 0, done.output
    assert seen["settings"].passive_health is on


def test_version_and_build_info_say_the_same_build():
    import platform
    import subprocess
    import sys

    from agent.datapath.layout import LAYOUT_VERSION
    from agent.runtime.metrics import Metrics
    from agent.version import git_revision, version

    done = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == (f"meshlet {version()} (git {git_revision()}, map layout v{LAYOUT_VERSION}, "
                           f"kernel {platform.release()})\n")
    assert version() != "unknown"
    if (Path(__file__).resolve().parents[3] / ".git").exists():
        assert git_revision() != "unknown"  # a checkout: git knows the commit
    labels = {"version": version(), "revision": git_revision(), "kernel": platform.release(),
              "layout_version": str(LAYOUT_VERSION)}
    assert Metrics().registry.get_sample_value("meshlet_build_info", labels) == 1


def test_tcp_termination_is_off_unless_asked(tmp_path, cgroup_dir):
    from click.testing import CliRunner

    from agent.runtime.cli import run

    assert settings(manifests=tmp_path, cgroup_root=cgroup_dir).terminate_tcp is False
    assert settings(manifests=tmp_path, cgroup_root=cgroup_dir, terminate_tcp=True).terminate_tcp is True
    out = CliRunner().invoke(run, ["--help"]).output
    assert "--terminate-tcp BOOL" in out and "[default: False]" in out.split("--terminate-tcp", 1)[1]
