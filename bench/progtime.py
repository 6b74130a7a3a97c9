"""The kernel's own per-program counters, for the bench rows that report time inside our programs.

With kernel.bpf_stats_enabled on, the kernel adds up each program's run time and run count (two
clock reads per run, paid by the meshlet figures alone: they are, if anything, a little
pessimistic) and shows them in the program fd's fdinfo. One home for reading them and for turning
them on for a run (restored at the lab's close).
"""

from __future__ import annotations

from pathlib import Path

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program we hold an fd of; (0, 0) while the kernel counts nothing."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                  if ":" in line)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def enable_program_stats(lab) -> bool:
    """Turn the counters on until `lab` (bench.topology.Lab) closes; False when this kernel or
    sandbox does not let us."""
    try:
        old = STATS_SYSCTL.read_text().strip()
        STATS_SYSCTL.write_text("1")
    except OSError:
        return False
    lab.on_close("kernel.bpf_stats_enabled", lambda: STATS_SYSCTL.write_text(old))
    return True
