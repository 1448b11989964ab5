"""The quick start end to end, several times: its time per stage as the median of the runs that had
the CPU alone, and evaluation's share of the whole (the speed issue asks for at most a quarter).

    python bench/quick_start.py                  # 3 runs, ~21 min on 2 CPU cores -> bench/results/quick_start.json
    python bench/quick_start.py --repeats 1      # one run

Each run is `python quick_start.py` from scratch in its own folder, bench/.work/quick_start/runN/
(its data made again, a new adapter trained, evaluated, plotted and demoed), so no run reuses
another's data or outputs. The stage times are the ones each run writes to quick_start_timing.json;
a run during which other programs took more than cpu_share.SHARED_ABOVE of the CPU is kept in
`runs` but left out of the medians (the timing rule of docs/guide.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from common import REPO, WORK, idle_runs, machine, run_measured, write_result

STAGES = ("prepare", "train", "evaluate", "plot", "demo", "total")


def one_run(folder: Path) -> dict:
    """`python quick_start.py` with its data and outputs in `folder` (paths relative to the repo)."""
    shutil.rmtree(REPO / folder, ignore_errors=True)
    data = folder / "data"
    overrides = [f"output.dir={folder / 'outputs'}",
                 *(f"data.{split}_file={data / f'{split}.json'}" for split in ("train", "val", "test"))]
    measured = run_measured([sys.executable, "quick_start.py", *overrides], REPO / folder.parent / f"{folder.name}.log")
    timing = json.loads((REPO / folder / "outputs" / "quick_start_timing.json").read_text(encoding="utf-8"))
    return {**timing, "evaluate_share": timing["evaluate"] / timing["total"], "peak_rss_mb": measured["peak_rss_mb"]}


def medians(runs: list[dict]) -> dict:
    """Median and [min, max] of each stage over the runs that had the CPU alone; None when none did."""
    kept = idle_runs(runs)
    out = {"repeats": len(kept), "dropped": len(runs) - len(kept)}
    for key in (*STAGES, "evaluate_share"):
        values = [r[key] for r in kept]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_range"] = [min(values), max(values)] if values else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = (WORK / "quick_start").relative_to(REPO)
    runs = []
    for i in range(1, args.repeats + 1):
        runs.append(one_run(work / f"run{i}"))
        print(f"[bench] run {i}: " + ", ".join(f"{k} {runs[-1][k]:.1f} s" for k in STAGES)
              + f"; evaluate {runs[-1]['evaluate_share']:.1%} of the total; others' CPU share {runs[-1]['cpu_others_share']}")
    result = medians(runs)
    write_result("quick_start", {"machine": machine(), **result, "runs": runs})
    if result["repeats"]:
        low, high = result["evaluate_share_range"]
        print(f"[bench] {result['repeats']} idle runs: total {result['total']:.1f} s (range {result['total_range'][0]:.1f}"
              f"-{result['total_range'][1]:.1f}); evaluate {result['evaluate']:.1f} s = {result['evaluate_share']:.1%} "
              f"of the total (range {low:.1%}-{high:.1%}; target at most 25%)")
    else:
        print("[bench] every run shared the CPU with other programs: no figure is reported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
