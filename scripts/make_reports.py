"""Write the project's measured figures into docs/: docs/results/performance.md and the
generated sections of docs/guide.md. No figure in them is typed by hand.

    python scripts/make_reports.py               # snapshot the results found, then write the reports
    python scripts/make_reports.py --no_collect  # rewrite the reports from the committed snapshot only
    python scripts/make_reports.py --check       # exit 1 if a report differs from what the snapshot gives

Two stages, handing over through files:
1. collect. Run outputs live where git does not look (runs/, outputs/ are ignored; bench/results/
   belongs to the benchmarks). Their result files are copied byte for byte into docs/results/data/,
   which git keeps:
       runs/<experiment>/results.csv, results.md, *.png     -> data/experiments/<experiment>/
       runs/<experiment>/<point>/seed*/RUN_FILES            -> data/experiments/<experiment>/<point>/seed*/
       outputs/RUN_FILES, QUICK_START_EXTRA, outputs/*.png  -> data/outputs/
       runs/default_run/RUN_FILES, main_path_timing.json    -> data/default_run/
       runs/faq/<case>/RUN_FILES                            -> data/faq/<case>/
       runs/adapters_eval/{report.md,evaluation_results.json} -> data/advanced/adapters_eval/
       runs/distill{,_labels_only}/RUN_FILES                -> data/advanced/distill{,_labels_only}/
       bench/results/*.json                                 -> data/bench/
       export/{export_report.json,verify_report.json}       -> data/export/
   An absent source leaves its snapshot alone, so a fresh clone may run this script without
   losing the committed numbers; a present source replaces its whole snapshot folder.
2. render. Only the snapshot, zhlora/lora.py and the model configs that ship in
   zhlora/resources/model_configs/ are read (parameter counts: zhlora.params on the meta device,
   offline). performance.md is written whole; in the guide only the text between
   `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->` is replaced. A result
   that is missing is said plainly, with the command that produces it.

Each section has its renderer in scripts/report_sections/ (one module per part of the guide;
common.py holds what they share); this file collects, renders and checks.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
from pathlib import Path

from zhlora.files import write_atomic

from report_sections.advanced import EXPORT_FILES, section_distill, section_export, section_task_adapters
from report_sections.bench import section_bench
from report_sections.common import GUIDE, NOTE, REPORT, RUN_FILES, SNAPSHOT
from report_sections.experiments import section_experiments, section_tuning
from report_sections.lora_vs_full import claims, section_lora_code, section_lora_vs_full, section_params
from report_sections.runs import (FAQ, FAQ_TIMED, FAQ_TIMING_POINTS, MAIN_PATH_TIMING, QUICK_START_EXTRA,
                                  section_default_run, section_faq, section_learning_curves, section_quick_start)

__all__ = ["FAQ", "FAQ_TIMED", "FAQ_TIMING_POINTS", "claims", "main", "section_tuning"]  # read by the tests

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


# ---- collect ------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md", ".csv")


def without_machine_paths(text: str, root: Path) -> str:
    """A result file's text with this machine's paths made relative: the repository's to the repo
    (runs/x, not /home/me/zhlora/runs/x), the home folder's to ~ (~/.cache/zhlora/...)."""
    for prefix, short in ((str(root.resolve()) + "/", ""), (str(root) + "/", ""), (str(Path.home()) + "/", "~/")):
        text = text.replace(prefix, short)
    return text


