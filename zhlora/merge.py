"""Merge and export: fold a LoRA adapter into its base model, or mix several adapters.

    zhlora merge --model_path outputs --output merged [--dtype bfloat16]
    zhlora merge-adapters --model_path outputs --adapters math=runs/math,zh=runs/zh \
        --weights 0.5,0.5 --output merged_adapter

`merge` writes a standalone model (no PEFT needed to load it). The merge is done in
fp32, W = W0 + (lora_alpha / r) * B @ A, and only then cast to --dtype, so rounding
happens once. It then reloads what it wrote and prints the largest logit difference
against the unmerged adapter on a few test prompts; it fails if that is above the
tolerance (fp32: 1e-4; bf16/fp16 weights round each value to ~3 significant digits,
so their difference is reported against a looser 0.5 and called out).

`merge-adapters` is PEFT's `add_weighted_adapter`: "linear" adds the weighted A and B
(same r required), "cat" concatenates them (r adds up: exactly the weighted sum of
the updates), "svd" re-factorises the weighted sum at the largest r.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from zhlora.formatting import encode_prompt
from zhlora.generation import load_run
from zhlora.safety import adapter_name_problem

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.5}
PROMPTS = [{"instruction": "请用汉字写出下面这个数。", "input": "2024"},
           {"instruction": "把下面的句子转换成繁体中文。", "input": "我们今天去公园散步。"},
           {"instruction": "用一句话介绍一下长城。", "input": ""}]


@torch.no_grad()
def _logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p], device=next(model.parameters()).device)).logits.float().cpu()
            for p in prompts]


def merge_run(model_path: str, output: str, dtype: str = "float32") -> dict:
    """Write the merged model to `output`; returns {"max_logit_diff", "tolerance", ...}."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, cfg = load_run(model_path, device="cpu")
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"{model_path} is a full fine-tune, not a LoRA run: it is already a standalone model")
    model = model.float()
    prompts = [encode_prompt(p, tokenizer, cfg.model.template) for p in PROMPTS]
    before = _logits(model, prompts)
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    out = Path(output)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole folder appears at once: never a half-written model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    diff = max((a - b).abs().max().item() for a, b in zip(before, _logits(reloaded, prompts)))
    report = {"model_path": model_path, "output": str(out), "dtype": dtype, "max_logit_diff": diff,
              "tolerance": TOLERANCE[dtype], "prompts": len(prompts), "ok": diff <= TOLERANCE[dtype]}
    (out / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zhlora merge", description="fold a LoRA adapter into the base model")
    parser.add_argument("--model_path", default="outputs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    args = parser.parse_args(argv)
    try:
        report = merge_run(args.model_path, args.output, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"zhlora merge: error: {err}", file=sys.stderr)
        return 2
    verdict = "OK" if report["ok"] else "TOO LARGE"
    print(f"[merge] wrote {report['output']} ({args.dtype}); largest logit difference merged vs adapter on "
          f"{report['prompts']} prompts: {report['max_logit_diff']:.2e} (tolerance {report['tolerance']:g}: {verdict})")
    return 0 if report["ok"] else 1


def main_adapters(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zhlora merge-adapters", description="weighted merge of LoRA adapters")
    parser.add_argument("--model_path", default="outputs", help="a run whose base model the adapters share")
    parser.add_argument("--adapters", required=True, help="name=path,name=path")
    parser.add_argument("--weights", required=True, help="one weight per adapter, e.g. 0.5,0.5")
    parser.add_argument("--combination_type", default="cat", choices=["linear", "cat", "svd"])
    parser.add_argument("--name", default="merged")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.adapters.split(",")]
    weights = [float(w) for w in args.weights.split(",")]
    if any(len(p) != 2 for p in pairs) or len(weights) != len(pairs):
        print("zhlora merge-adapters: error: --adapters name=path,... and one --weights value each", file=sys.stderr)
        return 2
    for name in [n for n, _ in pairs] + [args.name]:
        if adapter_name_problem(name):
            print(f"zhlora merge-adapters: error: {adapter_name_problem(name)}", file=sys.stderr)
            return 2
    model, tokenizer, _ = load_run(args.model_path, device="cpu")
    for name, path in pairs:
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter([n for n, _ in pairs], weights, args.name, combination_type=args.combination_type)
    model.set_adapter(args.name)
    tmp = Path(args.output).parent / f".{Path(args.output).name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[args.name])
    saved = tmp / args.name  # PEFT saves a non-default adapter in a sub-folder
    shutil.copytree(saved if saved.is_dir() else tmp, Path(args.output), dirs_exist_ok=True)
    shutil.copy(Path(args.model_path) / "config.yaml", Path(args.output) / "config.yaml")
    tokenizer.save_pretrained(args.output)
    shutil.rmtree(tmp)
    print(f"[merge-adapters] {args.combination_type} merge of {[n for n, _ in pairs]} with weights {weights} "
          f"-> {args.output}")
    return 0
