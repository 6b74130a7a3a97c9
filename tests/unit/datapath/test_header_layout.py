"""bpf/meshlet.h and its ctypes mirrors (agent/datapath/layout.py) agree, without root or bcc.

The system C compiler compiles a small program that includes the header and prints sizeof and
offsetof of every field each mirror declares (the mirror names its C struct on its docstring's
first line); the test compares them with ctypes' view. The kernel test
test_every_mirror_matches_the_struct_bcc_compiled checks the same against what bcc compiled,
as root; this one runs everywhere a C compiler is installed.
"""

import ctypes as ct
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.datapath import layout as L
from agent.model import MAX_BACKEND_REFS

HEADER_DIR = Path(__file__).resolve().parents[3] / "bpf"


def mirrors() -> dict[str, type]:
    """C struct name -> its mirror, for every Structure in layout."""
    out = {}
    for value in vars(L).values():
        if isinstance(value, type) and issubclass(value, ct.Structure) and value.__doc__:
            match = re.match(r"\s*struct (\w+)", value.__doc__)
            if match:
                out[match.group(1)] = value
    return out


def compiled_layout(tmp_path, structs: dict[str, type]) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    """struct -> (sizeof, [(path, offsetof, sizeof field)]) as the C compiler sees the header."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) to compile bpf/meshlet.h with")
    lines = ["#include <linux/types.h>", "#include <stddef.h>", "#include <stdio.h>", '#include "meshlet.h"',
             "int main(void) {"]
    for name, mirror in structs.items():
        lines.append(f'    printf("{name} - 0 %zu\\n", sizeof(struct {name}));')
        for path, _offset, _size in L.field_layout(mirror):
            lines.append(f'    printf("{name} {path} %zu %zu\\n", offsetof(struct {name}, {path}), '
                         f"sizeof(((struct {name} *)0)->{path}));")
    lines += ["    return 0;", "}"]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "layout"
    subprocess.run([compiler, "-I", str(HEADER_DIR), "-o", str(binary), str(source)], check=True,
                   capture_output=True, timeout=120)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=60).stdout
    out: dict[str, tuple[int, list]] = {}
    for line in printed.splitlines():
        name, path, first, *rest = line.split()
        if path == "-":
            out[name] = (int(rest[0]), [])
        else:
            out[name][1].append((path, int(first), int(rest[0])))
    return out


def test_every_mirror_has_the_sizes_and_offsets_the_compiler_gives_the_header(tmp_path):
    structs = mirrors()
    assert {"fe_key", "fe_value", "group_value", "ep_key", "ep_value", "client_value",
            "sock_state"} <= set(structs), "every map struct is mirrored and names its C struct"
    compiled = compiled_layout(tmp_path, structs)
    for name, mirror in structs.items():
        size, fields = compiled[name]
        assert size == ct.sizeof(mirror), f"sizeof(struct {name})"
        assert fields == L.field_layout(mirror), f"struct {name}: offsets or sizes differ from {mirror.__name__}"


def test_the_backend_ref_limit_is_the_datapath_split_width():
    # A Route rule is refused above MAX_BACKEND_REFS (resolve); the maps hold MAX_SLOTS shares.
    assert L.MAX_SLOTS == MAX_BACKEND_REFS
