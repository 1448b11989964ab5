"""Which malloc a training process uses: glibc's (system) or jemalloc (training.allocator).

    training:
      allocator: auto        # jemalloc when it is installed, else the system's; or system | jemalloc

Why it matters on a CPU: a training step frees and allocates hundreds of large tensors of
varying sizes. glibc's malloc hands big freed blocks back to the kernel and maps them again
on the next step, and every fresh page costs a fault and zeroing; the heap also fragments,
so memory grows. jemalloc keeps such blocks in its own arenas. Measured on the quick start
(150 steps, 2 cores, same losses step for step): glibc 2.58 s/step, with throughput falling
from 298 to 222 tokens/s as the run went on, and 4.35 GB peak RSS; jemalloc 1.83 s/step,
flat, and 2.86 GB (bench/README.md has the benchmark rows).

A process's allocator is fixed when it starts, so the only way in is LD_PRELOAD at exec time:
the entry points (training/train.py, quick_start.py, the `zhlora` command) start themselves
again, once, with LD_PRELOAD naming libjemalloc. PyTorch's own CPU launcher does the same
(`python -m torch.backends.xeon.run_cpu --enable-jemalloc`). Code that calls zhlora from
Python (the tests, a notebook) is never re-executed: there the choice has no effect.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

from zhlora.config import ConfigError

CHOICES = ("system", "auto", "jemalloc")
MARK = "ZHLORA_ALLOCATOR"  # set in the re-executed process: never start again


def find_jemalloc() -> str | None:
    """The jemalloc shared library the dynamic linker can load (libjemalloc.so.2), or None."""
    return os.environ.get("ZHLORA_JEMALLOC") or ctypes.util.find_library("jemalloc")


def active() -> str:
    """The allocator this process runs with: jemalloc when LD_PRELOAD loaded it, else system."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def use(choice: str) -> None:
    """Re-execute this process with jemalloc preloaded when `choice` asks for it and it is not
    loaded yet. Returns only when no re-execution is needed (or jemalloc is absent under auto)."""
    if choice == "system" or active() == "jemalloc" or os.environ.get(MARK):
        return
    library = find_jemalloc()
    if library is None:
        if choice == "jemalloc":
            raise ConfigError("training.allocator=jemalloc: libjemalloc was not found; install it "
                              "(Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc), "
                              "name it in ZHLORA_JEMALLOC=/path/libjemalloc.so.2, or set "
                              "training.allocator=system")
        print("[zhlora] training.allocator=auto: jemalloc is not installed, using the system allocator "
              "(apt install libjemalloc2 makes CPU training faster and leaner)", flush=True)
        return
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, MARK: "jemalloc"}
    print(f"[zhlora] training.allocator={choice}: starting again with jemalloc ({library})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
