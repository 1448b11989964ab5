"""What every section of the guide shares: where the files are, reading them, one style for figures."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from zhlora.metrics import LABELS

GUIDE, REPORT, SNAPSHOT = Path("docs/guide.md"), Path("docs/results/performance.md"), Path("docs/results/data")
RUN_FILES = ("config.yaml", "train_summary.json", "evaluation_results.json", "training_history.jsonl")
NOTE = "<!-- 本节由 scripts/make_reports.py 生成，请勿手改；改数据后重新运行它 -->"
NOT_YET = "**尚未测量。**"
REGENERATE = "再运行 `python scripts/make_reports.py`。"
MB = 2 ** 20


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def number(text):
    """A results.csv cell (text, empty when there is no value) as a float, or None."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def fmt(value, digits: int = 3) -> str:
    """One style for every figure: thousands separators for big numbers, `-` where there is none."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def span(values, digits: int = 1) -> str:
    """A measured range as 'low–high' (empty when none was recorded)."""
    return "–".join(fmt(v, digits) for v in values or [])


def mean_std(row: dict, metric: str) -> str:
    mean, std = number(row.get(f"{metric}_mean")), number(row.get(f"{metric}_std"))
    return fmt(mean) + ("" if std is None else f" ± {fmt(std)}")


def read_results(folder: Path) -> list[dict] | None:
    """results.csv rows, each with the config, train summary and evaluation of its first seed."""
    path = folder / "results.csv"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        seeds = sorted((folder / row["point"]).glob("seed*"))
        first = seeds[0] if seeds else folder / row["point"] / "missing"
        row["config"] = read_yaml(first / "config.yaml") or {}
        row["summary"] = read_json(first / "train_summary.json") or {}
        row["evaluation"] = read_json(first / "evaluation_results.json") or {}
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def timed(row: dict, name: str) -> float | None:
    """A results.csv time or memory figure under the timing rule: the median of 3 or more runs that
    had the CPU alone (experiment_compare.timed_costs), else None; older tables had no such rule."""
    return number(row.get(name)) if (number(row.get("timed_runs")) or 0) >= 3 else None


def timed_cell(row: dict, name: str, digits: int = 1) -> str:
    """A time or memory cell: the median (range) of the runs that had the CPU alone, or empty."""
    value = timed(row, name)
    if value is None:
        return ""
    low, _, high = (row.get(f"{name}_range") or "").partition("~")  # experiment.collect writes "low~high"
    return fmt(value, digits) + (f"（{span([number(low), number(high)], digits)}）" if high else "")


METRIC_WORDS = {"exact_match": "精确匹配", "avg_similarity": "字符相似度", "test_loss": "测试 loss"}


def zh_label(key: str) -> str:
    """A metric's Chinese name with its results key: 精确匹配（exact_match）."""
    return f"{LABELS[key][0]}（{key}）"


def machine_words(m: dict | None) -> str:
    """The machine of a benchmark in words: CPU, cores, memory, torch."""
    if not isinstance(m, dict):
        return "未记录"
    where = m.get("gpu") or f"{m.get('cpu', '?')}，{m.get('cores', '?')} 核"
    return f"{where}，内存 {m.get('memory_gb', '?')} GB，torch {m.get('torch', '?')}"


def date_words(stamp: str | None) -> str:
    """'2026-11-30T17:13:16+00:00' -> '2026 年 11 月 30 日'."""
    match = re.match(r"(\d{4})-(\d{2})-(\d{2})", stamp or "")
    return f"{match[1]} 年 {int(match[2])} 月 {int(match[3])} 日" if match else "未记录"
