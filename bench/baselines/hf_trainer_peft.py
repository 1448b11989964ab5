"""BASELINE, not zhlora: the usual tutorial recipe for LoRA fine-tuning, written plainly.

    python bench/baselines/hf_trainer_peft.py --data FILE --model FOLDER --result OUT.json

What a typical blog post or notebook does, and what bench/train_throughput.py
compares zhlora against:
  - HF `Trainer` + PEFT `get_peft_model` (LoRA r=16, alpha=32, dropout 0.05, q_proj,v_proj);
  - every sample padded to max_length (`padding="max_length"`), no length grouping;
  - fp32 (no mixed precision), Trainer defaults otherwise (AdamW, linear schedule).
Prompt tokens and padding get label -100, so the loss covers answers only, as in zhlora.

Only the measuring is added, kept apart below the recipe: a callback times each
optimizer step and the collator counts each batch's tokens. They do not change
what is computed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)


def tokenize(row, tokenizer, max_length):
    """Chat-format the sample, pad it to max_length, mask the prompt and the padding with -100."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["output"]}], tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    enc = tokenizer(full, add_special_tokens=False, max_length=max_length, truncation=True, padding="max_length")
    enc["labels"] = [-100 if i < n_prompt or not m else t
                     for i, (t, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))]
    return enc


# ---------------------------------------------------------------- measuring only


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step (forward, backward, clipping, optimizer)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


class CountingCollator:
    """default_data_collator that also records, per batch, supervised / real / padded tokens."""

    def __init__(self):
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = default_data_collator(features)
        self.batches.append({"supervised": int((batch["labels"][:, 1:] != -100).sum()),
                             "tokens": int(batch["attention_mask"].sum()), "padded": batch["input_ids"].numel()})
        return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="alpaca JSON (instruction, input, output)")
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--result", required=True, help="where to write the measured figures (JSON)")
    parser.add_argument("--output_dir", default="bench/.work/runs/baseline")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    # ---- the tutorial recipe
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(lambda row: tokenize(row, tokenizer, args.max_length), remove_columns=dataset.column_names)
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.learning_rate, warmup_steps=0.1, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, use_cpu=args.device == "cpu")
    timer, collator = StepTimer(), CountingCollator()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      callbacks=[timer])
    metrics = trainer.train().metrics

    # ---- what the benchmark reads
    steps = len(timer.seconds)
    batches = collator.batches[:steps]  # the dataloader may fetch one batch ahead
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"steps": steps, "train_seconds": sum(timer.seconds), "step_seconds": timer.seconds,
              "step_supervised": [b["supervised"] for b in batches],
              "supervised": sum(b["supervised"] for b in batches), "tokens": sum(b["tokens"] for b in batches),
              "padded_tokens": sum(b["padded"] for b in batches), "train_runtime": metrics.get("train_runtime"),
              "final_loss": losses[-1] if losses else None,
              "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(f"[baseline] {steps} steps in {result['train_seconds']:.1f} s, "
          f"{result['supervised'] / result['train_seconds']:.1f} supervised tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
