"""Run an export in a real llama.cpp engine and compare its greedy answers with zhlora's own.

    pip install ik-llama-cpp-python                        # optional: a wheel of the ik_llama.cpp fork
    zhlora export --model_path outputs --format gguf --output export
    python scripts/verify_export.py --model_path outputs --export export [--rows 60]

On the first --rows rows of the run's test split (held out from training), greedy, at most
--max_new_tokens new tokens, the same prompt token ids everywhere (formatting.encode_prompt):
  zhlora          zhlora.generation.generate on the run (PyTorch, as evaluate decodes);
  llama_merged    llama.cpp on model.gguf;
  llama_adapter   llama.cpp on base.gguf with adapter.gguf applied at load time (its LoRA API).
Prints and writes EXPORT/verify_report.json: for each pair the share of rows whose answer
text is identical, and each engine's generated tokens per second (one prompt at a time for
llama.cpp, as its Python wheel decodes; zhlora both one at a time and batched), the median of
--repeats passes with their range: time it on an otherwise idle machine.

ik-llama-cpp-python (PyPI, a build of github.com/ikawrakow/ik_llama.cpp) is used because
its manylinux_2_28 wheel loads on Debian 12; it is a checking tool, never a requirement.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def llama_engine(model: Path, adapter: Path | None = None):
    """An ik_llama_cpp model on all cores; with `adapter`, its LoRA applied at scale 1 through the C API."""
    from ik_llama_cpp import IkLlama
    from ik_llama_cpp import _ctypes_api as api

    if adapter is None:
        llm = IkLlama(str(model), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    else:
        # ik_llama.cpp's fused up/gate kernel (fused_up_gate, on by default) multiplies ffn_up and
        # ffn_gate without looking for LoRA weights, so an adapter on those two is silently dropped
        # (src/llama-build-context.cpp: the fused branch skips llm_build_lora_mm). Mainline llama.cpp
        # and Ollama have no such kernel. IkLlama builds its context from the default parameters,
        # so the default is changed while it is built.
        default = api.llama_context_default_params

        def unfused():
            params = default()
            params.fused_up_gate = False
            return params

        api.llama_context_default_params = unfused
        try:
            llm = IkLlama(str(model), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
        finally:
            api.llama_context_default_params = default
        lib = api._lib
        lib.llama_lora_adapter_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.llama_lora_adapter_init.restype = ctypes.c_void_p
        lib.llama_lora_adapter_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
        lib.llama_lora_adapter_set.restype = ctypes.c_int32
        handle = lib.llama_lora_adapter_init(llm._model.model, str(adapter).encode())
        if not handle or lib.llama_lora_adapter_set(llm.ctx, handle, 1.0) != 0:
            raise SystemExit(f"llama.cpp could not apply {adapter}")
        llm._zhlora_adapter = handle  # kept alive with the engine
    return llm


def llama_answers(llm, prompts: list[list[int]], tokenizer, max_new_tokens: int) -> tuple[list[str], int, float]:
    """(texts, generated tokens, seconds): greedy (temperature 0 is llama.cpp's argmax sampler)."""
    texts, tokens, began = [], 0, time.perf_counter()
    for prompt in prompts:
        ids = llm.generate(list(prompt), max_tokens=max_new_tokens, temperature=0.0)
        tokens += len(ids) + (len(ids) < max_new_tokens)  # its stop token, which it does not return, counted as zhlora does
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts, tokens, time.perf_counter() - began


def zhlora_answers(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> tuple[list[str], int, float]:
    from zhlora.generation import generate

    began = time.perf_counter()
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [g.text for g in out], sum(len(g.token_ids) for g in out), time.perf_counter() - began


def repeated(answer, repeats: int) -> tuple[list[str], list[float]]:
    """(texts of the first pass, tokens/s of every pass): greedy, so every pass gives the same texts."""
    texts, speeds = None, []
    for _ in range(repeats):
        got, tokens, seconds = answer()
        if texts is not None and got != texts:
            raise SystemExit("greedy decoding gave different texts on a repeat; the engine is not deterministic")
        texts = got
        speeds.append(tokens / seconds)
    return texts, speeds


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main(argv=None) -> int:
    from zhlora.formatting import encode_prompt
    from zhlora.generation import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="outputs")
    parser.add_argument("--export", default="export")
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="zhlora's frozen weights (the export's are exact fp32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per engine (median and range reported); run on an otherwise idle machine")
    args = parser.parse_args(argv)

    model, tokenizer, cfg = load_run(args.model_path, device="cpu", dtype=args.dtype)
    rows = json.loads(Path(cfg.data.test_file).read_text(encoding="utf-8"))[:args.rows]
    prompts = [encode_prompt(row, tokenizer, cfg.model.template, cfg.data.max_length) for row in rows]
    export = Path(args.export)
    n = args.repeats
    results = {name: repeated(functools.partial(zhlora_answers, model, tokenizer, prompts, args.max_new_tokens, batch), n)
               for name, batch in (("zhlora_one_by_one", 1), ("zhlora_batched", 32))}
    del model  # the llama.cpp engines below get the memory
    engines = {"llama_merged": (export / "model.gguf", None)}
    if (export / "adapter.gguf").is_file():
        engines["llama_adapter"] = (export / "base.gguf", export / "adapter.gguf")
    for name, (weights, adapter) in engines.items():
        llm = llama_engine(weights, adapter)
        results[name] = repeated(lambda: llama_answers(llm, prompts, tokenizer, args.max_new_tokens), n)
        llm.close()
    texts = {name: r[0] for name, r in results.items()}
    report = {"rows": len(rows), "test_file": Path(cfg.data.test_file).name, "max_new_tokens": args.max_new_tokens,
              "zhlora_dtype": args.dtype, "export_report": json.loads((export / "export_report.json").read_text()),
              "repeats": n, "tokens_per_s": {name: statistics.median(r[1]) for name, r in results.items()},
              "tokens_per_s_range": {name: [min(r[1]), max(r[1])] for name, r in results.items()},
              "same_text": {f"{a}/{b}": agreement(texts[a], texts[b]) for a, b in (
                  ("llama_merged", "zhlora_one_by_one"), ("llama_adapter", "zhlora_one_by_one"),
                  ("llama_adapter", "llama_merged"), ("zhlora_batched", "zhlora_one_by_one")) if a in texts},
              "examples": [{"prompt": rows[i]["instruction"] + rows[i].get("input", ""),
                            **{name: texts[name][i] for name in texts}} for i in range(min(5, len(rows)))]}
    (export / "verify_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    for key, value in report["same_text"].items():
        print(f"[verify] same text {key}: {100 * value:.1f}% of {len(rows)} rows")
    for key, value in report["tokens_per_s"].items():
        low, high = report["tokens_per_s_range"][key]
        print(f"[verify] {key}: {value:.1f} generated tokens/s (median of {n}, range {low:.1f}-{high:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
