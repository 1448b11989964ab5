"""Training throughput: the usual tutorial baseline, then zhlora with one speed switch more per row.

    python bench/train_throughput.py                            # mixed workload, 30 steps x batch 4, 3 repeats
    python bench/train_throughput.py --workload alpaca_zh_demo  # long answers only
    python bench/train_throughput.py --variants zhlora_fastest,zhlora_default:1   # one run of the second
    python bench/train_throughput.py --steps 2 --repeats 1      # smoke run

Variants, all on the same model, data subset (see common.py), LoRA r=16 alpha=32
dropout 0.05 on q_proj,v_proj, batch size, learning rate and one epoch:
  baseline             bench/baselines/hf_trainer_peft.py: HF Trainer + PEFT, every sample
                       padded to max_length, no length grouping, fp32 (the usual tutorial);
  zhlora_default       `zhlora train`, every speed switch off (fp32, dynamic padding, length
                       grouping, answer-only logits, the system allocator, the plain loss);
  zhlora_fast          + training.mixed_precision=bf16 (on a CPU with native bf16);
  zhlora_bf16_weights  + model.dtype=bfloat16 (frozen weights in bf16, LoRA weights fp32);
  zhlora_jemalloc      + training.allocator=jemalloc (zhlora/allocator.py);
  zhlora_fastest       + training.fused_cross_entropy=true (zhlora/loss.py): the quick start's setting;
  zhlora_compile       zhlora_fastest + training.torch_compile=true (each decoder layer compiled by inductor;
                       the first steps compile: ~16 s more with an empty inductor cache, see README);
  zhlora_packing       zhlora_fastest + training.packing=true;
  zhlora_fast_dropout  zhlora_fastest + training.fast_dropout=true (LoRA dropout masks cut from
                       64-bit random words, on the bf16 inputs, zhlora/training/dropout.py);
  zhlora_packing_fast_dropout   both of the two above;
  zhlora_low_memory    zhlora_fastest + training.gradient_checkpointing=true (for short memory).
Each repeat runs in a fresh process (peak RSS is its own); repeats are interleaved
(a, b, c, a, b, c, ...) so a slow phase of the machine hits every variant alike. Variants not
named in --variants keep their rows from the last result file when it measured the same data
with the same settings (each run records its date and the CPU share other programs took).

Figures: supervised tokens/s (answer tokens the loss learns from), total tokens/s
(real tokens, padding not counted), seconds per optimizer step, peak RSS; medians
over repeats and their ratios to the baseline. Timing covers the optimizer steps
only, the first (cold) one included for every runner: model loading, tokenising and
saving are left out. `baseline_steady` in the JSON gives the baseline without its
first step.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import (APPEND_HELP, WORK, add_common_args, earlier_runs, figures, machine, median_of, model_folder,
                    parse_variants, result_name, run_measured, run_zhlora, switch_variants, token_counts, write_result,
                    write_subset)

BASELINE = "bench/baselines/hf_trainer_peft.py"


def run_baseline(args, model: str, data_file, name: str) -> dict:
    result_file = WORK / "runs" / name / "baseline_result.json"
    command = [sys.executable, BASELINE, "--data", str(data_file), "--model", model, "--result", str(result_file),
               "--output_dir", str(WORK / "runs" / name), "--device", args.device, "--batch_size",
               str(args.batch_size), "--max_length", str(args.max_length), "--learning_rate", str(args.learning_rate),
               "--seed", str(args.seed)]
    measured = run_measured(command, WORK / "logs" / f"{name}.log")
    return {**measured, **json.loads(result_file.read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--variants", default=",".join(["baseline", *switch_variants("cpu")]))
    parser.add_argument("--append", action="store_true", help=APPEND_HELP)
    args = parser.parse_args(argv)
    switches = switch_variants(args.device)
    plan = parse_variants(args.variants, args.repeats, ["baseline", *switches])

    model = model_folder(args.model)
    data_file = write_subset(args.steps * args.batch_size, args.seed, args.workload)
    counts = token_counts(data_file, model, args.max_length)
    print(f"[bench] {data_file.name}: {counts}")
    variants = list(plan)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    steady: list[dict] = []
    for repeat in range(max(plan.values())):
        for variant in [v for v in variants if repeat < plan[v]]:
            name = f"{variant}-{args.workload}-{args.device}-{repeat}"
            if variant == "baseline":
                run = run_baseline(args, model, data_file, name)
                if run["supervised"] != counts["supervised"]:  # different tokenisation: say so, use its own count
                    print(f"[bench] note: baseline counted {run['supervised']} supervised tokens, zhlora "
                          f"{counts['supervised']}")
                fig = figures(run, run["supervised"], run["tokens"])
                if run["steps"] > 1:  # without the cold first step
                    later = sum(run["step_seconds"][1:])
                    steady.append({"seconds_per_step": later / (run["steps"] - 1),
                                   "supervised_tokens_per_s": sum(run["step_supervised"][1:]) / later})
            else:
                run = run_zhlora(args, model, data_file, name, switches[variant])
                fig = figures(run, run["supervised"], counts["tokens"])
            fig["final_loss"] = run["final_loss"]
            fig["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if "allocator" in run:
                fig["allocator"] = run["allocator"]
            if run.get("cpu_others_share") is not None:  # zhlora/cpu_share.py: others' share of the CPU meanwhile
                fig["cpu_others_share"] = run["cpu_others_share"]
            if run.get("peak_gpu_mb") is not None:
                fig["peak_gpu_mb"] = run["peak_gpu_mb"]
            runs[variant].append(fig)
            print(f"[bench] {name}: {fig['supervised_tokens_per_s']:.1f} supervised tok/s, "
                  f"{fig['seconds_per_step']:.2f} s/step, peak RSS {fig['peak_rss_mb']:.0f} MB")
    write_throughput(args, switches, data_file, counts, runs, steady)
    return 0


def write_throughput(args, switches: dict, data_file: Path, counts: dict, runs: dict, steady: list[dict]) -> None:
    """results/train_throughput*.json: this invocation's runs, the earlier rows it did not renew
    (common.earlier_runs), medians and ratios to the baseline."""
    overrides = {v: switches[v] for v in runs if v in switches}
    here = machine(args.device)
    settings = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                "max_length": args.max_length, "learning_rate": args.learning_rate, "repeats": args.repeats,
                "lora": "r16 a32 d0.05 q_proj,v_proj", "first_step": "included for every runner"}
    kept = earlier_runs(result_name("train_throughput", args.device, args.workload), data_file.name, settings, runs,
                        here, switches, args.append)
    for variant, earlier in kept.items():
        runs[variant] = earlier + runs.get(variant, [])
        if variant in switches:
            overrides[variant] = switches[variant]
    medians = {v: median_of(r) for v, r in runs.items()}
    base = medians.get("baseline")
    ratios = {}
    if base:
        for v, m in medians.items():
            ratios[v] = {"supervised_tokens_per_s": m["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
                         "tokens_per_s": m["tokens_per_s"] / base["tokens_per_s"],
                         "peak_rss": m["peak_rss_mb"] / base["peak_rss_mb"]}
    write_result(result_name("train_throughput", args.device, args.workload), {
        "machine": here, "data": {"file": data_file.name, "workload": args.workload, **counts},
        "settings": {**settings, "overrides": overrides},
        "median": medians, "ratio_to_baseline": ratios, "runs": runs,
        "baseline_steady": median_of(steady) if steady else None})


if __name__ == "__main__":
    raise SystemExit(main())
