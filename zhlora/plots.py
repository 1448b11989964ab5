"""第五步: draw a run's logged files as PNGs beside them.

    python visualization/plot_results.py [--output_dir outputs]
    zhlora plot --output_dir outputs

Plots read files, never live training state (so they can be redrawn at any time, even
while training still appends). From <output_dir>:
  training_history.jsonl   -> training_loss.png, learning_rate.png, grad_norm.png
  evaluation_results.json  -> metrics_comparison.png, per_task_exact_match.png
  predictions.jsonl        -> generation_length_hist.png, generation_time_hist.png
A missing file skips its plots with a printed note.

Labels are "中文 (English)". Matplotlib's own font (DejaVu Sans) has no Chinese glyphs,
so cjk_font() registers Noto Sans CJK SC from the `mplfonts` package (pip install
mplfonts, in requirements.txt) or finds a CJK font the system already has (apt-get
install fonts-noto-cjk). With none, labels fall back to English alone, never to boxes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on a server and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402

from zhlora.errors import ZhloraError  # noqa: E402
from zhlora.files import save_png  # noqa: E402
from zhlora.metrics import LABELS  # noqa: E402

HISTORY_FILE, RESULTS_FILE, PREDICTIONS_FILE = "training_history.jsonl", "evaluation_results.json", "predictions.jsonl"
# The file inside the mplfonts wheel (Noto Sans CJK SC Regular, SIL OFL 1.1), then fonts a
# system may have installed (Debian fonts-noto-cjk, fonts-wqy-microhei; Windows; macOS).
MPLFONTS_FILE = "fonts/NotoSansCJKsc-Regular.otf"
SYSTEM_CJK_FAMILIES = ["Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
                       "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC"]
BASELINE_COLOR, TUNED_COLOR, EVAL_COLOR = "#9e9e9e", "#1f77b4", "#d62728"

# Evaluation metrics -> (中文, English), named once in metrics.LABELS. Shares in [0, 1] are drawn
# x 100 so that they share one 0-100 axis with bleu_4 and rouge_* (which metrics.py reports x 100).
SCORES = {k: LABELS[k] for k in ["success_rate", "avg_similarity", "exact_match", "bleu_4", "rouge_1", "rouge_2",
                                 "rouge_l"]}
SHARES = {"success_rate", "avg_similarity", "exact_match"}
# Each of these has a unit of its own, so each gets a small panel of its own.
OTHERS = {k: LABELS[k] for k in ["test_loss", "perplexity", "avg_length", "avg_length_tokens", "avg_generation_time"]}


class PlotError(ZhloraError, ValueError):
    """A run folder or logged file that cannot be drawn (missing, or a malformed line)."""


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The family name of a registered font with Chinese glyphs, or None (with a warning)."""
    spec = importlib.util.find_spec("mplfonts")  # locates the package without importing it
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / MPLFONTS_FILE
        if path.is_file():
            font_manager.fontManager.addfont(str(path))
            return font_manager.FontProperties(fname=str(path)).get_name()
    known = {font.name for font in font_manager.fontManager.ttflist}
    for family in SYSTEM_CJK_FAMILIES:
        if family in known:
            return family
    print("[plot] warning: no Chinese font found, so labels are in English only. "
          "Install one: pip install mplfonts  (or: apt-get install fonts-noto-cjk)", file=sys.stderr)
    return None


def make_label(chinese: bool):
    """label(zh, en) -> "zh (en)", or "en" alone when no Chinese font can draw zh."""
    def label(zh: str, en: str, sep: str = " ") -> str:
        if not chinese:
            return en
        return zh if zh == en else f"{zh}{sep}({en})"
    return label


@contextmanager
def chinese_labels():
    """Within: matplotlib draws with the Chinese font (when one is found). Yields label(zh, en).

    The rcParams change is scoped, so whoever imports this module keeps their own."""
    family = cjk_font()
    style = {"font.family": "sans-serif", "font.sans-serif": [family, "DejaVu Sans"] if family else ["DejaVu Sans"]}
    with plt.rc_context(style):
        yield make_label(family is not None)


def read_log(path: Path) -> list[dict]:
    """Rows of a JSONL file. A torn last line (a writer still appending) is skipped."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON") from None
            print(f"[plot] {path}: last line is incomplete (still being written?); skipped it")
    return rows


def ema(values: list[float], weight: float | None = None) -> np.ndarray:
    """Exponential moving average, starting from the first value. The default weight grows
    with the number of points, as LLaMA-Factory's plot_loss does: 0.22 for 10 points, 0.89 for 100."""
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0] if values else 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        out.append(last)
    return np.asarray(out)


