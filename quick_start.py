"""The whole guide in one command, on the embedded SmolLM2-135M model, on a laptop CPU.

    python quick_start.py [key=value ...]        # ~10 minutes on 2 CPU cores

This file is the table of contents: each stage below is one guide step, run through
the same command a learner would type, handing over through files on disk.
  第二步 data      python data/prepare_data.py              -> data/*.json
  第三步 train     python training/train.py --config configs/quick_start.yaml -> outputs/
  第四步 evaluate  python training/evaluate.py --model_path outputs -> outputs/evaluation_results.json
  第五步 plot      python visualization/plot_results.py     -> outputs/*.png
  第六步 demo      python examples/demo.py --mode batch ...  -> outputs/demo_responses.jsonl
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from zhlora.cli import main as zhlora
from zhlora.config import load_config

CONFIG = "configs/quick_start.yaml"
DEMO_QUESTIONS = [
    {"instruction": "请用汉字写出下面这个数。", "input": "4096"},
    {"instruction": "把下面的句子转换成繁体中文。", "input": "我们今天去公园散步。"},
    {"instruction": "用一句话介绍一下长城。", "input": ""},
]


def stage(title: str, argv: list[str]) -> None:
    print(f"\n===== {title}: zhlora {' '.join(argv)} =====", flush=True)
    began = time.perf_counter()
    status = zhlora(argv)
    if status != 0:
        raise SystemExit(f"quick_start: stage '{title}' failed with status {status}")
    print(f"===== {title}: {time.perf_counter() - began:.0f} s =====", flush=True)


def main(argv: list[str]) -> int:
    overrides = list(argv)
    cfg = load_config(CONFIG, overrides)
    out = Path(cfg.output.dir)
    began = time.perf_counter()
    if not Path(cfg.data.train_file).is_file():
        stage("第二步 prepare data", ["prepare", "--config", CONFIG, *overrides])
    stage("第三步 train", ["train", "--config", CONFIG, *overrides])
    stage("第四步 evaluate", ["evaluate", "--model_path", str(out), "--max_samples", "48",
                             "--max_new_tokens", "48", "--batch_size", "16"])
    stage("第五步 plot", ["plot", "--output_dir", str(out)])
    questions = out / "demo_questions.jsonl"
    questions.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in DEMO_QUESTIONS), "utf-8")
    answers = out / "demo_responses.jsonl"
    stage("第六步 demo", ["demo", "--model_path", str(out), "--mode", "batch", "--compare",
                         "--input", str(questions), "--output", str(answers), "--max_new_tokens", "48"])

    train = json.loads((out / "train_summary.json").read_text("utf-8"))
    results = json.loads((out / "evaluation_results.json").read_text("utf-8"))
    print(f"\n===== quick start finished in {(time.perf_counter() - began) / 60:.1f} min =====")
    print(f"trainable params  {train['trainable_params']:,} / {train['total_params']:,} "
          f"({train['trainable_percent']:.2f}%)")
    print(f"training          {train['steps']} steps, {train['seconds_per_step']:.2f} s/step, "
          f"loss {first_loss(out):.3f} -> {train['final_loss']:.3f}, peak memory {train['peak_memory_mb']:.0f} MB")
    base = results.get("baseline", {})
    for key in ("exact_match", "success_rate", "avg_similarity", "rouge_l"):
        print(f"{key:<17} fine-tuned {results[key]:.3f}   base model {base.get(key, float('nan')):.3f}")
    for row in map(json.loads, answers.read_text("utf-8").splitlines()):
        print(f"Q: {row['instruction']} {row.get('input', '')}\n   base: {row.get('base_response', '')}\n"
              f"   LoRA: {row['response']}")
    print("\nartifacts:")
    for path in [Path(cfg.data.train_file).parent / "chinese_instructions.json", out / "adapter_model.safetensors",
                 out / "training_history.jsonl", out / "train_summary.json", out / "evaluation_results.json",
                 out / "predictions.jsonl", *sorted(out.glob("*.png")), answers]:
        print(f"  {path}")
    return 0


def first_loss(out: Path) -> float:
    for line in (out / "training_history.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            return row["loss"]
    return float("nan")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
