"""Model FLOPs utilisation (MFU) of zhlora's LoRA training, against this machine's matmul peak.

    python bench/mfu.py                          # peak fp32 + bf16, then zhlora_fastest, 3 repeats
    python bench/mfu.py --variant zhlora_fast    # another row of train_throughput.py instead
    python bench/mfu.py --steps 2 --repeats 1    # smoke run
    python bench/mfu.py --from_throughput        # no training: train_throughput.py's timings of the variant

1. Peak: the best of --trials timings of --iters square matmuls (--size, default
   2048x2048, 2*size^3 FLOPs each) in fp32 and in bf16, on all threads torch uses.
2. Achieved: one epoch of `zhlora train` over the benchmark subset (common.py),
   FLOPs counted from the model's shape, divided by zhlora's training seconds.

FLOPs, counted the way the PaLM paper (Chowdhery et al. 2022, appendix B) does:
full training costs 6N + 12*L*H*Q*T per token (N parameters in matmuls, L layers,
H query heads, Q head dim, T sequence length; 2N forward, 4N backward, the
attention score and value products 4LHQT forward, twice that backward). With LoRA
the base weights are frozen: backward still needs the gradient with respect to
activations (2N) but not the one with respect to the frozen weights (2N saved),
and the adapters are trained in full:

    FLOPs per token = 4 * N_frozen + 6 * N_lora + 12 * L * H * Q * T
    FLOPs of a run  = sum over samples i of  len_i * (4 * N_frozen + 6 * N_lora) + 12 * L * H * Q * len_i**2

N_frozen = every linear weight of the decoder layers (q, k, v, o, gate, up, down) plus
the output head (vocab x hidden; SmolLM2 ties it to the embedding, whose lookup costs
no FLOPs, so it is counted once, as the head). N_lora = r * (in + out) per adapted
module. T is each sample's own length, never a packed row's or a padded batch's:
padding and cross-sample attention are not useful work, so they earn no FLOPs.
Norms, rotary embeddings, activations, softmax and the loss are left out, as in PaLM.

MFU = run FLOPs / training seconds / peak, where the peak is bf16's if bf16 matmuls
are faster here than fp32's, else fp32's (the issue's target: MFU >= 0.6). Beside it,
`mfu_vs_model_shapes_peak` divides by what bf16 matmuls reach at the model's own shapes
(hidden 576 for SmolLM2-135M, an average batch of tokens): the ceiling a perfect
implementation of this model could approach, whatever the square-matrix peak.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import (RESULTS, add_common_args, machine, model_folder, result_name, run_zhlora, switch_variants,
                    token_counts, write_result, write_subset)

LORA_R, LORA_TARGETS = 16, ("q_proj", "v_proj")  # the benchmark's LoRA (zhlora's defaults)


def matmul_peak(dtype: torch.dtype, size: int, iters: int, trials: int, device: str) -> float:
    """Best FLOPs/s over `trials` timings of `iters` (size x size) @ (size x size) products."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: kernel choice, allocation
    sync()
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * iters / best


def shape_peak(model: str, rows: int, iters: int, trials: int, device: str) -> float:
    """bf16 FLOPs/s of the model's own matmuls (the linear layers of one decoder layer and the
    output head, forward, `rows` tokens at a time): what the matmul units reach at these shapes,
    which are far smaller than the --size square of the peak."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    d, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    kv = getattr(c, "num_key_value_heads", heads) * head_dim
    shapes = [(d, heads * head_dim), (d, kv), (d, kv), (heads * head_dim, d), (d, c.intermediate_size),
              (d, c.intermediate_size), (c.intermediate_size, d), (d, c.vocab_size)]
    pairs = [(torch.randn(rows, i, device=device).bfloat16(), torch.randn(i, o, device=device).bfloat16())
             for i, o in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)
    for a, b in pairs:  # warm-up
        a @ b
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(iters):
            for a, b in pairs:
                a @ b
        best = min(best, time.perf_counter() - started)
    return flops * iters / best


def model_flops(model: str, counts: dict) -> dict:
    """The formula of the module docstring, from the model's config and the subset's lengths."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    d, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    kv = getattr(c, "num_key_value_heads", heads) * head_dim
    shapes = {"q_proj": (d, heads * head_dim), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (heads * head_dim, d),
              "gate_proj": (d, c.intermediate_size), "up_proj": (d, c.intermediate_size),
              "down_proj": (c.intermediate_size, d)}
    n_frozen = layers * sum(i * o for i, o in shapes.values()) + c.vocab_size * d
    n_lora = layers * sum(LORA_R * (shapes[m][0] + shapes[m][1]) for m in LORA_TARGETS)
    per_token = 4 * n_frozen + 6 * n_lora
    attention = 12 * layers * heads * head_dim
    total = counts["tokens"] * per_token + attention * counts["sum_sq_len"]
    return {"n_frozen": n_frozen, "n_lora": n_lora, "flops_per_token_weights": per_token,
            "attention_flops_coefficient": attention, "run_flops": total,
            "formula": "sum_i len_i*(4*N_frozen + 6*N_lora) + 12*L*H*Q*len_i^2"}


