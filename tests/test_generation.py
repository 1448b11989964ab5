"""Batched generation: greedy means argmax, whatever the model's generation_config ships."""
import pytest
import torch

from zhlora.formatting import encode_prompt, stop_ids

QUESTIONS = ["把1234写成中文数字", "你好", "今天天气怎么样"]


def _argmax_loop(model, prompt: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the model, take the top token, repeat."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


@pytest.fixture
def penalised_model(tiny_model_dir):
    from zhlora.config import ModelConfig
    from zhlora.models import load_model

    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    # What a model's generation_config.json may ship (Qwen2.5-Instruct: repetition_penalty 1.05-1.1,
    # temperature/top_p/top_k); made large here so that, if applied, they change the argmax.
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, temperature=0.1, top_k=3,
                                   top_p=0.5, min_length=200)
    return model.eval(), tokenizer


def test_greedy_ignores_the_models_generation_config(penalised_model):
    from zhlora.generation import generate

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "user", "content": q}], tokenizer) for q in QUESTIONS]
    results = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=1)
    expected = [_argmax_loop(model, p, stop_ids(tokenizer), 24) for p in prompts]
    # The random model repeats tokens, so a repetition penalty or an n-gram ban would show.
    assert any(len(set(e)) < len(e) for e in expected)
    assert [r.token_ids for r in results] == expected


def test_greedy_settings_are_recorded_as_neutral():
    from zhlora.generation import decoding_settings

    settings = decoding_settings()  # what evaluation writes into its results
    assert settings["do_sample"] is False and settings["num_beams"] == 1
    assert settings["repetition_penalty"] == 1.0 and settings["no_repeat_ngram_size"] == 0
    assert settings["min_new_tokens"] == 0 and "temperature" not in settings  # unused by greedy


def test_a_setting_only_its_absence_switches_off_is_refused(penalised_model):
    from zhlora.generation import generate

    model, tokenizer = penalised_model
    model.generation_config.suppress_tokens = [5]
    with pytest.raises(ValueError, match="generation_config sets suppress_tokens"):
        generate(model, tokenizer, [encode_prompt([{"role": "user", "content": "你好"}], tokenizer)])


LONGER = QUESTIONS + ["请把下面的句子翻译成英文：我喜欢学习", "1+1等于几？", "写一首关于秋天的诗", "什么是LoRA微调",
                      "解释一下注意力机制", "你是谁"]


def _config_with_stops(model, tokenizer, prompts, max_new_tokens):
    """A greedy GenerationConfig whose stop tokens end the random model's answers at different steps
    (a token each of three answers produces at its 3rd, 6th and 9th step), so rows leave the batch
    and others join while it runs."""
    from zhlora.generation import generation_config

    free = [_argmax_loop(model, p, [], max_new_tokens) for p in prompts]
    config = generation_config(model, tokenizer, max_new_tokens)
    config.eos_token_id = sorted({free[0][2], free[1][5], free[2][8]})
    return config


SYSTEM = "你是一个乐于助人的中文助手，回答要简短准确。"


@pytest.mark.parametrize("share_prefix", [0, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_refilled_batches_answer_as_one_prompt_at_a_time(penalised_model, batch_size, share_prefix):
    from zhlora.refill import generate_refill, shared_head

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], tokenizer)
               for q in LONGER]
    assert shared_head(prompts, 8) >= 8  # the system prompt: joining groups share their head
    config = _config_with_stops(model, tokenizer, prompts, 12)
    expected = [_argmax_loop(model, p, config.eos_token_id, 12) for p in prompts]
    assert len({len(e) for e in expected}) >= 3  # rows end at different steps, so refilling happens mid-run
    got = generate_refill(model, prompts, config, tokenizer.pad_token_id, batch_size, share_prefix=share_prefix)
    assert [ids for ids, _, _ in got] == expected
    assert [finished for _, finished, _ in got] == [e[-1] in config.eos_token_id for e in expected]
    assert all(seconds > 0 for _, _, seconds in got)


def test_refill_and_fixed_batches_give_the_same_text(penalised_model):
    from zhlora.generation import generate

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "user", "content": q}], tokenizer) for q in LONGER]
    refilled = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    fixed = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4, refill=False)
    assert [g.text for g in refilled] == [g.text for g in fixed]
    assert [g.token_ids for g in refilled] == [g.token_ids for g in fixed]


