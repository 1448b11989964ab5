"""Turn a sample into token ids and labels: the one function training, evaluation,
the demo and the server all share, so train and inference prompts cannot drift.

A sample is an alpaca row: `instruction`, `input`, `output`, optional `system` and
`history` ([[user, assistant], ...]). It becomes chat messages, then tokens:

    <|im_start|>user\n把1234写成中文数字<|im_end|>\n<|im_start|>assistant\n | 一千二百三十四<|im_end|>\n
    ------------------- prompt: labels -100 ----------------------------- | -- answer: trained ---------

Which tokens get -100 (ignored by the loss): every prompt token (system, user turns,
the assistant header), unless `train_on_prompt`. Trained: each assistant answer and
the end-of-turn token after it, so the model learns to stop. We build labels here
rather than in a collator because SmolLM2's pad token *is* its EOS (<|im_end|>): a
collator that masks pad labels would also mask every EOS, and the model would
never learn to stop.

Each turn is tokenised as its own segment (prompt text, then answer text), so the
ids of a prompt at inference are exactly the ids it had in training.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from zhlora.errors import ZhloraError

IGNORE_INDEX = -100  # the label value torch's cross_entropy skips
TEMPLATE_DIR = Path(__file__).parent / "templates"
# End-of-turn tokens of common chat templates: ChatML (Qwen, SmolLM2), Llama 3, Gemma. They can
# differ from EOS: Qwen2.5 base has EOS <|endoftext|> but ends each ChatML turn with <|im_end|>.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


class TemplateError(ZhloraError, ValueError):
    """A chat template zhlora cannot use safely; the message says why."""


@lru_cache
def load_template(name: str) -> dict:
    """A prompt format stored as data (templates/NAME.json), alpaca-lora style."""
    return json.loads((TEMPLATE_DIR / f"{name}.json").read_text(encoding="utf-8"))


def resolve_template(tokenizer, template: str = "auto") -> str:
    """auto -> "chat" (the tokenizer's own chat template) if it has one, else "alpaca"."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    return template


def user_text(instruction: str, input_text: str = "") -> str:
    """How an alpaca instruction and its optional input become one user message."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def to_messages(sample: dict) -> list[dict]:
    """Alpaca row -> chat messages, ending with the assistant answer when there is one."""
    messages = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
    for user, assistant in sample.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": user_text(sample["instruction"], sample.get("input", ""))})
    if sample.get("output") is not None:
        messages.append({"role": "assistant", "content": sample["output"]})
    return messages


def _segments(messages: list[dict], tokenizer, template: str):
    """Yield (text, is_answer) pieces whose concatenation is the rendered conversation."""
    if template == "alpaca":
        fmt = load_template("alpaca")
        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else fmt["system"]
        pending = system
        for message in messages:
            if message["role"] == "user":
                pending += fmt["user"].format(content=message["content"])
            elif message["role"] == "assistant":
                yield pending + fmt["assistant_header"], False
                yield message["content"], True  # EOS is appended by _encode
                pending = fmt["turn_separator"]
        if pending.strip():
            yield pending + fmt["assistant_header"], False
        return
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise TemplateError("the chat template rewrites earlier turns (not prefix-stable); "
                                "use model.template=alpaca")
        yield prompt[len(rendered):], False
        yield full[len(prompt):], True
        rendered = full
    if messages[-1]["role"] != "assistant":
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        yield prompt[len(rendered):], False


def stop_ids(tokenizer) -> list[int]:
    """The ids that end an answer: EOS and each end-of-turn token the vocabulary has (sorted).

    Training appends EOS only to an answer that has none of them, generation stops at any of
    them, and `zhlora doctor` checks that one is trained.
    """
    ids = {tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to an answer."""
    ids: list[int] = []
    is_answer: list[bool] = []
    stops = set(stop_ids(tokenizer))
    for text, answer in _segments(messages, tokenizer, resolve_template(tokenizer, template)):
        segment = _ids(tokenizer, text)
        if answer and stops.isdisjoint(segment):
            segment.append(tokenizer.eos_token_id)  # always train a stop token, and only one
        ids += segment
        is_answer += [answer] * len(segment)
    return ids, is_answer


def _final_answer_start(is_answer: list[bool]) -> int:
    """Index of the final answer's first token (a training sample ends with it); the length if none."""
    start = len(is_answer)
    while start and is_answer[start - 1]:
        start -= 1
    return start


def encode_sample(sample: dict, tokenizer, template: str = "auto", max_length: int = 512,
                  train_on_prompt: bool = False) -> dict | None:
    """Sample -> {"input_ids", "labels"} (lists of ints, same length).

    Labels are -100 on prompt tokens (unless train_on_prompt) and equal to the
    input ids on answer tokens, end-of-turn included. If a template's answer lacks
    every stop token (stop_ids), EOS is appended. Longer than max_length: cut from the
    right; if no token of the final answer survives the cut, returns None (the caller
    counts it): a multi-turn sample is not kept for an earlier answer alone.
    """
    ids, is_answer = _encode(to_messages(sample), tokenizer, template)
    if _final_answer_start(is_answer) >= min(max_length, len(ids)):
        return None
    labels = [i if (answer or train_on_prompt) else IGNORE_INDEX for i, answer in zip(ids, is_answer)]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _prompt_messages(sample_or_messages) -> list[dict]:
    if isinstance(sample_or_messages, dict):
        messages = to_messages({**sample_or_messages, "output": None})
    else:
        messages = list(sample_or_messages)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation to answer must end with a user message")
    return messages


def _assistant_header(messages: list[dict], tokenizer, template: str) -> list[int]:
    """Ids of the text that opens the assistant's turn (what every prompt ends with)."""
    if resolve_template(tokenizer, template) == "alpaca":
        return _ids(tokenizer, load_template("alpaca")["assistant_header"])
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    return _ids(tokenizer, opened[len(closed):]) if opened.startswith(closed) else []


def encode_prompt(sample_or_messages, tokenizer, template: str = "auto", max_length: int | None = None) -> list[int]:
    """Prompt ids for generation: the same segments as training, minus the answer.

    Takes an alpaca sample (its `output` is ignored) or chat messages ending with a
    user turn (the demo's and the server's multi-turn history). With max_length (the
    run's data.max_length), a prompt training could not have kept is cut as training
    cuts, from the right, to max_length - 1 tokens (training keeps a sample only when an
    answer token fits), and the assistant header is put back at its end so the answer
    starts where every trained answer started. prompt_is_truncated tells which were cut.
    """
    messages = _prompt_messages(sample_or_messages)
    ids = _encode(messages, tokenizer, template)[0]
    if max_length is None or len(ids) < max_length:
        return ids
    header = _assistant_header(messages, tokenizer, template)  # [] if the template cannot say: a plain cut
    return ids[:max(0, max_length - 1 - len(header))] + header


def prompt_is_truncated(sample_or_messages, tokenizer, template: str = "auto", max_length: int = 512) -> bool:
    """Whether encode_prompt(..., max_length) cuts this prompt (it has max_length tokens or more)."""
    return len(_encode(_prompt_messages(sample_or_messages), tokenizer, template)[0]) >= max_length