def throughput_runs(args) -> list[dict]:
    """The variant's runs in train_throughput.py's result, refused unless it trained the same subset."""
    path = RESULTS / f"{result_name('train_throughput', args.device, args.workload)}.json"
    if not path.is_file():
        raise SystemExit(f"[bench] {path} not found: run bench/train_throughput.py first")
    result = json.loads(path.read_text(encoding="utf-8"))
    settings = result["settings"]
    wanted = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length}
    if any(settings.get(k) != v for k, v in wanted.items()) or args.variant not in result["runs"]:
        raise SystemExit(f"[bench] {path} is for {settings} and variants {list(result['runs'])}, not {wanted} "
                         f"and {args.variant}")
    return result["runs"][args.variant]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    # The variants are train_throughput.py's rows; mfu.json is zhlora_fastest's, others mfu_VARIANT.json.
    parser.add_argument("--variant", default="zhlora_fastest", choices=list(switch_variants("cpu")))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--from_throughput", action="store_true",
                        help="take the variant's training seconds from train_throughput.py's result on the same "
                             "workload, steps, batch size and length, instead of training again")
    args = parser.parse_args(argv)

    peaks = {name: matmul_peak(dtype, args.size, args.iters, args.trials, args.device)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    reference = "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"
    print(f"[bench] matmul peak {args.size}x{args.size}: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s -> reference {reference}")

    model = model_folder(args.model)
    data_file = write_subset(args.steps * args.batch_size, args.seed, args.workload)
    counts = token_counts(data_file, model, args.max_length)
    flops = model_flops(model, counts)
    rows = round(counts["tokens"] / args.steps)  # tokens of an average batch
    peaks["bf16_model_shapes"] = shape_peak(model, rows, args.iters, args.trials, args.device)
    print(f"[bench] bf16 matmuls at the model's shapes ({rows} tokens a batch): "
          f"{peaks['bf16_model_shapes'] / 1e9:.1f} GFLOP/s")
    extra = switch_variants(args.device)[args.variant]
    if args.from_throughput:
        timed = [(run["train_seconds"], "from train_throughput") for run in throughput_runs(args)]
    else:
        timed = []
        for repeat in range(args.repeats):
            run = run_zhlora(args, model, data_file, f"mfu-{args.variant}-{args.workload}-{args.device}-{repeat}",
                             extra)
            timed.append((run["train_seconds"], run["mixed_precision"]))
    runs = []
    for repeat, (seconds, precision) in enumerate(timed):
        achieved = flops["run_flops"] / seconds
        runs.append({"train_seconds": seconds, "flops_per_s": achieved, "mfu": achieved / peaks[reference],
                     "mfu_vs_fp32_peak": achieved / peaks["fp32"], "mfu_vs_bf16_peak": achieved / peaks["bf16"],
                     "mfu_vs_model_shapes_peak": achieved / peaks["bf16_model_shapes"], "mixed_precision": precision})
        print(f"[bench] run {repeat}: {achieved / 1e9:.1f} GFLOP/s = {100 * runs[-1]['mfu']:.1f}% of {reference} peak")
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "mixed_precision"}
    name = "mfu" if args.variant == "zhlora_fastest" else f"mfu_{args.variant}"
    write_result(result_name(name, args.device, args.workload), {
        "machine": machine(args.device), "peak_flops_per_s": peaks, "reference_peak": reference,
        "matmul_size": args.size, "model": args.model, "variant": args.variant, "zhlora_overrides": extra,
        "data": {"file": data_file.name, **counts}, "flops": flops, "mfu": median["mfu"], "median": median,
        "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
