"""CPU attention alone, beside a matmul: why MFU stops below the matmul ceiling (bench/README.md).

    python bench/attention_speed.py                       # SmolLM2-135M's shapes, 256 and 512 tokens
    python bench/attention_speed.py --lengths 128,512 --repeats 7

Forward and backward of causal attention on random q, k, v of SmolLM2-135M's shape (batch 4,
9 heads of 64), in the ways PyTorch offers on a CPU: `flash` is scaled_dot_product_attention
with is_causal (what training runs, bf16 and fp32), `sdpa_mask` the same with a boolean mask
(what a padded batch passes), `math` the textbook softmax(QK^T / sqrt(d)) V with bf16 matmuls
and an fp32 softmax, `math_compiled` that under torch.compile. GFLOP/s counts the causal half
of the two matmuls, forward and backward (3x forward), as bench/mfu.py counts attention.
`matmul` is one bf16 matmul of the model's MLP shape (2,048 x 576 x 1,536) for the ceiling.
Repeats are interleaved; each figure is the median with its range. Writes
results/attention_speed.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine, others_share_if_idle, write_result


def causal_math(q, k, v):
    """Attention as two matmuls and a softmax (the eager path of transformers)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), -1).to(q.dtype) @ v


def paths(length: int) -> dict:
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    compiled = torch.compile(causal_math)
    return {"flash_bf16": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.bfloat16),
            "flash_fp32": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float32),
            "sdpa_mask_bf16": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               torch.bfloat16),
            "math_bf16": (causal_math, torch.bfloat16), "math_compiled_bf16": (compiled, torch.bfloat16)}


def one_step(fn, dtype, shape, gen) -> float:
    """Seconds for one forward and backward of attention on fresh random q, k, v."""
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(*shape, generator=gen).to(dtype)
    start = time.perf_counter()
    fn(q, k, v).backward(grad)
    return time.perf_counter() - start


def matmul_seconds(gen) -> float:
    a, b = (torch.randn(*s, generator=gen).to(torch.bfloat16) for s in ((2048, 576), (576, 1536)))
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def main(argv=None) -> int:
    from zhlora.cpu_share import CpuShare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"matmul": []}
    flops = {"matmul": 2 * 2048 * 576 * 1536}
    share = CpuShare()
    for length in map(int, args.lengths.split(",")):
        shape = (args.batch, args.heads, length, args.head_dim)
        ways = paths(length)
        for fn, dtype in ways.values():  # warm-up: compiling, allocation
            one_step(fn, dtype, shape, gen)
        for name in ways:
            times[f"{name}_{length}"] = []
            flops[f"{name}_{length}"] = 3 * 2 * 2 * args.batch * args.heads * length * length * args.head_dim / 2
        for _ in range(args.repeats):
            times["matmul"].append(matmul_seconds(gen))
            for name, (fn, dtype) in ways.items():
                times[f"{name}_{length}"].append(one_step(fn, dtype, shape, gen))
    others = others_share_if_idle(share)
    if others is None:
        return 1
    rows = {name: {"ms": statistics.median(t) * 1e3, "gflops": flops[name] / statistics.median(t) / 1e9,
                   "gflops_range": [flops[name] / max(t) / 1e9, flops[name] / min(t) / 1e9]}
            for name, t in times.items()}
    for name, row in rows.items():
        lo, hi = row["gflops_range"]
        print(f"[bench] {name:>24}: {row['ms']:7.1f} ms, {row['gflops']:6.1f} GFLOP/s ({lo:.1f}-{hi:.1f})")
    print(f"[bench] others' CPU share {others:.4f}")
    write_result("attention_speed", {"machine": machine("cpu"), "settings": vars(args), "cpu_others_share": others,
                                     "median": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
