"""scripts/adapter_report.py: the Markdown table from hand-written evaluation files, then the
whole chain on the tiny model (two task adapters, their merge, one `zhlora evaluate --adapters`).

    python -m pytest tests/test_adapter_report.py -q
"""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from conftest import tiny_overrides

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "adapter_report.py"
spec = importlib.util.spec_from_file_location("adapter_report", SCRIPT)
adapter_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adapter_report)


def scores(**per_task):
    """An evaluation result's per_task: task=(exact_match, n); open_qa has no exact match."""
    return {"per_task": {t: {"n": n, "exact_match": em} if t != "open_qa" else {"n": n}
                         for t, (em, n) in per_task.items()}}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_table_from_an_adapters_file_and_a_run_folder(tmp_path, capsys):
    write(tmp_path / "eval" / "evaluation_results.json", {"adapters": {
        "num": scores(num2cn=(0.5, 4)), "zh": scores(s2t=(1.0, 4), open_qa=(None, 2)),
        "merged": scores(num2cn=(0.25, 4), s2t=(0.75, 2), sort=(0.0, 4))}})
    write(tmp_path / "all_run" / "evaluation_results.json", scores(num2cn=(0.75, 4), s2t=(0.5, 4), sort=(1.0, 4)))
    out = tmp_path / "report" / "table.md"
    argv = ["--results", str(tmp_path / "eval"), "--task_adapters", "num", "zh", "--all_tasks",
            str(tmp_path / "all_run"), "--merged", "merged", "--output", str(out)]
    assert adapter_report.main(argv) == 0
    table = out.read_text("utf-8")
    assert table == capsys.readouterr().out
    assert table.splitlines()[:7] == [
        "**精确匹配（exact_match）**", "",
        "| 任务 | 行数 | 单任务 adapter | 全部任务（`all_run`） | 合并（`merged`） |",
        "|---|---:|---:|---:|---:|",
        "| num2cn | 4 | 0.500（`num`） | 0.750 | 0.250 |",
        "| s2t | 4 | 1.000（`zh`） | 0.500 | 0.750（2 行） |",  # only tasks a task adapter was scored on
        "| **全部行合计** | | 0.750 | 0.625 | 0.417 |"]  # pooled: (0.25 * 4 + 0.75 * 2) / 6


def test_missing_task_shows_a_dash_and_no_mean(tmp_path):
    task = write(tmp_path / "a.json", scores(num2cn=(1.0, 2), s2t=(0.5, 2)))
    merged = write(tmp_path / "m.json", scores(num2cn=(0.5, 2)))
    table = adapter_report.report([adapter_report.load_scores(str(task), None)],
                                  adapter_report.load_scores(f"everything={task}", None),
                                  [adapter_report.load_scores(str(merged), None)])
    assert "| s2t | 2 | 0.500（`a`） | 0.500 | - |" in table
    assert "| **全部行合计** | | 0.750 | 0.750 | - |" in table



def test_two_merges_get_a_column_each():
    task = ("a", scores(num2cn=(1.0, 2)))
    table = adapter_report.report([task], ("all", scores(num2cn=(0.5, 2))),
                                  [("sum", scores(num2cn=(0.0, 2))), ("mean", scores(num2cn=(0.5, 2)))])
    assert table.splitlines()[2:6] == [
        "| 任务 | 行数 | 单任务 adapter | 全部任务（`all`） | 合并（`sum`） | 合并（`mean`） |",
        "|---|---:|---:|---:|---:|---:|",
        "| num2cn | 2 | 1.000（`a`） | 0.500 | 0.000 | 0.500 |",
        "| **全部行合计** | | 1.000 | 0.500 | 0.000 | 0.500 |"]

@pytest.mark.parametrize("value, message", [("nobody", "holds adapters ['num']"), ("x=missing_dir", "not found")])
def test_bad_names_are_one_line_errors(tmp_path, capsys, value, message):
    write(tmp_path / "evaluation_results.json", {"adapters": {"num": scores(num2cn=(1.0, 1))}})
    argv = ["--results", str(tmp_path), "--task_adapters", "num", "--all_tasks", value, "--merged", "num"]
    assert adapter_report.main(argv) == 2
    assert message in capsys.readouterr().err


def test_report_on_tiny_task_adapters_all_tasks_and_merge(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path):
    from zhlora.cli import main as zhlora
    from zhlora.config import load_config
    from zhlora.train import train

    runs = {}
    for name, tasks in [("num", "num2cn"), ("zh", "s2t")]:
        runs[name] = tmp_path / name
        train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, runs[name], "training.max_steps=6",
                                               f"data.tasks=[{tasks}]")))
    merged = tmp_path / "merged"  # --model_path: the all-tasks run, so the merge is scored on every task
    assert zhlora(["merge-adapters", "--model_path", str(tiny_run_dir), "--adapters",
                   f"num={runs['num']},zh={runs['zh']}", "--weights", "1,1", "--output", str(merged)]) == 0
    assert zhlora(["evaluate", "--adapters", f"num={runs['num']},zh={runs['zh']},all={tiny_run_dir},merged={merged}",
                   "--output_dir", str(tmp_path / "eval"), "--no_baseline", "--max_new_tokens", "8"]) == 0
    out = tmp_path / "table.md"
    assert adapter_report.main(["--results", str(tmp_path / "eval"), "--task_adapters", "num", "zh",
                                "--all_tasks", "all", "--merged", "merged", "--output", str(out)]) == 0
    rows = out.read_text("utf-8").splitlines()
    assert [r.split(" | ")[0] for r in rows[4:7]] == ["| num2cn", "| s2t", "| **全部行合计**"]
    assert len(re.findall(r"\| \d\.\d{3} ", rows[6])) == 3  # a total in every column: all scored on both tasks
