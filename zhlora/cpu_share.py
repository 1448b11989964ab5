"""Did anything else use the CPU while this run was timed? A timing is only reported from a run
that had the machine to itself (docs/guide.md prints no time or memory figure of a shared run).

    share = CpuShare()        # at the start of what is timed
    ...
    share.others(processes)   # at the end: the share of all cores' time that other programs used

Linux counts every core's busy time since boot in /proc/stat (the first line, in clock ticks);
this process's own CPU time is os.times(). What the machine was busy with beyond our own
processes, divided by what all cores could have done in the wall time, is the share others took.
Data-parallel ranks are sibling processes that each do the same work, so a run of N processes
on this machine (LOCAL_WORLD_SIZE) counts N times this one's CPU time as its own. Where /proc/stat is missing (macOS, Windows)
the share is unknown (None), and a report treats unknown like shared.
"""
from __future__ import annotations

import os
import time

SHARED_ABOVE = 0.05  # others took more than 5% of all cores: timings of the run are not reported
# (an idle 2-core machine measures about 0.01: the system's own daemons)


def busy_seconds() -> float | None:
    """All cores' busy time since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuShare:
    def __init__(self):
        self.wall, self.busy, self.own = time.perf_counter(), busy_seconds(), own_seconds()

    def others(self, processes: int = 1) -> float | None:
        """The share (0-1) of all cores' time since __init__ that went to other programs."""
        busy = busy_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        theirs = (busy - self.busy) - processes * (own_seconds() - self.own)
        return round(max(0.0, theirs) / (wall * cores()), 4)


def is_shared(share: float | None) -> bool:
    """True when a run's timings should not be reported: others took too much, or it is unknown."""
    return share is None or share > SHARED_ABOVE