def _replace(root: Path, target: Path, base: Path, files: list[Path]) -> list[str]:
    """Make target hold exactly these files (paths kept relative to base); text files lose this
    machine's absolute paths (without_machine_paths), so no committed result names one."""
    shutil.rmtree(target, ignore_errors=True)
    for f in files:
        dest = target / f.relative_to(base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix in TEXT_SUFFIXES:
            dest.write_text(without_machine_paths(f.read_text(encoding="utf-8"), root), encoding="utf-8")
        else:
            shutil.copyfile(f, dest)
    return [str(f) for f in files]


def _run_files(folder: Path) -> list[Path]:
    return [folder / name for name in RUN_FILES if (folder / name).is_file()]


def collect(root: Path) -> list[str]:
    """Copy the result files found into the snapshot; returns the sources copied."""
    data, copied = root / SNAPSHOT, []
    for results in sorted((root / "runs").glob("*/results.csv")):
        exp = results.parent
        files = [f for f in sorted(exp.iterdir()) if f.suffix in (".csv", ".md", ".png")
                 or f.name == "comparisons.json"]
        # predictions.jsonl too: the paired verdicts (comparisons.json) are computed from its rows
        files += [f for seed in sorted(exp.glob("*/seed*"))
                  for f in [*_run_files(seed), seed / "predictions.jsonl"] if f.is_file()]
        copied += _replace(root, data / "experiments" / exp.name, exp, files)
    outputs = root / "outputs"
    if (outputs / "train_summary.json").is_file():
        extra = [outputs / name for name in QUICK_START_EXTRA if (outputs / name).is_file()]
        copied += _replace(root, data / "outputs", outputs, _run_files(outputs) + extra + sorted(outputs.glob("*.png")))
    default_run = root / "runs" / "default_run"
    if (default_run / "evaluation_results.json").is_file():
        timing = [default_run / MAIN_PATH_TIMING] if (default_run / MAIN_PATH_TIMING).is_file() else []
        copied += _replace(root, data / "default_run", default_run, _run_files(default_run) + timing)
    for case in sorted((root / "runs" / "faq").glob("*/training_history.jsonl")):
        copied += _replace(root, data / "faq" / case.parent.name, case.parent, _run_files(case.parent))
    adapters = root / "runs" / "adapters_eval"
    if (adapters / "report.md").is_file():
        copied += _replace(root, data / "advanced" / "adapters_eval", adapters,
                           [adapters / n for n in ("report.md", "evaluation_results.json") if (adapters / n).is_file()])
    for name in ("distill", "distill_labels_only"):
        run = root / "runs" / name
        if (run / "evaluation_results.json").is_file():
            copied += _replace(root, data / "advanced" / name, run, _run_files(run))
    bench = sorted((root / "bench" / "results").glob("*.json"))
    if bench:
        copied += _replace(root, data / "bench", root / "bench" / "results", bench)
    export = root / "export"
    if (export / "verify_report.json").is_file():
        copied += _replace(root, data / "export", export, [export / n for n in EXPORT_FILES if (export / n).is_file()])
    return copied


SECTIONS = {"default_run": section_default_run, "learning_curves": section_learning_curves,
            "lora_code": section_lora_code, "task_adapters": section_task_adapters, "distill": section_distill,
            "params": section_params, "lora_vs_full": section_lora_vs_full, "bench": section_bench,
            "quick_start": section_quick_start, "faq": section_faq, "experiments": section_experiments,
            "export": section_export, "tuning": section_tuning}


# ---- documents ----------------------------------------------------------------------------------

def render_report(root: Path) -> str:
    data = root / SNAPSHOT
    parts = ["# 性能分析：LoRA 与全量微调（实测）", "",
             "本文件由 `python scripts/make_reports.py` 从 `docs/results/data/`（实验输出的快照）生成，"
             "请勿手改。每个说法旁边是本项目在内置模型上的实测值，以及它在这个规模下为什么成立或不成立。", "",
             "## LoRA 与全量微调", "", section_lora_vs_full(root, data, "data"), "",
             "## 可训练参数（由模型 config 计算）", "", section_params(root, data, "data"), "",
             "## 速度基准（bench/）", "", section_bench(root, data, "data"), ""]
    return "\n".join(parts)


def render_guide(root: Path, text: str) -> str:
    """The guide with every generated section replaced by what the snapshot gives now."""
    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in SECTIONS:
            raise KeyError(f"{GUIDE}: unknown generated section {name!r}; known: {', '.join(SECTIONS)}")
        body = SECTIONS[name](root, root / SNAPSHOT, "results/data")
        return f"{match.group(1)}{NOTE}\n\n{body}\n\n{match.group(4)}"

    return MARKER.sub(fill, text)


def expected_files(root: Path) -> dict[Path, str]:
    files = {root / REPORT: render_report(root)}
    if (root / GUIDE).is_file():
        files[root / GUIDE] = render_guide(root, (root / GUIDE).read_text(encoding="utf-8"))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/results/performance.md and docs/guide.md's "
                                                 "generated sections from run outputs.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    parser.add_argument("--no_collect", action="store_true", help="render from the committed snapshot only")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (args.check or args.no_collect):
        copied = collect(root)
        print(f"[make_reports] snapshot: {len(copied)} files copied into {SNAPSHOT}/")
    try:
        files = expected_files(root)
    except KeyError as err:
        print(f"make_reports: error: {err.args[0]}", file=sys.stderr)
        return 2
    stale = []
    for path, text in files.items():
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old == text:
            continue
        stale.append(path)
        if args.check:
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1)
            print("\n".join(list(diff)[:40]))
        else:
            write_atomic(path, text)
            print(f"[make_reports] wrote {path.relative_to(root)}")
    if args.check and stale:
        print(f"make_reports: out of date: {', '.join(str(p.relative_to(root)) for p in stale)}; run "
              "python scripts/make_reports.py --no_collect (or without it, to take new results) and commit",
              file=sys.stderr)
        return 1
    if not stale:
        print("[make_reports] reports are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
