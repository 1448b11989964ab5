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
the updates), "svd" re-factorises the weighted sum at the largest r. Its --adapters is
the option every command shares (NAME=PATH, repeated or comma-joined); they are loaded
beside the run's own adapter, with the same checks, by serving/adapters.py.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from zhlora.errors import ZhloraError
from zhlora.files import write_json
from zhlora.formatting import encode_prompt
from zhlora.generation import load_run
from zhlora.safety import adapter_name_problem
from zhlora.serving.adapters import add_adapters_argument, load_run_with_adapters, parse_adapters

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.5}
PROMPTS = [{"instruction": "请用汉字写出下面这个数。", "input": "2024"},
           {"instruction": "把下面的句子转换成繁体中文。", "input": "我们今天去公园散步。"},
           {"instruction": "用一句话介绍一下长城。", "input": ""}]


class MergeError(ZhloraError, ValueError):
    """A merge zhlora refuses (a full fine-tune, weights that do not match the adapters)."""


def _logits(model, prompts: list[list[int]]) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p], device=next(model.parameters()).device)).logits.float().cpu()
                for p in prompts]


def merge_run(model_path: str, output: str, dtype: str = "float32") -> dict:
    """Write the merged model to `output`; returns {"max_logit_diff", "tolerance", ...}."""
    import torch  # here, not at the top: `zhlora --help` imports this module
    from transformers import AutoModelForCausalLM

    model, tokenizer, cfg = load_run(model_path, device="cpu")
    if not hasattr(model, "merge_and_unload"):
        raise MergeError(f"{model_path} is a full fine-tune, not a LoRA run: it is already a standalone model")
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
    write_json(out / "merge_report.json", report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default="outputs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))


def run(args: argparse.Namespace) -> int:
    report = merge_run(args.model_path, args.output, args.dtype)
    verdict = "OK" if report["ok"] else "TOO LARGE"
    print(f"[merge] wrote {report['output']} ({args.dtype}); largest logit difference merged vs adapter on "
          f"{report['prompts']} prompts: {report['max_logit_diff']:.2e} (tolerance {report['tolerance']:g}: {verdict})")
    return 0 if report["ok"] else 1


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default="outputs", help="a run whose base model the adapters share")
    add_adapters_argument(parser, "the adapters to mix", required=True)
    parser.add_argument("--weights", required=True, help="one weight per adapter, e.g. 0.5,0.5")
    parser.add_argument("--combination_type", default="cat", choices=["linear", "cat", "svd"])
    parser.add_argument("--name", default="merged")
    parser.add_argument("--output", required=True)


def run_adapters(args: argparse.Namespace) -> int:
    pairs = parse_adapters(args.adapters)  # names checked before anything loads
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise MergeError(f"--weights {args.weights}: write one number per adapter, e.g. 0.5,0.5") from None
    if len(weights) != len(pairs):
        raise MergeError("--adapters name=path,... and one --weights value each")
    if adapter_name_problem(args.name):
        raise MergeError(f"--name {args.name}: {adapter_name_problem(args.name)}")
    model, tokenizer, _ = load_run_with_adapters(args.model_path, pairs, device="cpu")
    names = [name for name, _ in pairs]
    model.add_weighted_adapter(names, weights, args.name, combination_type=args.combination_type)
    model.set_adapter(args.name)
    tmp = Path(args.output).parent / f".{Path(args.output).name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[args.name])
    saved = tmp / args.name  # PEFT saves a non-default adapter in a sub-folder
    shutil.copytree(saved if saved.is_dir() else tmp, Path(args.output), dirs_exist_ok=True)
    shutil.copy(Path(args.model_path) / "config.yaml", Path(args.output) / "config.yaml")
    tokenizer.save_pretrained(args.output)
    shutil.rmtree(tmp)
    print(f"[merge-adapters] {args.combination_type} merge of {names} with weights {weights} -> {args.output}")
    return 0
