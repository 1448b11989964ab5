"""Teacher forcing: score every test row with one forward pass, no generation.

Greedy decoding reproduces a reference exactly when, given the reference's own prefix, every
reference token and the stop token after it are the model's argmax: then step by step greedy
picks exactly those tokens and stops. So one forward pass over prompt + reference answers
"would greedy generation write this answer's exact tokens and stop within max_new_tokens?" for
every row, at the cost of one training forward; generation needs one pass per new token. This
is stricter than tasks.check_answer on a generated text, which forgives a trailing "。", case in
pinyin and the wrapping around sort/extreme numbers: evaluate.py's forced_vs_generated counts
the rows where the two disagree, each way. The same pass gives the test loss, mean cross-entropy
per answer token (stop token included), and each row's, so a part of the test rows (a task, a
source) has its own loss too.

Two choices make the pass cheaper without changing what it measures (the quick start's 300
test rows, SmolLM2-135M with bf16 frozen weights and LoRA on every linear layer, 2-core CPU:
22-30 s before, 15-21 s after, one pass each, sweeps paused):
- rows go through in length order, so a batch pads its rows to similar lengths; in fp32 a row's
  scores do not depend on what it is batched with (tests/test_evaluate.py checks it); under bf16
  the rounding may differ with the batch's shape, as it does between any two bf16 runs;
- the pass runs in the precision training ran in (train_summary.json's mixed_precision: bf16
  autocast for the quick start), as training computed its validation loss. Without it the
  fp32 LoRA weights make every adapted layer cast its bf16 input to fp32 and back.
"""
from __future__ import annotations

from contextlib import nullcontext

from zhlora.config import Config
from zhlora.formatting import IGNORE_INDEX, encode_sample, stop_ids

# torch is imported inside the functions: evaluate.py imports this module, and `zhlora --help` should
# not wait seconds for torch.

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}  # train_summary.json's mixed_precision -> torch dtype


def teacher_forced(model, tokenizer, rows: list[dict], cfg: Config, batch_size: int, max_new_tokens: int,
                   precision: str | None = None):
    """(per-row greedy match, test loss, per-row (loss sum, answer tokens)). The match is None for
    a row whose answer or stop token does not survive data.max_length."""
    # answer tokens only, even after data.train_on_prompt: greedy decoding is asked for the answer
    samples = [encode_sample(r, tokenizer, cfg.model.template, cfg.data.max_length) for r in rows]
    stop = set(stop_ids(tokenizer))
    matches: list[bool | None] = [None] * len(rows)
    per_row, loss_sum, tokens = forced_argmax(model, tokenizer, samples, batch_size, precision)
    row_losses = [(per_row[i][2], len(per_row[i][0])) if i in per_row else None for i in range(len(rows))]
    for i, (targets, hits, _) in per_row.items():
        # up to and including the first stop token: generation ends there (a "\n" after it is never generated)
        end = next((k + 1 for k, t in enumerate(targets) if t in stop), None)
        if end is not None:  # None: max_length cut the stop token off, so stopping was never checked
            matches[i] = all(hits[:end]) and end <= max_new_tokens
    return matches, (loss_sum / tokens if tokens else None), row_losses


def autocast(model, precision: str | None):
    """torch.autocast for training's mixed_precision; none for "no"/None, no fp16 off CUDA (fp16 runs
    ~100x slower on a CPU, where training would have refused it), and no bf16 on a GPU without it
    (a run trained on one GPU may be evaluated on another)."""
    import torch

    device = next(model.parameters()).device.type
    if precision not in AUTOCAST or (precision == "fp16" and device != "cuda") or (
            precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported()):
        return nullcontext()
    return torch.autocast(device, dtype=getattr(torch, AUTOCAST[precision]))


def forced_argmax(model, tokenizer, samples: list[dict | None], batch_size: int, precision: str | None = None):
    """({row: (supervised target ids, is each the argmax given the reference prefix, its loss sum)},
    loss sum, token count) for the encode_sample results that are not None."""
    import torch
    import torch.nn.functional as F

    from zhlora.loss import answer_logits
    from zhlora.training.batching import collate_padded

    kept = sorted((i for i, s in enumerate(samples) if s is not None), key=lambda i: len(samples[i]["input_ids"]))
    device = next(model.parameters()).device
    per_row, loss_sum, tokens = {}, 0.0, 0
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_padded([samples[i] for i in chunk], tokenizer.pad_token_id).items()}
        with torch.no_grad(), autocast(model, precision):
            logits, targets = answer_logits(model, batch)  # supervised positions only, row by row
        losses = F.cross_entropy(logits.float(), targets, reduction="none")  # fp32 softmax, as training's
        loss_sum += losses.sum().item()
        tokens += targets.numel()
        hits, targets, losses = (logits.argmax(-1) == targets).tolist(), targets.tolist(), losses.tolist()
        offset = 0
        for i, n in zip(chunk, (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()):
            per_row[i] = (targets[offset:offset + n], hits[offset:offset + n], sum(losses[offset:offset + n]))
            offset += n
    return per_row, loss_sum, tokens
