"""The loss alone: zhlora's fused cross-entropy at several chunk sizes against the plain path.

    python bench/loss_speed.py                   # 1,500 answer tokens, SmolLM2's head (49,152 x 576), bf16
    python bench/loss_speed.py --tokens 300 --chunks 128,256

Forward and backward of sum CE(hidden @ weight.T, targets) under bf16 autocast, on random
bf16 hidden states: `plain` makes the whole (tokens x vocab) logits and calls F.cross_entropy
(what training.fused_cross_entropy=false does), `chunk_N` is zhlora.loss.linear_cross_entropy
with N rows a chunk (LOSS_CHUNK is the default). Repeats are interleaved (plain, chunk_64, ...,
plain, ...); each figure is the median with its range. Writes results/loss_speed.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine, others_share_if_idle, write_result


def one_step(fn, hidden, weight, targets) -> float:
    """Seconds for one forward and backward of fn(hidden, weight, targets)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    hidden.grad = None
    return time.perf_counter() - start


def main(argv=None) -> int:
    from zhlora.cpu_share import CpuShare
    from zhlora.loss import LOSS_CHUNK, linear_cross_entropy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1500, help="answer tokens in one step (alpaca_zh_demo: ~1,400)")
    parser.add_argument("--chunks", default="64,128,256,512,1024")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.05).to(torch.bfloat16)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    paths = {"plain": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")}
    for chunk in map(int, args.chunks.split(",")):
        paths[f"chunk_{chunk}"] = lambda h, w, t, c=chunk: linear_cross_entropy(h, w, t, c)
    for fn in paths.values():  # warm-up: first calls pay for allocation and thread start-up
        one_step(fn, hidden, weight, targets)
    times = {name: [] for name in paths}
    share = CpuShare()
    for _ in range(args.repeats):
        for name, fn in paths.items():
            times[name].append(one_step(fn, hidden, weight, targets))
    others = others_share_if_idle(share)
    if others is None:
        return 1
    rows = {name: {"ms": statistics.median(t) * 1e3, "range_ms": [min(t) * 1e3, max(t) * 1e3]}
            for name, t in times.items()}
    for name, row in rows.items():
        lo, hi = row["range_ms"]
        print(f"[bench] {name:>10}: {row['ms']:7.1f} ms ({lo:.1f}-{hi:.1f})")
    print(f"[bench] others' CPU share {others:.4f}; LOSS_CHUNK = {LOSS_CHUNK}")
    write_result("loss_speed", {"machine": machine("cpu"), "settings": {**vars(args), "loss_chunk": LOSS_CHUNK},
                                "cpu_others_share": others, "median": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