def _line_plot(steps, values, title, ylabel, path, label, written, smooth=True, sci=False) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if smooth:
        ax.plot(steps, values, color=TUNED_COLOR, alpha=0.3, linewidth=1, label=label("原始值", "raw"))
        ax.plot(steps, ema(values), color=TUNED_COLOR, linewidth=2, label=label("平滑", "EMA"))
        ax.legend()
    else:
        ax.plot(steps, values, color=TUNED_COLOR, linewidth=2)
    if sci:  # ticks 0.5, 1.0, ... under a "1e-4" offset read better than 0.000050, 0.000100, ...
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set(title=title, xlabel=label("训练步数", "step"), ylabel=ylabel)
    ax.grid(alpha=0.3)
    written.append(save_png(fig, path, dpi=120))


def plot_history(rows: list[dict], out: Path, label) -> list[Path]:
    """training_loss.png (raw, EMA, eval points), learning_rate.png, grad_norm.png."""
    written: list[Path] = []
    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        print(f"[plot] {out / HISTORY_FILE} has no loss rows yet; skipped the training curves")
        return written
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, loss, color=TUNED_COLOR, alpha=0.3, linewidth=1, label=label("训练损失", "train loss"))
        ax.plot(steps, ema(loss), color=TUNED_COLOR, linewidth=2, label=label("训练损失 平滑", "train loss, EMA"))
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=EVAL_COLOR,
                label=label("验证损失", "eval loss"))
    ax.set(title=label("训练损失", "training loss"), xlabel=label("训练步数", "step"),
           ylabel=label("交叉熵", "cross-entropy per token"))
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_png(fig, out / "training_loss.png", dpi=120))

    for key, name, smooth, sci in [("learning_rate", ("学习率", "learning rate"), False, True),
                                   ("grad_norm", ("梯度范数", "gradient norm"), True, False)]:
        points = [r for r in train if r.get(key) is not None]
        if points:
            values = [r[key] for r in points]
            _line_plot([r["step"] for r in points], values, label(*name), label(*name),
                       out / f"{key}.png", label, written, smooth, sci)
    return written


def _bars(ax, x, tuned, base, tuned_ci, base_ci, label, fmt="{:.1f}", top: float | None = None) -> None:
    """Baseline bars left of fine-tuned ones (fine-tuned alone when base is None), 95% CI
    whiskers where a [low, high] is given, and each bar's value written where no whisker is."""
    width = 0.38
    groups = [(tuned, tuned_ci, TUNED_COLOR, label("微调后", "fine-tuned"), 0.0)]
    if base is not None:
        groups = [(base, base_ci, BASELINE_COLOR, label("基线", "baseline"), -width / 2),
                  (tuned, tuned_ci, TUNED_COLOR, label("微调后", "fine-tuned"), width / 2)]
    drawn = []
    for values, cis, color, name, offset in groups:
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        errors = np.array([[h - c[0], c[1] - h] if c and not np.isnan(h) else [0.0, 0.0]
                           for h, c in zip(heights, cis)]).T.clip(min=0)
        bars = ax.bar(np.asarray(x) + offset, np.nan_to_num(heights), width, color=color, label=name,
                      yerr=errors if errors.any() else None, capsize=3, error_kw={"linewidth": 1})
        drawn.append((bars, heights, errors))
    # Room for a label is judged against the axis height: the caller's fixed top (a 0-100 score
    # axis), else the highest whisker.
    top = top or max(float(np.nanmax(np.append(h + e[1], 0.0))) for _, h, e in drawn) or 1.0
    for bars, heights, errors in drawn:
        for bar, h, lower, upper in zip(bars, heights, errors[0], errors[1]):
            text, middle = "-" if np.isnan(h) else fmt.format(h), bar.get_x() + bar.get_width() / 2
            clear = h - lower  # the whisker runs down the bar's middle to here; below it the bar is free
            if upper > 0 and clear >= 0.1 * top:  # write inside the bar, under the whisker
                ax.text(middle, clear / 2, text, ha="center", va="center", color="white", fontsize=9)
            else:  # no room under the whisker (or no whisker): write above it, where nothing is drawn
                ax.annotate(text, (middle, np.nan_to_num(h) + upper), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=9)


