"""Did anything else use the CPU while this run was timed? A timing is only reported from a run
that had the machine to itself (docs/guide.md prints no time or memory figure of a shared run).

    share = CpuShare()        # at the start of what is timed
    ...
    share.others(processes)   # at the end: the share of all cores' time that other programs used

Linux counts each core's busy time since boot in /proc/stat (a cpuN line each, in clock ticks);
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


def busy_seconds(stat_text: str | None = None, allowed: set[int] | None = None) -> float | None:
    """Busy time since boot (user, nice, system, irq, softirq, steal) of the cores this process may
    run on, or None. Only those cores count: in a container or under taskset, /proc/stat's first
    line also sums cores we never run on, and others' work there does not slow us down."""
    if stat_text is None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                stat_text = f.read()
        except OSError:
            return None
    allowed = allowed_cores() if allowed is None else allowed
    ticks, found = 0, False
    for line in stat_text.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
            ticks += user + nice + system + irq + softirq + steal
            found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def allowed_cores() -> set[int]:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def cores() -> int:
    return len(allowed_cores())


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
        return others_share(busy - self.busy, processes * (own_seconds() - self.own), wall, cores())


def others_share(busy: float, own: float, wall: float, n_cores: int) -> float:
    """What the cores were busy with beyond our own time, as a share of what they could have done.
    Both busy times are counted in clock ticks (10 ms), so over a window of a few ticks the rounding
    alone can put the share below 0 or above 1; it is kept within them, since others can take
    neither less than nothing nor more than every core."""
    if wall <= 0:
        return 0.0
    return round(min(1.0, max(0.0, busy - own) / (wall * n_cores)), 4)


def is_shared(share: float | None) -> bool:
    """True when a run's timings should not be reported: others took too much, or it is unknown."""
    return share is None or share > SHARED_ABOVE
