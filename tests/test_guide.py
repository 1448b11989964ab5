"""docs/guide.md stays true: its generated sections match the committed results, and every
command it marks runnable works.

Runnable commands are the lines of ```bash runnable blocks (or ```bash blocks right after
`<!-- runnable -->`). Those of 实践步骤 form a pipeline (prepare -> train -> evaluate -> plot ->
demo) and are run, in order, on the tiny model of conftest.py in a scratch folder, with
only sizes and the model overridden. Every other command would take minutes on the real
model, so it is parsed instead: the real argparse parser of its entry point must accept it
(stopped right after parsing), and its config overrides or experiment must load.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import load_make_reports
from zhlora.cli import main as zhlora_main
from zhlora.config import load_config

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guide.md"
PIPELINE_SECTION = "实践步骤"  # the six steps: these commands are run on the tiny model


def runnable_commands(text: str) -> list[tuple[str, int, list[str]]]:
    """(## section, line number, argv) for each command line of the runnable blocks."""
    commands, section, in_block, marked, pending = [], "", False, False, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not in_block:
            if line.startswith("## "):
                section = line[3:].strip()
            if stripped.startswith("```bash") and ("runnable" in stripped or marked):
                in_block = True
            marked = stripped == "<!-- runnable -->" or (marked and not stripped)
            continue
        if stripped == "```":
            in_block = False
            continue
        pending += stripped
        if pending.endswith("\\"):  # a command continued on the next line
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        pending = ""
        if argv:
            commands.append((section, number, argv))
    return commands


COMMANDS = runnable_commands(GUIDE.read_text(encoding="utf-8"))
PIPELINE = [c for c in COMMANDS if c[0] == PIPELINE_SECTION]
PARSED = [c for c in COMMANDS if c[0] != PIPELINE_SECTION]


def door_stage(script: str) -> str | None:
    """data/prepare_data.py -> "prepare": the zhlora subcommand a door script calls."""
    path = REPO / script
    found = re.search(r'main\(\["([\w-]+)"', path.read_text(encoding="utf-8")) if path.is_file() else None
    return found.group(1) if found else None


def zhlora_argv(argv: list[str]) -> list[str] | None:
    """The `zhlora ...` arguments a command amounts to, or None if it is not a zhlora entry point."""
    if argv[0] == "zhlora":
        return argv[1:]
    if argv[0] == "python" and len(argv) > 1 and door_stage(argv[1]):
        return [door_stage(argv[1]), *argv[2:]]
    return None


class Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(entry, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Call entry(argv) but stop right after its argparse parser accepted argv."""
    def stopping(original):
        def parse(self, args=None, namespace=None):
            raise Parsed(original(self, args, namespace))
        return parse

    with monkeypatch.context() as m:
        for name in ("parse_args", "parse_intermixed_args"):
            m.setattr(argparse.ArgumentParser, name, stopping(getattr(argparse.ArgumentParser, name)))
        with pytest.raises(Parsed) as caught:
            entry(argv)
    return caught.value.namespace


def check_parses(argv: list[str], monkeypatch) -> None:
    """The command's parser accepts it and its config (or experiment) loads; nothing runs."""
    if argv[0] == "pip":
        if "-r" in argv:
            assert (Path.cwd() / argv[argv.index("-r") + 1]).is_file()
        return
    if argv[:3] == ["python", "-m", "pytest"]:
        assert all((REPO / a).is_file() for a in argv[3:] if not a.startswith("-"))
        return
    if argv[:2] == ["python", "-c"]:
        compile(argv[2], "<guide>", "exec")
        return
    if argv[:2] == ["python", "quick_start.py"]:
        load_config("configs/quick_start.yaml", argv[2:])
        return
    if argv[:2] == ["python", "scripts/make_reports.py"]:
        parse_only(load_make_reports().main, argv[2:], monkeypatch)
        return
    if argv[:2] == ["python", "experiments/datasets_data.py"]:
        spec = importlib.util.spec_from_file_location("datasets_data", REPO / argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parse_only(module.main, argv[2:], monkeypatch)
        return
    sub = zhlora_argv(argv)
    assert sub is not None, f"the guide test does not know how to check `{shlex.join(argv)}`; teach it"
    args = parse_only(zhlora_main, sub, monkeypatch)
    if sub[0] == "experiment":
        from zhlora.experiment import load_experiment

        load_experiment(args.experiment, args.overrides)
    elif hasattr(args, "overrides"):
        config = getattr(args, "config", None)
        default = Path("configs/default.yaml")
        load_config(config or (default if default.is_file() else None), args.overrides)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch folder laid out like the repository root: commands' relative paths land here."""
    folder = tmp_path_factory.mktemp("guide")
    shutil.copytree(REPO / "configs", folder / "configs")
    shutil.copy(REPO / "requirements.txt", folder / "requirements.txt")
    return folder


def test_generated_sections_are_current():
    """make_reports --check: what the committed snapshot gives is what docs/ holds."""
    assert load_make_reports().main(["--check"]) == 0, (
        "docs/guide.md or docs/results/performance.md is out of date: run python scripts/make_reports.py "
        "--no_collect and commit")


def test_guide_shows_each_step_and_each_faq_run():
    scripts = {argv[1] for _, _, argv in PIPELINE if argv[0] == "python"}
    for door in ("data/prepare_data.py", "training/train.py", "quick_start.py", "training/evaluate.py",
                 "visualization/plot_results.py", "examples/demo.py"):
        assert door in scripts, f"实践步骤 has no runnable `python {door}`"
    commands = [shlex.join(argv) for _, _, argv in COMMANDS]
    for _, before, after, shown in load_make_reports().FAQ:
        for name in (before, after):
            assert any(f"output.dir=runs/faq/{name}" in c for c in commands), f"no runnable command makes runs/faq/{name}"
            if any(key in ("exact_match", "avg_similarity") for key, _ in shown):
                assert any(f"--model_path runs/faq/{name}" in c for c in commands), f"runs/faq/{name} is never evaluated"


def test_pipeline_runs_on_the_tiny_model(workspace, tiny_model_dir, monkeypatch, capsys):
    """The six steps' commands, in the guide's order, each with the tiny model and small sizes."""
    monkeypatch.chdir(workspace)
    tiny = f"model.name={tiny_model_dir}"
    extra = {"prepare": ["--num_samples", "120", tiny], "validate": [], "doctor": [tiny], "params": [],
             "train": [tiny, "training.max_steps=2", "training.batch_size=2", "output.overwrite=true"],
             "evaluate": ["--max_samples", "4", "--max_new_tokens", "8", "--batch_size", "4", "--no_baseline"],
             "plot": [], "demo": ["--max_new_tokens", "8"]}
    ran = []
    for _, line, argv in PIPELINE:
        where = f"docs/guide.md:{line}: {shlex.join(argv)}"
        sub = zhlora_argv(argv)
        if argv[:2] == ["python", "-c"]:
            exec(compile(argv[2], "<guide>", "exec"), {})
        elif argv[0] == "echo" and argv[-2] == ">":
            Path(argv[-1]).write_text(" ".join(argv[1:-2]) + "\n", encoding="utf-8")
        elif sub and sub[0] in extra and not (sub[0] == "demo" and "interactive" in sub):
            assert zhlora_main([*sub, *extra[sub[0]]]) == 0, where
            ran.append(sub[0])
        else:  # pip, pytest, quick_start.py (minutes), the interactive demo (waits for a person)
            check_parses(argv, monkeypatch)
    out = capsys.readouterr().out
    assert {"prepare", "train", "evaluate", "plot", "demo"} <= set(ran), ran
    assert (workspace / "outputs" / "evaluation_results.json").is_file()
    assert (workspace / "outputs" / "training_loss.png").is_file()
    assert (workspace / "answers.jsonl").read_text(encoding="utf-8").count("response") == 1
    assert "[train] done" in out


@pytest.mark.parametrize("section, line, argv", PARSED, ids=[f"L{line}:{' '.join(argv[:2])}" for _, line, argv in PARSED])
def test_other_commands_parse(section, line, argv, monkeypatch):
    monkeypatch.chdir(REPO)  # configs/ and configs/experiments/ as the reader has them
    check_parses(argv, monkeypatch)


def test_the_command_extractor_reads_both_markings():
    text = ("## A\n```bash runnable\nzhlora train \\\n  lora.r=8   # comment\n```\n```bash\nnot this\n```\n"
            "<!-- runnable -->\n```bash\npython quick_start.py\n```\n")
    assert [(s, argv) for s, _, argv in runnable_commands(text)] == [
        ("A", ["zhlora", "train", "lora.r=8"]), ("A", ["python", "quick_start.py"])]
