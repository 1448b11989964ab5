"""The one formatting function: masking, EOS, truncation, multi-turn, prompt identity."""
from zhlora.formatting import IGNORE_INDEX, encode_prompt, encode_sample, to_messages

SAMPLE = {"instruction": "把数字写成中文", "input": "1234", "output": "一千二百三十四", "task": "num2cn"}


def _answer_text(tokenizer, enc):
    return tokenizer.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def test_prompt_masked_answer_and_eos_trained(tiny_tokenizer):
    enc = encode_sample(SAMPLE, tiny_tokenizer)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert _answer_text(tiny_tokenizer, enc) == "一千二百三十四<|im_end|>\n"
    assert tiny_tokenizer.eos_token_id in [lab for lab in enc["labels"] if lab != IGNORE_INDEX]
    prompt = tiny_tokenizer.decode(enc["input_ids"][: enc["labels"].index(next(l for l in enc["labels"] if l != -100))])
    assert prompt.endswith("<|im_start|>assistant\n") and "1234" in prompt


def test_pad_equal_to_eos_still_trains_eos(tiny_tokenizer):
    # The trap: SmolLM2's pad token is its EOS; our labels never depend on pad.
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    enc = encode_sample(SAMPLE, tiny_tokenizer)
    assert enc["labels"].count(tiny_tokenizer.eos_token_id) == 1


def test_train_on_prompt_trains_everything(tiny_tokenizer):
    enc = encode_sample(SAMPLE, tiny_tokenizer, train_on_prompt=True)
    assert IGNORE_INDEX not in enc["labels"] and enc["labels"] == enc["input_ids"]


def test_prompt_ids_equal_training_prefix(tiny_tokenizer):
    enc = encode_sample(SAMPLE, tiny_tokenizer)
    prompt = encode_prompt(SAMPLE, tiny_tokenizer)
    first_trained = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)
    assert prompt == enc["input_ids"][:first_trained]


def test_multi_turn_trains_every_answer(tiny_tokenizer):
    sample = {**SAMPLE, "system": "你是助手", "history": [["你好", "你好！"], ["1加1", "2"]]}
    enc = encode_sample(sample, tiny_tokenizer)
    assert _answer_text(tiny_tokenizer, enc) == "你好！<|im_end|>\n2<|im_end|>\n一千二百三十四<|im_end|>\n"
    messages = to_messages({**sample, "output": None})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    first_of_last = len(enc["input_ids"]) - len(tiny_tokenizer("一千二百三十四<|im_end|>\n",
                                                               add_special_tokens=False)["input_ids"])
    assert encode_prompt(messages, tiny_tokenizer) == enc["input_ids"][:first_of_last]


def test_truncation_keeps_length_and_drops_answerless(tiny_tokenizer):
    long = {**SAMPLE, "output": "很长" * 200}
    enc = encode_sample(long, tiny_tokenizer, max_length=100)
    assert len(enc["input_ids"]) == 100
    long_prompt = {**SAMPLE, "input": "长" * 300}
    assert encode_sample(long_prompt, tiny_tokenizer, max_length=100) is None


def test_alpaca_template_for_models_without_chat_template(tiny_tokenizer):
    enc = encode_sample(SAMPLE, tiny_tokenizer, template="alpaca")
    text = tiny_tokenizer.decode(enc["input_ids"])
    assert "### 指令:\n把数字写成中文\n\n1234" in text and "### 回答:\n一千二百三十四" in text
    assert _answer_text(tiny_tokenizer, enc) == "一千二百三十四<|im_end|>"
    prompt = encode_prompt(SAMPLE, tiny_tokenizer, template="alpaca")
    assert prompt == enc["input_ids"][: len(prompt)]


