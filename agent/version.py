"""What build of meshlet this is: its version and git revision (`meshlet --version`, and the
`meshlet_build_info` metric beside the kernel release and the map layout version).

May touch: the package metadata, $MESHLET_GIT_REVISION, and `git` in the checkout the code runs
from (read only). An image has no .git: its build sets MESHLET_GIT_REVISION.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

UNKNOWN = "unknown"


def version() -> str:
    """The package version (pyproject.toml)."""
    try:
        return importlib.metadata.version("meshlet")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


@functools.cache
def git_revision() -> str:
    """The commit this code is from: $MESHLET_GIT_REVISION, else `git rev-parse` of the checkout
    (with "-dirty" when it has local changes), else "unknown"."""
    given = os.environ.get("MESHLET_GIT_REVISION", "").strip()
    if given:
        return given
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return UNKNOWN
    try:
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN
    if head.returncode != 0 or not head.stdout.strip():
        return UNKNOWN
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
