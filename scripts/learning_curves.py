"""Learning curves of the quick start's tasks: what the quick-start settings were chosen from.

    python scripts/learning_curves.py              # run the sweep (resumes), then write the files below
    python scripts/learning_curves.py --no_run     # only re-read finished runs and redraw

Runs configs/experiments/learning_curves.yaml (each point a separate training run with its own
schedule, every held-out row scored by teacher forcing) into runs/learning_curves/, then writes:
  docs/results/data/learning_curves/curves.json  one row per point: settings, steps, exact match
                                                 and its paired difference to the quick start's
                                                 setting (bootstrap over the same test rows), exact
                                                 match per task with its 95% Wilson
                                                 interval, and the mean over the scored tasks
  docs/results/learning_curves.png               exact match against steps per task, and the other
                                                 settings at their step counts
No timing is kept: the sweep may share the CPU with other work; per-step times come from an
idle-machine measurement (bench/train_throughput.py) instead.
scripts/make_reports.py turns curves.json into the guide's learning-curve table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "configs/experiments/learning_curves.yaml"
CURVES = Path("docs/results/data/learning_curves/curves.json")
FIGURE = Path("docs/results/learning_curves.png")


def read_point(folder: Path) -> dict:
    """One finished run folder as a curves.json row."""
    from zhlora.config import load_config
    from zhlora.metrics import SCORED_APART, wilson_ci

    cfg = load_config(folder / "config.yaml")
    summary = json.loads((folder / "train_summary.json").read_text("utf-8"))
    results = json.loads((folder / "evaluation_results.json").read_text("utf-8"))
    tasks = {}
    for task, row in results["per_task"].items():
        if "exact_match" in row:
            tasks[task] = {"n": row.get("n_exact", row["n"]), "exact_match": row["exact_match"], "ci": row["exact_match_ci"]}
    scored = [t for t in tasks if t not in SCORED_APART]
    hits = round(sum(tasks[t]["exact_match"] * tasks[t]["n"] for t in scored))
    rows = sum(tasks[t]["n"] for t in scored)
    return {"point": folder.parent.name, "method": cfg.training.method,
            "target_modules": ",".join(cfg.lora.target_modules) if cfg.training.method == "lora" else "-",
            "learning_rate": cfg.training.learning_rate, "steps": summary["steps"],
            "exact_match": hits / rows, "exact_match_ci": list(wilson_ci(hits, rows)), "rows": rows,
            "task_mean": sum(tasks[t]["exact_match"] for t in scored) / len(scored),
            "test_loss": results.get("test_loss"), "tasks": tasks}


def row_hits(folder: Path) -> list[float | None]:
    """Per test row: 1/0 exact match of the rows the headline counts (None for the others)."""
    from zhlora.metrics import SCORED_APART

    lines = (folder / "predictions.jsonl").read_text("utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return [None if r["exact_match"] is None or r["task"] in SCORED_APART else float(r["exact_match"]) for r in rows]


def collect(runs: Path) -> list[dict]:
    """Every finished point, with its paired difference to the quick start's setting (REFERENCE)."""
    from zhlora.metrics import paired_bootstrap_ci

    folders = [f.parent for f in sorted(runs.glob("*/seed*/evaluation_results.json"))]
    points = [read_point(folder) for folder in folders]
    reference = next((f for f, p in zip(folders, points) if is_reference(p)), None)
    for folder, point in zip(folders, points):
        if reference is not None and folder != reference:
            mine, ref = row_hits(folder), row_hits(reference)  # the same test rows, in file order
            diffs = [a - b for a, b in zip(mine, ref) if a is not None and b is not None]
            point["diff_vs_reference"] = sum(diffs) / len(diffs)
            point["diff_ci"] = list(paired_bootstrap_ci(mine, ref))
    return sorted(points, key=lambda p: (p["method"], p["target_modules"], p["learning_rate"], p["steps"]))


def is_reference(point: dict) -> bool:
    """configs/quick_start.yaml's setting: all-linear LoRA, lr 1e-3, 200 steps."""
    return is_main_curve(point) and point["steps"] == 200


def is_main_curve(point: dict) -> bool:
    """The steps sweep: all-linear LoRA at lr 1e-3 (the quick start's setting)."""
    return point["method"] == "lora" and point["target_modules"] == "all-linear" and point["learning_rate"] == 1e-3


def plot(points: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from zhlora.files import save_png
    from zhlora.plots import chinese_labels

    main = sorted((p for p in points if is_main_curve(p)), key=lambda p: p["steps"])
    others = [p for p in points if not is_main_curve(p)]
    with chinese_labels() as label:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        for task in main[0]["tasks"] if main else []:
            steps = [p["steps"] for p in main]
            values = [p["tasks"][task]["exact_match"] for p in main]
            low = [p["tasks"][task]["ci"][0] for p in main]
            high = [p["tasks"][task]["ci"][1] for p in main]
            line, = left.plot(steps, values, marker="o", label=task)
            left.fill_between(steps, low, high, color=line.get_color(), alpha=0.12)
        left.set(xlabel=label("训练步数（batch 8）", "steps, batch 8"), ylim=(0, 1.02),
                 ylabel=label("测试集精确匹配", "test exact match"),
                 title=label("all-linear, 学习率 1e-3：每类任务", "all-linear, lr 1e-3, per task"))
        left.set_xticks([p["steps"] for p in main], [str(p["steps"]) for p in main])
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        # One row per setting: several settings share 200 steps, so an x axis of steps would stack them.
        ordered = main + others
        for y, p in enumerate(ordered):
            lo, hi = p["exact_match_ci"]
            right.errorbar(p["exact_match"], y, xerr=[[p["exact_match"] - lo], [hi - p["exact_match"]]],
                           fmt="o" if is_main_curve(p) else "s", capsize=3, color="C0" if is_reference(p) else "C7")
        names = [("全量微调 full" if p["method"] == "full" else f"{p['target_modules']} lr {p['learning_rate']:g}")
                 + f", {p['steps']} steps" for p in ordered]
        right.set_yticks(range(len(ordered)), names, fontsize=8)
        right.invert_yaxis()
        right.set(xlim=(0, 1.02), xlabel=label("四类任务精确匹配（95% Wilson 区间）", "exact match, 4 tasks, 95% Wilson"),
                  title=label("设置对比", "settings"))
        right.grid(axis="x", alpha=0.3)
        return save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/learning_curves"))
    parser.add_argument("--no_run", action="store_true", help="do not train; read the finished runs only")
    args = parser.parse_args(argv)
    from zhlora.files import write_json

    if not args.no_run:
        from zhlora.cli import main as zhlora

        status = zhlora(["experiment", EXPERIMENT, "--output_dir", str(args.output_dir)])
        if status != 0:
            return status
    points = collect(args.output_dir)
    if not points:
        print(f"learning_curves: no finished run under {args.output_dir}", file=sys.stderr)
        return 1
    write_json(CURVES, points)  # atomic, like every data file the project writes
    print(f"{'setting':<34}{'steps':>6}{'EM':>7}   95% CI        " + " ".join(f"{t:>8}" for t in points[0]["tasks"]))
    for p in points:
        name = "full" if p["method"] == "full" else f"{p['target_modules']} lr {p['learning_rate']:g}"
        lo, hi = p["exact_match_ci"]
        print(f"{name:<34}{p['steps']:>6}{p['exact_match']:>7.3f}   [{lo:.3f}, {hi:.3f}]"
              + " ".join(f"{t['exact_match']:>8.3f}" for t in p["tasks"].values()))
    print(f"[learning_curves] -> {CURVES}, {plot(points, FIGURE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
