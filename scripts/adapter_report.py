"""Per-task scores of three ways to cover several task families, as Markdown tables.

    zhlora evaluate --adapters num2cn=RUN1,s2t=RUN2,all=RUN3,merged=MERGED --output_dir outputs/adapters_eval
    python scripts/adapter_report.py --results outputs/adapters_eval \
        --task_adapters num2cn s2t --all_tasks all --merged merged [--output docs/results/task_adapters.md]
        [--metrics exact_match avg_similarity]

One table per metric (default: exact match, then character similarity, which still
separates models when none gets an answer exactly right). Compares, task by task: the
task adapter trained on that task (scored on its own tasks), one adapter trained on every
task, and one or more `zhlora merge-adapters` mixes of the task adapters.
Reads evaluation JSON files only (what `zhlora evaluate` writes); nothing is loaded or run.

Each value names one evaluation:
  PATH            a run folder evaluated alone (its evaluation_results.json), or that file
  NAME            otherwise: an adapter in the --results file (a `zhlora evaluate --adapters` output)
  NAME=PATH       adapter NAME of the --adapters output at PATH
A merge is scored on the tasks of the config.yaml that merge-adapters copied from its
--model_path: give it the all-tasks run, or the merge shows '-' on the other tasks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_FILE = "evaluation_results.json"  # zhlora.evaluate.RESULTS_FILE (not imported: that loads torch)


def load_scores(value: str, results: str | None) -> tuple[str, dict]:
    """(label, one model's results: per_task, num_samples, ...) for one command-line value."""
    name, sep, path = value.partition("=")
    if not sep:  # an existing path, else an adapter of --results
        name, path = (value, results) if results and not Path(value).exists() else ("", value)
    file = Path(path) / RESULTS_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"{value}: {file} not found; run `zhlora evaluate` first")
    data = json.loads(file.read_text(encoding="utf-8"))
    if "adapters" not in data:  # one run's own results
        return name or (file.parent.name if file.name == RESULTS_FILE else file.stem), data
    if name not in data["adapters"]:
        raise ValueError(f"{value}: {file} holds adapters {sorted(data['adapters'])}; name one (NAME or NAME=PATH)")
    return name, data["adapters"][name]


METRICS = {  # the per_task keys zhlora evaluate writes: (Chinese name, what it means, divisor to a 0-1 scale)
    "exact_match": ("精确匹配", "答案通过该任务检查的行的比例（贪心解码）", 1),
    "avg_similarity": ("字符相似度", "回答与参考答案按字符比较的相似度（difflib，0 到 1）的平均", 1),
    "rouge_l": ("ROUGE-L", "jieba 分词后最长公共子序列的 F 值（evaluate 的 ×100 值除以 100）", 100),
}


def score(result: dict, task: str, metric: str) -> float | None:
    value = result["per_task"].get(task, {}).get(metric)
    return None if value is None else value / METRICS[metric][2]


def report(task_adapters: list[tuple[str, dict]], all_tasks: tuple[str, dict], merged: list[tuple[str, dict]],
           metric: str = "exact_match") -> str:
    """One Markdown table (in Chinese, for the guide): a row per checkable task of the task adapters,
    then each column over all its rows pooled (every row weighs the same, as evaluate's headline)."""
    owner: dict[str, tuple[str, dict]] = {}  # task -> the (first) task adapter scored on it
    for label, result in task_adapters:
        for task, row in result["per_task"].items():
            if "exact_match" in row:  # open tasks (no checkable answer) are left out of every table
                owner.setdefault(task, (label, result))
    tasks = sorted(owner)
    columns = [[owner[t][1] for t in tasks], [all_tasks[1]] * len(tasks), *([m[1]] * len(tasks) for m in merged)]

    def rows(result: dict, task: str) -> int:
        return result["per_task"].get(task, {}).get("n", 0)

    def cell(result: dict, task: str) -> str:
        value = score(result, task, metric)
        if value is None:
            return "-"
        other_rows = f"（{rows(result, task)} 行）" if rows(result, task) != rows(owner[task][1], task) else ""
        return f"{value:.3f}{other_rows}"

    def pooled(column: list[dict]) -> str:  # '-' when a task is missing: a total over other rows does not compare
        pairs = [(score(result, task, metric), rows(result, task)) for result, task in zip(column, tasks)]
        if not pairs or any(v is None for v, _ in pairs) or not sum(n for _, n in pairs):
            return "-"
        return f"{sum(v * n for v, n in pairs) / sum(n for _, n in pairs):.3f}"

    name, meaning, _ = METRICS[metric]
    lines = [f"**{name}（{metric}）**", "", f"| 任务 | 行数 | 单任务 adapter | 全部任务（`{all_tasks[0]}`） | "
             + "".join(f"合并（`{label}`） | " for label, _ in merged).rstrip(),
             "|---|---:|---:|" + "---:|" * (1 + len(merged))]
    for k, task in enumerate(tasks):
        label, result = owner[task]
        lines.append(f"| {task} | {rows(result, task)} | {cell(result, task)}（`{label}`） | "
                     + " | ".join(cell(column[k], task) for column in columns[1:]) + " |")
    lines.append("| **全部行合计** | | " + " | ".join(pooled(column) for column in columns) + " |")
    notes = ["", f"{name}：{meaning}。合计按行加权（每一行分量相同，与 `zhlora evaluate` 的总分一致）；"
             "每个单任务 adapter 只在它训练过的任务上评分；“-”表示没有在该任务上评分。"]
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table: task adapters vs an all-tasks adapter vs a merge")
    parser.add_argument("--results", default=None, help="a `zhlora evaluate --adapters` output (folder or JSON)")
    parser.add_argument("--task_adapters", nargs="+", required=True, metavar="NAME|PATH|NAME=PATH")
    parser.add_argument("--all_tasks", required=True, metavar="NAME|PATH|NAME=PATH")
    parser.add_argument("--merged", nargs="+", required=True, metavar="NAME|PATH|NAME=PATH",
                        help="one or more merges (e.g. a sum and a mean of the task adapters), a column each")
    parser.add_argument("--metrics", nargs="+", default=["exact_match", "avg_similarity"], choices=sorted(METRICS))
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        models = ([load_scores(v, args.results) for v in args.task_adapters],
                  load_scores(args.all_tasks, args.results), [load_scores(v, args.results) for v in args.merged])
        table = "\n".join(report(*models, metric=m) for m in args.metrics)
    except (ValueError, KeyError) as err:  # json.JSONDecodeError is a ValueError
        print(f"adapter_report: error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
