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


METRICS = {  # the per_task keys zhlora evaluate writes, and what each means
    "exact_match": "Exact match: the share of test rows whose answer passes tasks.check_answer (greedy decoding).",
    "avg_similarity": "Similarity: mean character similarity of answer and reference (difflib ratio, 0 to 1).",
    "rouge_l": "ROUGE-L: F x 100 of the longest common subsequence of jieba words.",
}


def score(result: dict, task: str, metric: str) -> float | None:
    return result["per_task"].get(task, {}).get(metric)


def report(task_adapters: list[tuple[str, dict]], all_tasks: tuple[str, dict], merged: list[tuple[str, dict]],
           metric: str = "exact_match") -> str:
    """One Markdown table: a row per checkable task of the task adapters, then the mean over tasks."""
    owner: dict[str, tuple[str, dict]] = {}  # task -> the (first) task adapter scored on it
    for label, result in task_adapters:
        for task, row in result["per_task"].items():
            if "exact_match" in row:  # open tasks (no checkable answer) are left out of every table
                owner.setdefault(task, (label, result))
    tasks = sorted(owner)
    columns = [[owner[t][1] for t in tasks], [all_tasks[1]] * len(tasks), *([m[1]] * len(tasks) for m in merged)]

    def cell(result: dict, task: str) -> str:
        value, n = score(result, task, metric), result["per_task"].get(task, {}).get("n")
        if value is None:
            return "-"
        other_rows = f" (n={n})" if n != owner[task][1]["per_task"][task]["n"] else ""  # max_samples cut elsewhere
        return f"{value:.3f}{other_rows}"

    def mean(column: list[dict]) -> str:  # '-' when a task is missing: means over other tasks do not compare
        values = [score(result, task, metric) for result, task in zip(column, tasks)]
        return "-" if not values or None in values else f"{sum(values) / len(values):.3f}"

    lines = [f"**{metric}**", "", f"| task | n | task adapter | all tasks (`{all_tasks[0]}`) | "
             + "".join(f"merge (`{name}`) | " for name, _ in merged).rstrip(),
             "|---|---:|---:|" + "---:|" * (1 + len(merged))]
    for k, task in enumerate(tasks):
        label, result = owner[task]
        lines.append(f"| {task} | {result['per_task'][task]['n']} | {cell(result, task)} (`{label}`) | "
                     + " | ".join(cell(column[k], task) for column in columns[1:]) + " |")
    lines.append("| **mean over tasks** | | " + " | ".join(mean(column) for column in columns) + " |")
    notes = ["", METRICS[metric] + " Each task adapter is scored only on the tasks it was trained on; "
             "'-': not scored on that task."]
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
