"""Generation: one prompt at a time vs fixed batches vs refilled batches, greedy, same rows.

    python bench/generation.py --run_dir outputs                 # the quick start's adapter, 64 test rows, 3 repeats
    python bench/generation.py --dtype bfloat16                  # the base model instead: generation_base_bfloat16.json
    python bench/generation.py --max_samples 8 --repeats 1       # smoke run
    python bench/generation.py --run_dir outputs --profile       # + where refill's time goes (profile)
    python bench/generation.py --run_dir outputs --dtype float32 # fp32 weights: generation_float32.json

Modes, on the first --max_samples rows of the test split (file order, as
`zhlora evaluate` reads them), each timed over all rows, median of --repeats:
  one_by_one_greedy    model.generate on one prompt at a time (zhlora.generation.generate,
                       batch_size=1, refill=False): the reference;
  batched_padded       model.generate on fixed batches of --batch_size (left padding, sorted
                       by length, KV cache): a batch runs until its longest answer ends;
  batched_refill       zhlora/refill.py, --batch_size rows: a finished row leaves and the next
                       prompt joins (what evaluate, the demo's batch mode and the server's
                       non-streamed requests run); the head all prompts share (the system
                       prompt) is prefilled once for each group of joining rows;
  batched_refill_unshared   the same, each row prefilling its whole prompt (share_prefix=False);
  one_by_one_sampling  (--modes) the usual tutorial: apply_chat_template, then
                       model.generate(do_sample=True, temperature, top_p) per sample.
tokens/s counts generated tokens (the stop token included); s/sample is the wall time
divided by the rows. `same_text` is, for each batched mode, the fraction of rows whose text
equals the one-by-one greedy text (batching must not change the answers). The weights are
in the run's dtype, as `zhlora evaluate` loads them (bf16 after the quick start): a batch sums
in another order than one row alone, and where an answer's two best tokens are within one bf16
step (0.125 at a logit of 28) that can pick the other one; --dtype float32 is the reference
where only a ~1e-5 tie could (generation_float32.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import DEFAULT_MODEL, REPO, machine, model_folder, others_share_if_idle, result_name, write_result


def load(args):
    """(model, tokenizer) on the device: a trained run folder, or the base model."""
    from zhlora.config import load_config
    from zhlora.generation import load_base, load_run

    if args.run_dir:
        model, tokenizer, _ = load_run(args.run_dir, device=args.device)
        return model, tokenizer
    return load_base(load_config(None, [f"model.name={model_folder(args.model)}", f"model.device={args.device}"]))


@torch.no_grad()
def tutorial_one_by_one(model, tokenizer, rows, args) -> int:
    """The usual loop: chat template, generate with sampling, one sample at a time. Returns new tokens."""
    device = next(model.parameters()).device
    new_tokens = 0
    torch.manual_seed(args.seed)
    for row in rows:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=True, temperature=args.temperature, top_p=args.top_p,
                             pad_token_id=tokenizer.pad_token_id)
        new_tokens += out.shape[1] - ids.shape[1]
    return new_tokens


@torch.no_grad()
def profile(model, tokenizer, prompts, args, one_by_one_seconds: float | None) -> dict:
    """Where the refilled batches' time goes, and the most batching could give on these rows.

    One more pass of batched_refill (not in the medians) with each Refill phase timed: prefill of
    joining prompts, decoding steps, dropping finished rows. Then every prompt prefilled alone, as
    the one-by-one reference does. Prefill costs the same FLOPs in both modes, and one prompt
    (~60 tokens) is already a matmul large enough to run near the peak, so whatever batching does
    to decoding, one-by-one seconds / refill's prefill seconds bounds the speed-up (Amdahl)."""
    from zhlora.generation import generate
    from zhlora import refill

    spent = {"_join": 0.0, "_step": 0.0, "_drop_done": 0.0}
    calls = dict.fromkeys(spent, 0)
    originals = {name: getattr(refill.Refill, name) for name in spent}

    def timing(name):
        def wrapped(self, *a):
            began = time.perf_counter()
            out = originals[name](self, *a)
            spent[name] += time.perf_counter() - began
            calls[name] += 1
            return out
        return wrapped

    for name in spent:
        setattr(refill.Refill, name, timing(name))
    try:
        total, out = timed(lambda: generate(model, tokenizer, prompts, args.max_new_tokens,
                                            batch_size=args.batch_size, refill=True))
    finally:
        for name, fn in originals.items():
            setattr(refill.Refill, name, fn)
    device = next(model.parameters()).device
    alone = 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        began = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        alone += time.perf_counter() - began
    phases = {"refill_seconds": total, "new_tokens": sum(len(g.token_ids) for g in out),
              "refill_prefill_seconds": spent["_join"], "refill_decode_seconds": spent["_step"],
              "refill_drop_seconds": spent["_drop_done"], "prefill_calls": calls["_join"],
              "decode_steps": calls["_step"], "prompt_tokens": sum(map(len, prompts)),
              "one_by_one_prefill_seconds": alone}
    if one_by_one_seconds:  # the median one-by-one greedy time of the timed repeats
        phases["bound_if_decoding_were_free"] = one_by_one_seconds / spent["_join"]
        phases["one_by_one_prefill_share"] = alone / one_by_one_seconds
    print(f"[bench] profile: {json.dumps(phases)}")
    return phases


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--run_dir", default="", help="a zhlora run folder (adapter) instead of the base model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--test_file", default=str(REPO / "data" / "test.json"))
    parser.add_argument("--max_samples", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32, help="batched modes (zhlora evaluate's default)")
    parser.add_argument("--dtype", default="run", choices=["run", "float32", "bfloat16"],
                        help="weights while generating: run = as the run's model.dtype, what `zhlora evaluate` "
                             "uses (the quick start: bfloat16); another dtype writes generation_DTYPE.json")
    parser.add_argument("--modes", default="one_by_one_greedy,batched_padded,batched_refill_unshared,batched_refill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also time refill's phases and prefill alone (profile)")
    return parser.parse_args(argv)


