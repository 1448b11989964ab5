"""Evaluation-style generation: the usual one-sample-at-a-time loop vs zhlora's batched greedy.

    python bench/generation.py                                   # base model, 16 test rows, 3 repeats
    python bench/generation.py --run_dir outputs                 # a trained run (LoRA adapter)
    python bench/generation.py --max_samples 4 --repeats 1       # smoke run

Modes, on the first --max_samples rows of the test split (file order, as
`zhlora evaluate` reads them), each timed over all rows, median of --repeats:
  one_by_one_sampling  the usual tutorial: apply_chat_template, then
                       model.generate(do_sample=True, temperature, top_p) per sample;
  one_by_one_greedy    zhlora.generation.generate with batch_size=1 (greedy): the
                       same decoding as batched, so its ratio isolates batching;
  batched_greedy       zhlora.generation.generate, --batch_size prompts at a time
                       (left padding, sorted by length, KV cache), what evaluate runs.
tokens/s counts generated tokens (the stop token included); s/sample is the wall
time divided by the rows. `same_text` is the fraction of rows whose batched greedy
text equals the one-by-one greedy text (batching must not change the answers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import DEFAULT_MODEL, REPO, machine, model_folder, result_name, write_result


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


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main(argv=None) -> int:
    from zhlora.formatting import encode_prompt
    from zhlora.generation import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--run_dir", default="", help="a zhlora run folder (adapter) instead of the base model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--test_file", default=str(REPO / "data" / "test.json"))
    parser.add_argument("--max_samples", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="batched mode (zhlora evaluate's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = json.loads(Path(args.test_file).read_text(encoding="utf-8"))[:args.max_samples]
    model, tokenizer = load(args)
    prompts = [encode_prompt(row, tokenizer) for row in rows]
    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up: first calls pay allocation

    modes = {
        "one_by_one_sampling": lambda: tutorial_one_by_one(model, tokenizer, rows, args),
        "one_by_one_greedy": lambda: generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=1),
        "batched_greedy": lambda: generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size),
    }
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for mode, fn in modes.items():  # interleaved, so a slow phase of the machine hits every mode
            seconds, out = timed(fn)
            tokens = out if isinstance(out, int) else sum(len(g.token_ids) for g in out)
            if not isinstance(out, int):
                texts[mode] = [g.text for g in out]
            runs[mode].append({"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                               "seconds_per_sample": seconds / len(rows)})
            print(f"[bench] {mode}: {tokens / seconds:.1f} tokens/s, {seconds / len(rows):.2f} s/sample")
    median = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    same = sum(a == b for a, b in zip(texts["batched_greedy"], texts["one_by_one_greedy"])) / len(rows)
    write_result(result_name("generation", args.device), {
        "machine": machine(args.device),
        "settings": {"rows": len(rows), "test_file": Path(args.test_file).name, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "repeats": args.repeats, "model": args.run_dir or args.model,
                     "sampling": {"temperature": args.temperature, "top_p": args.top_p}},
        "median": median,
        "speedup_batched": median["batched_greedy"]["tokens_per_s"] / median["one_by_one_sampling"]["tokens_per_s"],
        "speedup_batched_vs_greedy_single": (median["batched_greedy"]["tokens_per_s"]
                                             / median["one_by_one_greedy"]["tokens_per_s"]),
        "same_text": same, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
