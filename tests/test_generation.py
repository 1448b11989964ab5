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
