"""An experiment's report: the table of its runs and the plots drawn from that table.

experiment.py collects one row per grid point (mean and std over seeds) and hands them here:
    results.csv                every number at full precision (write_csv)
    results.md                 the same table for reading, mean ± std, the plots below it (write_markdown)
    quality_vs_<key>.png       mean ± std over seeds of each PLOTTED metric against a varied number
                               (lora.r, training.learning_rate, train_samples), a line per other setting
    quality_vs_peak_memory.png exact match against peak memory, with the Pareto front

Like every plot in zhlora, plot_results reads a file (results.csv), never live state: a finished
sweep can be redrawn from its table alone. The Chinese labels and font come from plots.py.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib.pyplot as plt

from zhlora.experiment_compare import TIMED
from zhlora.files import save_png, write_if_changed
from zhlora.metrics import share_scale
from zhlora.plots import chinese_labels  # importing plots also selects the Agg backend: files, no window

QUALITY = ["exact_match", "success_rate", "avg_similarity", "rouge_l", "test_loss"]  # mean and std over seeds
SIZES = ["trainable_params", "adapter_size_mb", "model_size_mb"]  # from train_summary.json, the same in every seed
# Times and memory: the median over the seeds' runs that had the CPU alone, with their range, when there are
# at least experiment_compare.MIN_TIMED of them; empty otherwise (experiment_compare.timed_costs).
COSTS = [*SIZES, *(f"{name}{end}" for name in TIMED for end in ("", "_range")), "timed_runs"]
# Plots of quality against a number, drawn when that key varies: key -> (file, x label, log base of x).
# train_samples is experiment.TRAIN_SAMPLES, the grid key that is not a config key.
AXES = {"lora.r": ("quality_vs_r.png", ("LoRA 秩 r", "LoRA r"), 2),
        "training.learning_rate": ("quality_vs_learning_rate.png", ("学习率", "learning rate"), 10),
        "train_samples": ("quality_vs_train_samples.png", ("训练样本数", "train samples"), 2)}
PLOTTED = {"exact_match": ("精确匹配", "exact match"), "avg_similarity": ("字符相似度", "similarity"),
           "test_loss": ("测试损失", "test loss")}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def grid_keys(rows: list[dict]) -> list[str]:
    """The grid's keys over all rows: points given as mappings may each set other keys."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return [k for k in keys if k not in ("point", "seeds", *COSTS) and not k.endswith(("_mean", "_std"))]


