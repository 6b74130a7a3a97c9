"""Test-wide settings.

Kernel tests (marked `kernel`) need root, bcc, bpffs and cgroup2; they attach only to cgroup
subtrees and network namespaces they make themselves. Where those are missing they skip with the
reason, except when MESHLET_REQUIRE_KERNEL=1 (set by .ci/run): then a missing prerequisite fails
the run, so CI can never pass by skipping the tests that matter.
"""

import os

import pytest


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run scripts/setup.sh and use .venv/bin/python)"
    if not any(line.split()[2] == "cgroup2" for line in open("/proc/mounts")):
        return "no cgroup2 mount"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MESHLET_REQUIRE_KERNEL") == "1":
        raise pytest.UsageError(f"kernel tests required but cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"kernel test: {reason}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)
