"""`zhlora doctor`: show what the model will really be trained on, and check it.

Prints one rendered sample with its prompt (masked, label -100) and answer
(trained) tokens told apart, then checks the things that silently ruin a run:
  - the model has a chat template (else the alpaca template is used: say so);
  - a stop token (EOS or the template's end-of-turn, formatting.stop_ids) is trained
    (else the model never learns to stop);
  - how many samples data.max_length truncates;
  - the share of supervised tokens (a tiny share means long prompts, short answers).
"""
from __future__ import annotations

import json
from pathlib import Path

from zhlora.config import Config
from zhlora.formatting import IGNORE_INDEX, encode_sample, resolve_template, stop_ids
from zhlora.models import load_tokenizer
from zhlora.prepare import token_stats
from zhlora.tasks import generate_samples


def render_mask(enc: dict, tokenizer, color: bool) -> str:
    """The sample's text with masked spans in [brackets] (or dim) and trained spans plain (or green)."""
    pieces, current, trained = [], [], None
    for token, label in zip(enc["input_ids"], enc["labels"]):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            pieces.append((trained, current))
            current = []
        current.append(token)
        trained = is_trained
    pieces.append((trained, current))
    out = []
    for is_trained, tokens in pieces:
        text = tokenizer.decode(tokens)
        if color:
            out.append(f"\033[32m{text}\033[0m" if is_trained else f"\033[2m{text}\033[0m")
        else:
            out.append(f"{{{{TRAIN:{text}}}}}" if is_trained else text)
    return "".join(out)


def load_rows(cfg: Config, limit: int = 2000) -> tuple[list[dict], str]:
    path = Path(cfg.data.train_file)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))[:limit], str(path)
    return generate_samples(200, seed=cfg.training.seed), "generated samples (no data.train_file yet)"


def run_doctor(cfg: Config, color: bool = False) -> int:
    """Print the rendered sample and the checks; returns 1 if a check fails."""
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    rows, source = load_rows(cfg)
    template = resolve_template(tokenizer, cfg.model.template)
    enc = encode_sample(rows[0], tokenizer, cfg.model.template, cfg.data.max_length, cfg.data.train_on_prompt)
    print(f"model: {cfg.model.name}   template: {template}   data: {source}")
    print("rendered sample (prompt tokens are masked with -100; " +
          ("green = trained" if color else "{{TRAIN:...}} = trained") + "):\n")
    print(render_mask(enc, tokenizer, color))
    trained = [(t, lab) for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    print(f"\ntokens: {len(enc['input_ids'])} total, {len(trained)} trained")
    print("trained token ids:", [t for t, _ in trained])

    stats = token_stats(rows, tokenizer, cfg)
    share = stats["supervised_tokens"] / max(1, stats["total_tokens"])
    stops = stop_ids(tokenizer)  # Qwen2.5 base: EOS <|endoftext|>, end of turn <|im_end|>
    stop_trained = any(lab in stops for _, lab in trained)
    stop_names = ", ".join(repr(token) for token in tokenizer.convert_ids_to_tokens(stops))
    truncated = (stats["truncated"] + stats["dropped_prompt_too_long"]) / max(1, len(rows))
    checks = [
        ("chat template present", template == "chat",
         "model has no chat template; the documented alpaca template (templates/alpaca.json) is used"),
        (f"stop token trained (one of {stop_names})", stop_trained,
         "no stop token gets a label: the model will never learn to stop"),
        (f"truncation at data.max_length={cfg.data.max_length}: {truncated:.1%} of {len(rows)} samples",
         truncated <= 0.05, "more than 5% of samples are cut; raise data.max_length"),
        (f"supervised share of tokens: {share:.0%}", share >= 0.05,
         "under 5% of tokens are trained; answers are tiny next to prompts"),
    ]
    print()
    for name, ok, advice in checks:
        print(f"[{'PASS' if ok else 'WARN'}] {name}" + ("" if ok else f": {advice}"))
    return 0 if stop_trained else 1  # an untrained stop token is the one that always ruins a run
