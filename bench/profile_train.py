"""Where zhlora's training time goes: torch.profiler over a short `zhlora train`, top ops by self time.

    python bench/profile_train.py                        # zhlora_fastest settings, 4 steps of batch 4
    python bench/profile_train.py --variant zhlora_default --steps 2
    python bench/profile_train.py --overrides training.gradient_checkpointing=true   # one more knob

Profiles the whole call of zhlora.train.train (model loading, encoding and the steps) in
this process, so the allocator is the one this process was started with: for
zhlora_fastest start it as `LD_PRELOAD=libjemalloc.so.2 python bench/profile_train.py`. It
writes the table to bench/results/profile_VARIANT.txt, so a README claim about what
limits the speed can point at it. Profiling slows ops down: read shares, not seconds.
"""
from __future__ import annotations

import argparse

import torch

from common import (RESULTS, WORK, add_common_args, model_folder, result_name, switch_variants, write_subset,
                    zhlora_overrides)


def main(argv=None) -> int:
    from zhlora.config import load_config
    from zhlora.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, steps=4, repeats=1)
    parser.add_argument("--variant", default="zhlora_fastest", choices=list(switch_variants("cpu")))
    parser.add_argument("--overrides", nargs="*", default=[], help="more key=value for zhlora")
    parser.add_argument("--rows", type=int, default=30, help="ops shown")
    args = parser.parse_args(argv)

    model = model_folder(args.model)
    data_file = write_subset(args.steps * args.batch_size, args.seed, args.workload)
    extra = switch_variants(args.device)[args.variant]
    cfg = load_config(None, [*zhlora_overrides(args, model, data_file, WORK / "runs" / f"profile-{args.variant}"),
                             *extra, *args.overrides])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        summary = train(cfg)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    header = (f"zhlora train, variant {args.variant}, overrides {extra + args.overrides}, {summary['steps']} steps, "
              f"{summary['supervised_tokens_per_s']:.1f} supervised tok/s under the profiler\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result_name('profile_' + args.variant, args.device, args.workload)}.txt"
    path.write_text(header + table + "\n", encoding="utf-8")
    print(header + table)
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