def test_refill_passes_the_cache_by_its_current_name(penalised_model):
    """transformers 5.24 renamed `past_key_values` to `cache` and removes the old name in 5.40,
    which requirements.txt still allows: refill must not lean on the deprecated alias. The old
    name raises a FutureWarning on every call; transformers' logger line about it is printed once
    per process and does not propagate, so the warning is what this test watches."""
    import warnings

    from zhlora.generation import generate

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "user", "content": q}], tokenizer) for q in LONGER]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_peft_wrapping_hides_only_the_deprecated_read_peft_makes(tiny_model_dir, tiny_run_dir):
    """Training's get_peft_model and loading a run print no FutureWarning about PEFT reading
    `is_gradient_checkpointing`; any other warning still gets through."""
    import warnings

    from zhlora.adapter import apply_lora, peft_wrapping
    from zhlora.config import load_config
    from zhlora.generation import load_run
    from zhlora.models import load_model

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(load_model(cfg.model)[0], cfg)
        load_run(tiny_run_dir)
        with peft_wrapping():
            warnings.warn("another FutureWarning", FutureWarning)
    said = [str(w.message) for w in caught]
    assert not [line for line in said if "is_gradient_checkpointing" in line]
    assert "another FutureWarning" in said


def test_refill_sampling_repeats_with_its_seed_and_follows_temperature(penalised_model):
    from zhlora.generation import generate

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "user", "content": q}], tokenizer) for q in LONGER]
    kwargs = dict(max_new_tokens=8, batch_size=3, do_sample=True, top_p=1.0)
    first = generate(model, tokenizer, prompts, seed=7, temperature=1.0, **kwargs)
    again = generate(model, tokenizer, prompts, seed=7, temperature=1.0, **kwargs)
    other = generate(model, tokenizer, prompts, seed=8, temperature=1.0, **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    # A temperature near 0 leaves only the argmax: sampling then answers as greedy does.
    cold = generate(model, tokenizer, prompts, seed=7, temperature=1e-4, **kwargs)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert [g.token_ids for g in cold] == [g.token_ids for g in greedy]


def test_the_output_layer_gets_the_last_position_in_plain_strides(penalised_model):
    """hidden_states[:, -1:] of a batch makes torch's linear copy a frozen output layer once per
    row; load_model's pre-hook (zhlora/models.py) hands it a plain copy of the position instead."""
    from zhlora.refill import left_padded

    model, tokenizer = penalised_model
    ids, mask = left_padded([encode_prompt([{"role": "user", "content": q}], tokenizer) for q in LONGER],
                            tokenizer.pad_token_id)
    head, seen = model.get_output_embeddings(), []
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            every = model(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    rows, hidden = len(LONGER), seen[0].shape[-1]
    assert seen[0].shape == (rows, 1, hidden) and seen[0].stride() == (hidden, hidden, 1)
    torch.testing.assert_close(kept, every[:, -1:], rtol=1e-5, atol=1e-5)


def test_shared_head_leaves_each_prompt_a_token_of_its_own():
    from zhlora.refill import shared_head

    assert shared_head([[1, 2, 3, 4], [1, 2, 3, 5]], 2) == 3
    assert shared_head([[1, 2, 3], [1, 2, 3, 4]], 2) == 2  # the shorter prompt keeps its last token
    assert shared_head([[1, 2, 3, 4], [1, 2, 3, 5]], 4) == 0  # under the minimum: not worth a call
    assert shared_head([[1, 2, 3, 4], [1, 2, 3, 5]], 0) == 0  # 0 turns sharing off
    assert shared_head([[1, 2, 3, 4]], 1) == 0  # one row alone has nothing to share


def test_a_shared_head_is_prefilled_once_per_joining_group(penalised_model, monkeypatch):
    from zhlora.refill import Refill, generate_refill

    model, tokenizer = penalised_model
    prompts = [encode_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], tokenizer)
               for q in LONGER]
    calls = []
    original = Refill._head_cache

    def counted(self, head, rows):
        calls.append(rows)
        return original(self, head, rows)

    monkeypatch.setattr(Refill, "_head_cache", counted)
    generate_refill(model, prompts, _config_with_stops(model, tokenizer, prompts, 12), tokenizer.pad_token_id, 4)
    assert calls and calls[0] == 4 and sum(calls) <= len(prompts)  # one call per group, never per row
