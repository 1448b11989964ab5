"""Load a trained run and generate from it: batched (evaluation) or streamed (demo, server).

    model, tokenizer, cfg = load_run("outputs")
    results = generate(model, tokenizer, [encode_prompt(sample, tokenizer)], max_new_tokens=128)

A run folder (what training/train.py writes) holds config.yaml, which names the base
model, and either a LoRA adapter (adapter_config.json) or a full model (config.json).
More adapters beside a run's own, and switching between them: zhlora/serving/adapters.py.
Prompts always come from formatting.encode_prompt, the function training used.

Batched generation refills (zhlora/refill.py): a finished answer leaves the batch and the
next prompt joins, every prompt padded on the left (so it ends where its answer starts),
prompts taken shortest first, with the KV cache. Greedy by default, so results are
deterministic and batching does not change the text (up to rounding: refill.py says when). Greedy means argmax and
nothing else: an explicit GenerationConfig (decoding_settings) switches off what a model's
generation_config.json may ship (repetition_penalty, no_repeat_ngram_size, top_k, ...).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zhlora import safety
from zhlora.config import Config, load_config
from zhlora.errors import ZhloraError
from zhlora.formatting import stop_ids

# torch and the model loaders are imported inside the functions that use them: the demo and
# evaluate import this module at the top, and `zhlora --help` imports those to list its commands.


class RunFolderError(ZhloraError, FileNotFoundError):
    """A --model_path that is not a finished zhlora run folder; the message says what is missing."""


@dataclass
class Generation:
    text: str  # the answer, special tokens removed
    token_ids: list[int]  # generated ids, up to and including EOS when it came
    finished: bool  # ended with EOS / end-of-turn within the budget
    seconds: float  # this sample's share of its batch's wall time


def load_run(model_path: str | Path, device: str | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, adapter_name: str = "default", dtype: str | None = None):
    """(model, tokenizer, cfg) for a run folder; a LoRA run comes back as a PeftModel whose
    adapter is called adapter_name.

    The folder may come from someone else: zhlora/safety.py refuses pickle weights (unless
    allow_pickle) and an adapter that does not fit its base model, and the folder's
    config.yaml cannot turn trust_remote_code on (only the caller's flag can).
    """
    from zhlora.models import load_model, load_tokenizer

    model_path = Path(model_path)
    if not (model_path / "config.yaml").is_file():
        raise RunFolderError(f"{model_path}/config.yaml not found: is {model_path} a zhlora run folder "
                                "(the output.dir of training/train.py)?")
    cfg: Config = load_config(model_path / "config.yaml")
    safety.run_trust_remote_code(cfg, trust_remote_code)
    if device:
        cfg.model.device = device
    if dtype:  # the frozen weights' dtype, when it must differ from training's (export: exact fp32)
        cfg.model.dtype = dtype
    if (model_path / "adapter_config.json").is_file():
        from peft import PeftModel

        from zhlora.adapter import peft_wrapping

        model, _ = load_model(cfg.model)
        safety.check_adapter_folder(model_path, model.config, allow_pickle, base_model=model)
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(model_path), adapter_name=adapter_name)
    elif (model_path / "config.json").is_file():
        safety.check_model_folder(model_path, allow_pickle)
        cfg.model.name = str(model_path)  # a full fine-tune is a whole model
        model, _ = load_model(cfg.model)
    else:
        raise RunFolderError(f"{model_path} holds no adapter_config.json or config.json: "
                                "training did not finish (resume it with training.resume=true)")
    tokenizer = load_tokenizer(str(model_path))
    return model.eval(), tokenizer, cfg


def load_base(cfg: Config):
    """The base model alone (for baselines and `--compare`)."""
    from zhlora.models import load_model, pick_device

    model, tokenizer = load_model(cfg.model, pick_device(cfg.model.device))
    return model.eval(), tokenizer


# Every logits processor that can change the next token, at its "off" value. transformers fills a
# GenerationConfig's unset (None) fields from the model's generation_config.json, so greedy must
# say each one: Qwen2.5-Instruct ships repetition_penalty 1.05-1.1, top_k 20, top_p 0.8.
# (min_new_tokens=0 also resets min_length: transformers lets min_new_tokens take precedence.)
NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
           "encoder_no_repeat_ngram_size": 0, "length_penalty": 1.0, "min_new_tokens": 0, "guidance_scale": 1.0,
           "renormalize_logits": False, "remove_invalid_values": False}
# Sampling only: top_k=0 and min_p=0 switch those filters off, so only temperature and top_p shape sampling.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
# Settings whose only "off" value is None, which transformers would fill from the model: refused instead.
UNSWITCHABLE = ("bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                "begin_suppress_tokens", "exponential_decay_length_penalty", "watermarking_config", "top_h",
                "dola_layers", "penalty_alpha", "stop_strings", "max_time")


def decoding_settings(do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9) -> dict:
    """The settings that choose each next token, as a plain dict (evaluation records it): greedy
    (argmax, nothing else) or sampling with temperature and top_p only."""
    if not do_sample:
        return {"do_sample": False, **NEUTRAL}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, **NEUTRAL, **NEUTRAL_SAMPLING}


def generation_config(model, tokenizer, max_new_tokens: int, do_sample: bool = False, temperature: float = 0.7,
                      top_p: float = 0.9):
    """The whole transformers.GenerationConfig for model.generate: decoding_settings, the stop ids,
    the budget. Refuses a model whose generation_config sets something only its absence switches off."""
    from transformers import GenerationConfig

    shipped = getattr(model, "generation_config", None)
    set_there = [name for name in UNSWITCHABLE if getattr(shipped, name, None) is not None]
    if set_there:
        raise ValueError(f"the model's generation_config sets {', '.join(set_there)}, which would change "
                         f"{'sampling' if do_sample else 'greedy decoding'}; clear it "
                         f"(model.generation_config.{set_there[0]} = None, or edit generation_config.json)")
    return GenerationConfig(**decoding_settings(do_sample, temperature, top_p), max_new_tokens=max_new_tokens,
                            eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, use_cache=True)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
             refill: bool = True, share_prefix: bool = True) -> list[Generation]:
    """Answers for many prompts (token ids), in the order given.

    refill=True (zhlora/refill.py): a finished row leaves the batch and the next prompt takes its
    place, so batch_size rows are answering at every step. refill=False: model.generate on
    fixed batches of batch_size, each running until its longest answer ends (the reference the
    refilling path is tested and benchmarked against: bench/generation.py). share_prefix: refill
    prefills the head the prompts share (the system prompt) once.
    """
    config = generation_config(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    if refill:
        from zhlora.refill import SHARE_PREFIX, generate_refill

        answers = generate_refill(model, prompts, config, tokenizer.pad_token_id, batch_size, seed,
                                  SHARE_PREFIX if share_prefix else 0)
    else:
        answers = _generate_padded(model, tokenizer, prompts, config, batch_size, seed)
    return [Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished, seconds)
            for ids, finished, seconds in answers]


def _generate_padded(model, tokenizer, prompts, config, batch_size: int, seed: int) -> list[tuple]:
    """(token_ids, finished, seconds) per prompt from model.generate on fixed, left-padded batches."""
    import torch

    from zhlora.refill import left_padded

    device = next(model.parameters()).device
    stop = config.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[tuple | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in chunk], tokenizer.pad_token_id)
        width = ids.shape[1]
        began = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        seconds = (time.perf_counter() - began) / len(chunk)
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop), None)
            results[i] = (new if end is None else new[:end + 1], end is not None, seconds)
    return results


def stream(model, tokenizer, prompt: list[int], max_new_tokens: int = 256, do_sample: bool = True,
           temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None):
    """Yield the answer piece by piece as it is generated (the demo and the server)."""
    import torch
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(input_ids=torch.tensor([prompt], device=device), attention_mask=torch.ones(
        (1, len(prompt)), dtype=torch.long, device=device), streamer=streamer,
        generation_config=generation_config(model, tokenizer, max_new_tokens, do_sample, temperature, top_p))
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:  # handed to the caller below, never swallowed
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