def write_csv(rows: list[dict], output_dir: Path) -> None:
    """results.csv: every number at full precision, empty where there is none."""
    text = io.StringIO()
    grid = grid_keys(rows)
    fieldnames = ["point", *grid, *(k for k in rows[0] if k != "point" and k not in grid)]
    writer = csv.DictWriter(text, fieldnames=fieldnames, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_if_changed(output_dir / "results.csv", text.getvalue().encode())


def write_markdown(exp, rows: list[dict], output_dir: Path, command: str) -> None:
    """results.md: the same table for reading, mean ± std, and the plots below it.

    exp is the experiment.Experiment (its name, seeds and evaluate settings head the table)."""
    ev = exp.evaluate
    lines = [f"# {exp.name}", "", f"`{command}`", "",
             f"{len(rows)} points x seeds {', '.join(map(str, exp.run_seeds()))}; mean ± sample std (n - 1) over "
             f"seeds. Evaluation: the first {ev['max_samples'] or 'all'} test rows, greedy, max_new_tokens "
             f"{ev['max_new_tokens']}.", "",
             "exact_match, success_rate, avg_similarity, rouge_l: in [0, 1] (rouge_l is evaluate's x 100 score / 100); "
             "test_loss: mean per supervised token (zhlora/metrics.py). peak_memory_mb: peak RSS on a CPU, peak "
             "allocation on a GPU. Times and memory: median (range) of the runs that had the CPU alone, when "
             "there are 3 or more (timed_runs); empty otherwise.", ""]
    keys = grid_keys(rows)
    # metric@group: the same metric over one group's test rows alone (the experiment's `groups`)
    measured = [*QUALITY, *(k[:-len("_mean")] for k in rows[0] if "@" in k and k.endswith("_mean"))]
    header = ["point", *keys, *measured, *COSTS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        quality = [_cell(share_scale(m, row[f"{m}_mean"])) + ("" if row[f"{m}_std"] is None
                                                        else f" ± {_cell(share_scale(m, row[f'{m}_std']))}")
                   for m in measured]
        lines.append("| " + " | ".join([row["point"], *(row.get(k, "-") for k in keys), *quality,
                                         *(_cell(row[c]) for c in COSTS)]) + " |")
    lines += ["", *(f"![{p.name}]({p.name})" for p in sorted(output_dir.glob("quality_vs_*.png")))]
    write_if_changed(output_dir / "results.md", ("\n".join(lines) + "\n").encode())


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _numbers_first(values: tuple) -> tuple:
    """Sort key: 4 before 16 (not as text), then text."""
    return tuple((_number(v) is None, _number(v) or 0.0, v) for v in values)


def plot_against(rows: list[dict], key: str, xlabel: tuple[str, str], log_base: int, label):
    """One panel per PLOTTED metric: mean ± std over seeds against `key`; a line per other setting."""
    # A key that moves together with this one (lora_alpha = 2r, set by a mapping) is no other dimension.
    others = [k for k in grid_keys(rows) if len({(r[key], r[k]) for r in rows}) > len({r[key] for r in rows})]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6))
    for ax, (metric, names) in zip(axes, PLOTTED.items()):
        for combo in sorted({tuple(r[k] for k in others) for r in rows}, key=_numbers_first):
            mine = sorted((r for r in rows if tuple(r[k] for k in others) == combo), key=lambda r: float(r[key]))
            y = [_number(r[f"{metric}_mean"]) for r in mine]
            ax.errorbar([float(r[key]) for r in mine], [float("nan") if v is None else v for v in y],
                        yerr=[_number(r[f"{metric}_std"]) or 0.0 for r in mine], marker="o", capsize=3,
                        label=", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or None)
        ax.set_xscale("log", base=log_base)
        ticks = sorted({float(r[key]) for r in rows})
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])  # the values tried, not powers of the base
        ax.minorticks_off()
        ax.set(xlabel=label(*xlabel), title=label(*names))
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    return fig


def _moves_with_a_category(rows: list[dict], key: str) -> bool:
    """lora at 1e-3 against full at 5e-5 compares two recipes; it is not a learning-rate curve."""
    together = [k for k in grid_keys(rows) if k != key and len({r[k] for r in rows}) > 1
                and len({(r[key], r[k]) for r in rows}) == len({r[key] for r in rows})]
    return any(_number(r[k]) is None for k in together for r in rows)


def plot_pareto(points: list[tuple[float, float, str]], label):
    """Exact match against peak memory; the red steps join the points nothing beats on both."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([m for m, _, _ in points], [q for _, q, _ in points])
    for m, q, name in points:
        ax.annotate(name, (m, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], float("-inf")
    for m, q, _ in sorted(points):  # lightest first: keep each point better than all lighter ones
        if q > best:
            front.append((m, q))
            best = q
    ax.step(*zip(*front), where="post", color="#d62728", alpha=0.6, label=label("帕累托前沿", "Pareto front"))
    ax.set(xlabel=label("峰值内存/MB", "peak memory, MB"), ylabel=label("精确匹配", "exact match"),
           title=label("质量与峰值内存", "quality vs peak memory"))
    ax.margins(x=0.25, y=0.15)  # room for the point names
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_results(output_dir: Path) -> list[Path]:
    """quality_vs_<key>.png per varied number, quality_vs_peak_memory.png; drawn from results.csv."""
    with open(output_dir / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    memory = [(_number(r["peak_memory_mb"]), _number(r["exact_match_mean"]), r["point"]) for r in rows]
    memory = [m for m in memory if None not in m]
    written = []
    with chinese_labels() as label:
        for key, (name, xlabel, log_base) in AXES.items():
            if key in rows[0] and len({r[key] for r in rows}) > 1 and not _moves_with_a_category(rows, key):
                written.append(save_png(plot_against(rows, key, xlabel, log_base, label), output_dir / name))
        if len({m for m, _, _ in memory}) > 1:
            written.append(save_png(plot_pareto(memory, label), output_dir / "quality_vs_peak_memory.png"))
    return written