def timed_modes(modes: dict, repeats: int, rows: int) -> tuple[dict, dict]:
    """({mode: [run figures]}, {mode: texts of its last run}), the modes interleaved in each repeat
    so that a slow phase of the machine hits every mode."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for mode, fn in modes.items():
            seconds, out = timed(fn)
            tokens = out if isinstance(out, int) else sum(len(g.token_ids) for g in out)
            if not isinstance(out, int):
                texts[mode] = [g.text for g in out]
            runs[mode].append({"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                               "seconds_per_sample": seconds / rows})
            print(f"[bench] {mode}: {tokens / seconds:.1f} tokens/s, {seconds / rows:.2f} s/sample")
    return runs, texts


def compared(runs: dict, texts: dict, rows: int) -> tuple[dict, dict, dict]:
    """(medians with their tokens/s range, same text share, ratio to one by one) of every mode."""
    median = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    for m in median:
        per_s = [r["tokens_per_s"] for r in runs[m]]
        median[m]["tokens_per_s_range"] = [min(per_s), max(per_s)]
    reference = texts.get("one_by_one_greedy")
    same = {m: sum(a == b for a, b in zip(t, reference)) / rows
            for m, t in texts.items() if reference and m != "one_by_one_greedy"}
    ratios = {m: median[m]["tokens_per_s"] / median["one_by_one_greedy"]["tokens_per_s"]
              for m in median if "one_by_one_greedy" in median and m != "one_by_one_greedy"}
    return median, same, ratios


def main(argv=None) -> int:
    from zhlora.cpu_share import CpuShare
    from zhlora.formatting import encode_prompt
    from zhlora.generation import generate

    args = parse_args(argv)
    rows = json.loads(Path(args.test_file).read_text(encoding="utf-8"))[:args.max_samples]
    model, tokenizer = load(args)
    if args.dtype != "run":
        model = model.to(getattr(torch, args.dtype))
    prompts = [encode_prompt(row, tokenizer) for row in rows]
    for refill in (False, True):  # warm-up: first calls pay allocation
        generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2, refill=refill)

    def batched(**how):
        return lambda: generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size, **how)

    every = {"one_by_one_sampling": lambda: tutorial_one_by_one(model, tokenizer, rows, args),
             "one_by_one_greedy": lambda: generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=1,
                                                   refill=False),
             "batched_padded": batched(refill=False), "batched_refill": batched(refill=True),
             "batched_refill_unshared": batched(refill=True, share_prefix=False)}
    share = CpuShare()
    runs, texts = timed_modes({m: every[m] for m in args.modes.split(",")}, args.repeats, len(rows))
    median, same, ratios = compared(runs, texts, len(rows))
    one = median.get("one_by_one_greedy", {}).get("seconds")
    phases = profile(model, tokenizer, prompts, args, one) if args.profile else None
    others = others_share_if_idle(share)  # over the timed repeats and the profile
    if others is None:
        return 1
    # fp32: the exactness reference; the base model's answers (no adapter) run long, where batching pays most,
    # and its file always names the dtype it ran in (generation_base_float32.json)
    dtype = str(next(model.parameters()).dtype)
    name = (f"generation_base_{dtype.removeprefix('torch.')}" if not args.run_dir
            else "generation" + ("" if args.dtype == "run" else f"_{args.dtype}"))
    write_result(result_name(name, args.device), {
        "machine": machine(args.device),
        "settings": {"rows": len(rows), "test_file": Path(args.test_file).name, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "repeats": args.repeats,
                     "dtype": dtype, "model": args.run_dir or args.model,
                     "sampling": {"temperature": args.temperature, "top_p": args.top_p}},
        "cpu_others_share": others, "median": median, "ratio_to_one_by_one_greedy": ratios,
        "speedup_batched": ratios.get("batched_refill"), "same_text": same, "profile": phases, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
