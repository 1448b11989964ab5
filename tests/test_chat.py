"""The demo (zhlora/chat.py) on the tiny LoRA run: interactive mode driven through stdin,
batch mode on small JSONL files. Greedy answers make the text comparisons exact."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest

import zhlora.chat as chat
from zhlora.cli import main as cli_main

QUESTION = "把1234写成中文数字"


def run_interactive(monkeypatch, capsys, run_dir, lines: list[str], *flags: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    status = cli_main(["demo", "--model_path", str(run_dir), "--max_new_tokens", "12", *flags])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.out


def answers(out: str) -> list[tuple[str, str]]:
    """(label, text) of every answer in a transcript: `助手[LABEL]> text`, up to the next turn."""
    return re.findall(r"助手\[([^\]]+)\]> (.*?)\n(?=助手\[|你> |\Z)", out, re.S)


def test_interactive_session(tiny_run_dir, monkeypatch, capsys):
    pieces, prompts = [], []

    def spy_stream(*args, **kwargs):  # counts the pieces the demo prints one by one
        for piece in real_stream(*args, **kwargs):
            pieces.append(piece)
            yield piece

    def spy_encode(messages, *args):
        prompts.append([m["role"] for m in messages])
        return real_encode(messages, *args)

    real_stream, real_encode = chat.stream, chat.encode_prompt
    monkeypatch.setattr(chat, "stream", spy_stream)
    monkeypatch.setattr(chat, "encode_prompt", spy_encode)
    lines = [QUESTION, "你好", "/reset", "/set greedy on", QUESTION, "/reset", QUESTION,
             "/adapter base", "/reset", QUESTION, "/adapter nope", "/adapter math", "/reset", QUESTION,
             "/exit", "never read"]
    status, out = run_interactive(monkeypatch, capsys, tiny_run_dir, lines,
                                  "--adapters", f"math={tiny_run_dir}")
    assert status == 0
    got = answers(out)
    assert [label for label, _ in got] == ["default", "default", "default", "default", "base", "math"]
    assert got[0][1] and len(pieces) > 3  # a sampled answer, printed piece by piece
    # multi-turn: the second question carries the first turn; /reset drops it
    assert prompts[:3] == [["user"], ["user", "assistant", "user"], ["user"]]
    sampled, greedy, again, base, math = (text for _, text in [got[0], *got[2:]])
    assert greedy == again  # greedy: the same question, the same answer
    assert base != greedy  # 30 LoRA steps already move the tiny model's greedy text
    assert math == greedy  # `math` is the same adapter file loaded under a second name
    assert "已切换到 adapter: base" in out and "已切换到 adapter: math" in out
    assert "未知 adapter: nope; 可用 (available): default, math, base" in out
    assert "never read" not in out


def test_interactive_compare_settings_and_eof(tiny_run_dir, monkeypatch, capsys):
    lines = ["/help", "/set temperature 0", "/set top_p 2", "/set max_new_tokens x", "/set foo 1",
             "/set max_new_tokens 8", "/bogus", QUESTION]  # then end of input, no /exit
    status, out = run_interactive(monkeypatch, capsys, tiny_run_dir, lines, "--compare", "--greedy")
    assert status == 0
    assert "/adapter NAME" in out
    assert "temperature 0: must be > 0" in out and "top_p 2: must be in (0, 1]" in out
    assert out.count("无效的值") == 3 and "用法 (usage): /set KEY VALUE" in out
    assert "已设置 max_new_tokens = 8" in out and "未知命令 (unknown command) /bogus" in out
    got = answers(out)
    assert [label for label, _ in got] == ["base · 未微调", "default · 微调后"]
    assert got[0][1] != got[1][1]


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_answers_every_row(tiny_run_dir, tmp_path, capsys):
    rows = [{"instruction": QUESTION}, {"instruction": "翻译成英文", "input": "你好"},
            {"instruction": "你好", "input": "", "output": "参考答案"}]
    source = write_lines(tmp_path / "q.jsonl", [json.dumps(row, ensure_ascii=False) for row in rows])
    out = tmp_path / "answers" / "a.jsonl"
    # through `zhlora demo`, the route examples/demo.py takes too
    status = cli_main(["demo", "--model_path", str(tiny_run_dir), "--mode", "batch", "--input", str(source),
                       "--output", str(out), "--max_new_tokens", "12"])
    assert status == 0
    written = read_rows(out)
    assert [{k: v for k, v in row.items() if k != "response"} for row in written] == rows
    assert all(isinstance(row["response"], str) for row in written) and "base_response" not in written[0]
    assert "已写入 3 条回答" in capsys.readouterr().out


def test_batch_reports_bad_lines_and_compares(tiny_run_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "q.jsonl", [json.dumps({"instruction": QUESTION}, ensure_ascii=False),
                                                '{"instruction": "没有结尾"', "", '{"input": "x"}', "[1, 2]",
                                                json.dumps({"instruction": "你好"}, ensure_ascii=False)])
    out = tmp_path / "a.jsonl"
    status = cli_main(["demo", "--model_path", str(tiny_run_dir), "--mode", "batch", "--input", str(source),
                        "--output", str(out), "--max_new_tokens", "12", "--compare"])
    captured = capsys.readouterr()
    assert status == 1 and "Traceback" not in captured.err
    problems = [line for line in captured.err.splitlines() if line.startswith(str(source))]  # not progress bars
    assert [p.split(": ")[0] for p in problems] == [f"{source}:2", f"{source}:4", f"{source}:5"]
    assert "instruction: missing or empty" in problems[1]
    written = read_rows(out)
    assert [row["instruction"] for row in written] == [QUESTION, "你好"]
    assert all(row["response"] != row["base_response"] for row in written)
    assert "已写入 2 条回答" in captured.out and "跳过 3 行" in captured.out


def test_batch_without_input_compares_on_built_in_heldout_questions(tiny_run_dir, tmp_path, capsys):
    """`demo --mode batch` exactly as the guide writes it: held-out phrasings, base vs LoRA, a file."""
    import shutil

    from zhlora.tasks import HELDOUT_TASKS, check_answer

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    assert cli_main(["demo", "--model_path", str(run), "--mode", "batch", "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    written = read_rows(run / "demo_heldout.jsonl")
    assert {row["task"] for row in written} == set(HELDOUT_TASKS)  # the tiny run trained on every task
    for row in written:
        assert {"response", "base_response", "correct", "base_correct"} <= set(row)
        assert row["correct"] == check_answer(row["task"], row["response"], row["output"])
    assert "微调前 base" in out and "微调后 LoRA" in out and f"已写入 {len(written)} 条回答" in out


@pytest.mark.parametrize("argv, message", [
    (["--model_path", "no/such/run"], "config.yaml not found"),
    (["--adapters", "math"], "write name=path"),
    (["--adapters", "base=outputs"], "the name base is taken"),
    (["--adapters", "lora=outputs"], "part of PEFT's parameter prefix 'lora_'"),
    (["--adapters", "math=no/such/folder"], "adapter_config.json not found"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert cli_main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--mode", "batch", "--input", "a.jsonl"], "--input FILE needs --output FILE"),
    (["--mode", "batch", "--input", "no/such.jsonl", "--output", "a.jsonl"], "--input no/such.jsonl: no such file"),
    (["--temperature", "0"], "temperature 0: must be > 0"),
])
def test_usage_errors_exit_2_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli_main(["demo", *argv]))  # as the `zhlora` console script does
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
