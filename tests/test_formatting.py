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
