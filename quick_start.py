"""The whole guide in one command, on the embedded SmolLM2-135M model, on a laptop CPU.

    python quick_start.py [key=value ...]        # ~10 minutes on 2 CPU cores (measured: docs/guide.md)

This file is the table of contents: each stage below is one guide step, run through
the same command a learner would type, handing over through files on disk.
  第二步 data      python data/prepare_data.py --config configs/quick_start.yaml -> data/*.json
  第三步 train     python training/train.py --config configs/quick_start.yaml    -> outputs/
  第四步 evaluate  python training/evaluate.py --model_path outputs ...          -> outputs/evaluation_results.json
  第五步 plot      python visualization/plot_results.py                          -> outputs/*.png
  第六步 demo      python examples/demo.py --model_path outputs --mode batch     -> outputs/demo_heldout.jsonl
It ends with what fine-tuning changed: exact match per task on the 300 test rows (questions
training never saw, asked in training's phrasings; the demo asks in phrasings it never saw),
base model -> LoRA, three answers side by side, and the time each stage took (also written
to outputs/quick_start_timing.json).

Data is made again whenever data/data_settings.json does not match this config (another
--num_samples from step 2, other tasks), and the reason is printed: training never reads
rows other than the ones this config asks for.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from zhlora import allocator, metrics
from zhlora.cli import main as zhlora
from zhlora.config import load_config
from zhlora.cpu_share import CpuShare
from zhlora.data import write_json
from zhlora.prepare import settings_changes

CONFIG = "configs/quick_start.yaml"
# Every test row is scored by teacher forcing (one forward pass each); these many are also
# generated for the examples, similarity and ROUGE (plus every self_cognition row).
GENERATE_SAMPLES = 16  # with the ~45 self_cognition rows: two batches of 32 per model
MAX_NEW_TOKENS = 64  # the longest reference (a self_cognition answer) is about 55 tokens
EXAMPLE_TASKS = ("num2cn", "cn2num", "self_cognition")
STAGES = ("prepare", "train", "evaluate", "plot", "demo")


def stage(title: str, argv: list[str], timing: dict) -> None:
    print(f"\n===== {title}: zhlora {' '.join(argv)} =====", flush=True)
    began = time.perf_counter()
    status = zhlora(argv)
    if status != 0:
        raise SystemExit(f"quick_start: stage '{title}' failed with status {status}")
    timing[title.split()[-1]] = round(time.perf_counter() - began, 1)
    print(f"===== {title}: {timing[title.split()[-1]]:.0f} s =====", flush=True)


def main(argv: list[str]) -> int:
    overrides = list(argv)
    cfg = load_config(CONFIG, overrides)
    allocator.use(cfg.training.allocator)  # jemalloc for every stage: may start this script again
    out, data_dir = Path(cfg.output.dir), Path(cfg.data.train_file).parent
    began, timing, share = time.perf_counter(), {}, CpuShare()
    changes = settings_changes(cfg, [], data_dir)
    if changes:
        print(f"[quick_start] making {data_dir}/ for this config: " + "; ".join(changes))
        stage("第二步 prepare", ["prepare", "--config", CONFIG, "--output_dir", str(data_dir), *overrides], timing)
    else:
        print(f"[quick_start] {data_dir}/ was made with this config's data settings: reusing it")
        timing["prepare"] = 0.0
    stage("第三步 train", ["train", "--config", CONFIG, *overrides], timing)
    stage("第四步 evaluate", ["evaluate", "--model_path", str(out), "--generate_samples", str(GENERATE_SAMPLES),
                             "--max_new_tokens", str(MAX_NEW_TOKENS), "--batch_size", "32"], timing)
    stage("第五步 plot", ["plot", "--output_dir", str(out)], timing)
    stage("第六步 demo", ["demo", "--model_path", str(out), "--mode", "batch"], timing)
    timing["total"] = round(time.perf_counter() - began, 1)
    timing["cpu_others_share"] = share.others()  # other programs' share of the CPU meanwhile (zhlora/cpu_share.py)
    write_json(out / "quick_start_timing.json", timing)  # atomic: a killed run leaves no half file
    report(out, data_dir, timing)
    return 0


def report(out: Path, data_dir: Path, timing: dict) -> None:
    """What a learner should see: the time, what changed per task, and answers side by side."""
    train = json.loads((out / "train_summary.json").read_text("utf-8"))
    results = json.loads((out / "evaluation_results.json").read_text("utf-8"))
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timing.items() if name in STAGES)
    print(f"\n===== quick start finished in {timing['total'] / 60:.1f} min ({parts}) =====")
    print(f"trainable params  {train['trainable_params']:,} / {train['total_params']:,} "
          f"({train['trainable_percent']:.2f}%)")
    print(f"training          {train['steps']} steps, {train['seconds_per_step']:.2f} s/step, "
          f"loss {first_loss(out):.3f} -> {train['final_loss']:.3f}, peak memory {train['peak_memory_mb']:.0f} MB")
    print_task_table(results)
    print_examples(out)
    print("\nartifacts:")
    for path in [data_dir / "chinese_instructions.json", out / "adapter_model.safetensors",
                 out / "training_history.jsonl", out / "train_summary.json", out / "evaluation_results.json",
                 out / "predictions.jsonl", *sorted(out.glob("*.png")), out / "demo_heldout.jsonl",
                 out / "quick_start_timing.json"]:
        print(f"  {path}")


def print_task_table(results: dict) -> None:
    """Test-row exact match per task, base model -> LoRA, with the LoRA side's 95% interval."""
    base = results.get("baseline", {})

    def number(value, width=8, sign=""):
        return f"{'-':>{width}}" if value is None else f"{value:>{sign}{width}.2f}"

    def interval(ci, sign=""):
        return "-" if not ci else f"[{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]"

    print(f"\n{'test exact match':<22}{'n':>5}{'base':>8}{'LoRA':>8}   95% CI (LoRA)")
    for task, row in results["per_task"].items():
        if "exact_match" not in row:
            continue
        apart = "   (scored apart: names 小知 and zhlora)" if task in metrics.SCORED_APART else ""
        base_em = base.get("per_task", {}).get(task, {}).get("exact_match")
        print(f"{task:<22}{row.get('n_exact', row['n']):>5}{number(base_em)}{number(row['exact_match'])}   "
              f"{interval(row.get('exact_match_ci'))}{apart}")
    delta, delta_ci = results.get("delta", {}).get("exact_match"), results.get("delta_ci", {}).get("exact_match")
    print(f"{'all but scored apart':<22}{'':>5}{number(base.get('exact_match'))}{number(results['exact_match'])}   "
          f"difference {number(delta, 0, '+')}, 95% CI {interval(delta_ci, '+')} (paired by row)")
    for key in ("success_rate", "avg_similarity", "test_loss"):
        print(f"{metrics.metric_label(key):<42} base{number(base.get(key), 7)}   LoRA{number(results.get(key), 7)}")


def print_examples(out: Path) -> None:
    """One generated answer of each EXAMPLE_TASKS task: question, reference, base, LoRA."""
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text("utf-8").splitlines()]
    for task in EXAMPLE_TASKS:
        row = next((r for r in rows if r["task"] == task and r["prediction"] is not None), None)
        if row:
            print(f"\nQ: {row['instruction']} {row['input']}".rstrip())
            print(f"   reference: {row['reference']}\n   base:      {row['baseline_prediction']}\n"
                  f"   LoRA:      {row['prediction']}")


def first_loss(out: Path) -> float:
    for line in (out / "training_history.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            return row["loss"]
    return float("nan")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