def _values(source: dict | None, names: list[str]) -> list[float | None]:
    """Metric values on the plotted scale (shares x 100); None where the file has none."""
    return [None if not source or source.get(k) is None else source[k] * (100 if k in SHARES else 1) for k in names]


def _cis(source: dict | None, names: list[str]) -> list[list[float] | None]:
    cis = (source or {}).get("ci") or {}
    return [[v * (100 if k in SHARES else 1) for v in cis[k]] if cis.get(k) else None for k in names]


def plot_metrics(results: dict, out: Path, label) -> Path:
    """metrics_comparison.png: scores on one 0-100 axis, then one small panel per other metric."""
    base = results.get("baseline") or None
    present = [results] + ([base] if base else [])
    scores = [k for k in SCORES if any(s.get(k) is not None for s in present)]
    others = [k for k in OTHERS if any(s.get(k) is not None for s in present)]
    fig = plt.figure(figsize=(13, 8))
    grid = fig.add_gridspec(2, max(len(others), 1), height_ratios=[3, 2])
    ax = fig.add_subplot(grid[0, :])
    _bars(ax, range(len(scores)), _values(results, scores), _values(base, scores) if base else None,
          _cis(results, scores), _cis(base, scores), label, top=105)
    ax.set_xticks(range(len(scores)), [label(*SCORES[k], sep="\n") for k in scores])
    ax.set(ylabel=label("得分", "score, 0-100"), ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    title = (label("评估指标: 基线 vs 微调后", "evaluation metrics: baseline vs fine-tuned") if base
             else label("评估指标", "evaluation metrics"))
    if any(_cis(results, scores)):
        title += "\n" + label("误差线: 95% 置信区间 (比率 Wilson, 其余 bootstrap)",
                                "error bars: 95% CI (rates: Wilson, others: bootstrap)")
    ax.set_title(title)
    for i, key in enumerate(others):
        small = fig.add_subplot(grid[1, i])
        _bars(small, [0], _values(results, [key]), _values(base, [key]) if base else None,
              _cis(results, [key]), _cis(base, [key]), label, fmt="{:.3g}")
        small.set(xticks=[], xlim=(-1, 1))  # narrower bars than the default fill
        small.set_title(label(*OTHERS[key], sep="\n"), fontsize=10)
        small.margins(y=0.2)
        small.grid(axis="y", alpha=0.3)
    return save_png(fig, out / "metrics_comparison.png", dpi=120)


def plot_per_task(results: dict, out: Path, label) -> Path | None:
    """per_task_exact_match.png: exact match (%) per checkable task, baseline beside fine-tuned."""
    tuned = {t: row for t, row in (results.get("per_task") or {}).items() if row.get("exact_match") is not None}
    if not tuned:
        print("[plot] no task with an exact answer in evaluation_results.json; skipped per_task_exact_match.png")
        return None
    base_rows = (results.get("baseline") or {}).get("per_task") or {}
    tasks = sorted(tuned)
    base = [None if base_rows.get(t, {}).get("exact_match") is None else 100 * base_rows[t]["exact_match"]
            for t in tasks]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks) + 2), 5))
    def ci(row: dict):  # the 95% Wilson interval evaluate.py gives each task, in percent
        return None if not row.get("exact_match_ci") else [100 * v for v in row["exact_match_ci"]]

    _bars(ax, range(len(tasks)), [100 * tuned[t]["exact_match"] for t in tasks],
          base if any(v is not None for v in base) else None, [ci(tuned[t]) for t in tasks],
          [ci(base_rows.get(t, {})) for t in tasks], label, fmt="{:.0f}", top=125)
    ax.set_xticks(range(len(tasks)), [f"{t}\nn={tuned[t].get('n', '?')}" for t in tasks])
    # headroom above 100 for a full bar's label and the legend, which sits over it in one row
    ax.set(ylim=(0, 125), ylabel=label("精确匹配 %（95% Wilson 区间）", "exact match, % (95% Wilson)"),
           title=label("各任务精确匹配", "exact match per task"))
    ax.set_yticks(range(0, 101, 20))
    skipped = sorted(set(results.get("per_task") or {}) - set(tuned))
    if skipped:  # open_qa has no single right answer: read its similarity and rouge instead
        ax.set_xlabel(label("无标准答案、未画出", "no exact answer, not shown") + ": " + ", ".join(skipped))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=2)
    return save_png(fig, out / "per_task_exact_match.png", dpi=120)