def _qwen_base_like_dir(tmp_path):
    """A tokenizer like Qwen2.5 base: EOS is <|endoftext|>, but ChatML turns end with <|im_end|>."""
    from conftest import build_tokenizer

    tokenizer = build_tokenizer("".join(SAMPLE.values()) + "你是助手好加")
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_end_of_turn_other_than_eos_is_the_only_stop_trained(tmp_path):
    from zhlora.models import load_tokenizer

    tokenizer = load_tokenizer(str(_qwen_base_like_dir(tmp_path)))
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == endoftext != im_end
    enc = encode_sample(SAMPLE, tokenizer)
    assert _answer_text(tokenizer, enc) == "一千二百三十四<|im_end|>\n"  # no extra <|endoftext|> trained
    assert endoftext not in enc["input_ids"]
    from zhlora.formatting import stop_ids  # the set formatting, doctor and generation share

    assert set(stop_ids(tokenizer)) == {im_end, endoftext}
    # The alpaca template has no end-of-turn token of its own: EOS is appended and trained.
    alpaca = encode_sample(SAMPLE, tokenizer, template="alpaca")
    assert alpaca["labels"][-1] == endoftext and alpaca["labels"].count(endoftext) == 1


def test_doctor_accepts_an_end_of_turn_that_is_not_eos(tmp_path, capsys):
    from zhlora.config import load_config
    from zhlora.doctor import run_doctor
    from zhlora.models import load_tokenizer

    model_dir = _qwen_base_like_dir(tmp_path / "tok")
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train_file={tmp_path / 'none.json'}"])
    assert run_doctor(cfg) == 0
    out = capsys.readouterr().out
    assert "[PASS] stop token" in out
    trained = out.split("trained token ids:")[1].splitlines()[0]
    endoftext = load_tokenizer(str(model_dir)).convert_tokens_to_ids("<|endoftext|>")
    assert f" {endoftext}," not in trained and f" {endoftext}]" not in trained  # one stop token, not two


def test_multi_turn_whose_final_answer_is_cut_away_is_dropped(tiny_tokenizer):
    sample = {**SAMPLE, "history": [["你好", "你好！"]]}
    enc = encode_sample(sample, tiny_tokenizer)
    final = len(tiny_tokenizer("一千二百三十四<|im_end|>\n", add_special_tokens=False)["input_ids"])
    start = len(enc["input_ids"]) - final  # the first token of the final answer
    # One final-answer token left: kept, trained on it.
    kept = encode_sample(sample, tiny_tokenizer, max_length=start + 1)
    assert kept is not None and kept["labels"][-1] == enc["input_ids"][start]
    # Only the earlier answer survives: dropped (None), as a too-long prompt is.
    assert encode_sample(sample, tiny_tokenizer, max_length=start) is None


def test_prompt_truncated_like_training_keeps_its_head_and_the_assistant_header(tiny_tokenizer):
    from zhlora.formatting import prompt_is_truncated

    long_prompt = {**SAMPLE, "input": "长" * 300}
    full = encode_prompt(long_prompt, tiny_tokenizer)  # no max_length: unchanged, as before
    assert len(full) > 300
    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    cut = encode_prompt(long_prompt, tiny_tokenizer, max_length=100)
    # 99 = the longest prompt training keeps (one answer token must fit in max_length=100)
    assert len(cut) == 99 and cut[:99 - len(header)] == full[:99 - len(header)] and cut[-len(header):] == header
    assert prompt_is_truncated(long_prompt, tiny_tokenizer, max_length=100)
    assert not prompt_is_truncated(SAMPLE, tiny_tokenizer, max_length=100)
    assert encode_prompt(SAMPLE, tiny_tokenizer, max_length=100) == encode_prompt(SAMPLE, tiny_tokenizer)
    # The alpaca template ends its prompt with its own header.
    alpaca_header = tiny_tokenizer("### 回答:\n", add_special_tokens=False)["input_ids"]
    cut = encode_prompt(long_prompt, tiny_tokenizer, template="alpaca", max_length=100)
    assert len(cut) == 99 and cut[-len(alpaca_header):] == alpaca_header