def plot_predictions(rows: list[dict], out: Path, label) -> list[Path]:
    """generation_length_hist.png and generation_time_hist.png from predictions.jsonl."""
    written: list[Path] = []
    rows = [r for r in rows if r.get("prediction") is not None]  # rows scored by teacher forcing alone
    if not rows:
        print("[plot] no generated answer in predictions.jsonl; skipped the histograms")
        return written
    tuned = [len(r["prediction"]) for r in rows]
    base = [len(r["baseline_prediction"]) for r in rows if r.get("baseline_prediction") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.histogram_bin_edges(tuned + base, bins=min(30, max(5, len(rows) // 3)))
    groups = [(tuned, TUNED_COLOR, label("微调后", "fine-tuned"))]
    if base:
        groups.insert(0, (base, BASELINE_COLOR, label("基线", "baseline")))
    ax.hist([g[0] for g in groups], bins=bins, color=[g[1] for g in groups], label=[g[2] for g in groups])
    for values, color, name in groups:
        ax.axvline(np.mean(values), color=color, linestyle="--", linewidth=1.5,
                   label=f"{name} {label('均值', 'mean')} {np.mean(values):.1f}")
    ax.set(title=label("生成长度分布", "generation length"),
           xlabel=label("回答长度 (字符)", "answer length, characters"), ylabel=label("样本数", "samples"))
    ax.legend()
    written.append(save_png(fig, out / "generation_length_hist.png", dpi=120))

    # generation_time is each batch's wall time / its batch size, so a batch's samples share a value.
    timed = [r for r in rows if r.get("generation_time") is not None]
    if not timed:
        print(f"[plot] no generation_time in {out / PREDICTIONS_FILE}; skipped generation_time_hist.png")
        return written
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = [([r["generation_time"] for r in timed if r.get("finished", True)], TUNED_COLOR,
               label("自然结束", "ended with EOS")),
              ([r["generation_time"] for r in timed if not r.get("finished", True)], EVAL_COLOR,
               label("达到长度上限", "hit max_new_tokens"))]
    groups = [g for g in groups if g[0]]
    ax.hist([g[0] for g in groups], bins=min(30, max(5, len(timed) // 3)), stacked=True,
            color=[g[1] for g in groups], label=[g[2] for g in groups])
    ax.set(title=label("微调后模型每样本生成时间", "fine-tuned generation time per sample"),
           xlabel=label("秒", "seconds"), ylabel=label("样本数", "samples"))
    ax.legend()
    written.append(save_png(fig, out / "generation_time_hist.png", dpi=120))
    return written


def plot_run(output_dir: str | Path) -> list[Path]:
    """Draw every plot whose input file exists in output_dir; return the PNGs written."""
    out = Path(output_dir)
    written: list[Path] = []
    with chinese_labels() as label:
        history = out / HISTORY_FILE
        if history.is_file():
            written += plot_history(read_log(history), out, label)
        else:
            print(f"[plot] {history} not found (train first); skipped the training curves")
        results_path = out / RESULTS_FILE
        if results_path.is_file():
            results = json.loads(results_path.read_text(encoding="utf-8"))
            written.append(plot_metrics(results, out, label))
            written += [p for p in [plot_per_task(results, out, label)] if p]
        else:
            print(f"[plot] {results_path} not found (run evaluate first); skipped the metric plots")
        predictions = out / PREDICTIONS_FILE
        rows = read_log(predictions) if predictions.is_file() else []
        if rows:
            written += plot_predictions(rows, out, label)
        else:
            print(f"[plot] {predictions} not found or empty (run evaluate first); skipped the histograms")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs", help="the run folder (training's output.dir)")
    parser.add_argument("--experiments", default=None, metavar="DIR",
                        help="a folder of experiment results to compare (not available yet)")


def run(args: argparse.Namespace) -> int:
    if args.experiments:
        raise PlotError("--experiments is not available yet; plot one run with --output_dir")
    if not Path(args.output_dir).is_dir():
        raise PlotError(f"{args.output_dir}: no such folder (train first, or pass --output_dir)")
    try:
        written = plot_run(args.output_dir)
    except (ValueError, KeyError) as err:  # a malformed log line or results file
        raise PlotError(str(err)) from err
    for path in written:
        print(f"[plot] -> {path}")
    if not written:
        print(f"[plot] nothing to plot in {args.output_dir}")
    return 0
