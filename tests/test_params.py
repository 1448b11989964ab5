"""Parameter counts from a config alone (meta device): exact numbers for the README's models,
offline, the r * (in + out) formula per layer, and agreement with a real model's count."""
from __future__ import annotations

import pytest

from zhlora.config import load_config
from zhlora.cli import main as zhlora
from zhlora.params import count, model_config

QWEN, SMOLLM2 = "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"


def lora(*overrides: str):
    return load_config(None, list(overrides))


def test_qwen_counts_from_the_shipped_config():
    hf_config, source = model_config(QWEN)
    assert source.endswith("resources/model_configs/Qwen--Qwen2.5-0.5B-Instruct/config.json")  # offline
    trainable, total, base = count(hf_config, lora("lora.r=16", "lora.target_modules=q_proj,v_proj"))
    # 24 layers x 16 x ((896 + 896) for q_proj + (896 + 128) for v_proj)
    assert (trainable, base, total) == (1_081_344, 494_032_768, 494_032_768 + 1_081_344)


def test_smollm2_shipped_config_matches_the_real_model():
    from zhlora.models import cache_root

    hf_config, _ = model_config(SMOLLM2)
    assert count(hf_config, lora())[2] == 134_515_008  # tied embeddings counted once
    cached = cache_root() / "smollm2-135m-instruct"
    if (cached / "config.json").is_file():  # the converted embedded model, when this machine has it
        assert model_config("smollm2-135m-instruct")[1] == str(cached / "config.json")
        assert count(model_config("smollm2-135m-instruct")[0], lora())[2] == 134_515_008


# SmolLM2-135M: hidden 576, 3 KV heads x 64 = 192, MLP 1536, 30 layers. One layer's r * (in + out):
ATTENTION = {"q_proj": 576 + 576, "k_proj": 576 + 192, "v_proj": 576 + 192, "o_proj": 576 + 576}
MLP = {"gate_proj": 576 + 1536, "up_proj": 576 + 1536, "down_proj": 1536 + 576}


@pytest.mark.parametrize("overrides, per_layer_and_rank", [
    (["lora.r=8"], ATTENTION["q_proj"] + ATTENTION["v_proj"]),
    (["lora.r=8", "lora.target_modules=q_proj,k_proj,v_proj,o_proj"], sum(ATTENTION.values())),
    (["lora.r=8", "lora.target_modules=all-linear"], sum(ATTENTION.values()) + sum(MLP.values())),
    (["lora.r=4", "lora.target_modules=all-linear"], sum(ATTENTION.values()) + sum(MLP.values())),
])
def test_lora_adds_r_times_in_plus_out_per_layer(overrides, per_layer_and_rank):
    cfg = lora(*overrides)
    trainable, _, _ = count(model_config(SMOLLM2)[0], cfg)
    assert trainable == 30 * cfg.lora.r * per_layer_and_rank


def test_dora_adds_one_magnitude_per_output_feature():
    hf_config = model_config(SMOLLM2)[0]
    plain = count(hf_config, lora("lora.r=8"))[0]
    dora = count(hf_config, lora("lora.r=8", "lora.use_dora=true"))[0]
    assert dora - plain == 30 * (576 + 192)  # q_proj and v_proj output features


def test_meta_count_equals_the_count_of_a_real_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from zhlora.adapter import apply_lora, count_parameters

    (tmp_path / "run.yaml").write_text(f"model:\n  name: {tiny_model_dir}\nlora:\n  r: 4\n")
    cfg = load_config(tmp_path / "run.yaml", ["lora.target_modules=all-linear"])
    real = count_parameters(apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg))
    assert count(model_config(str(tiny_model_dir))[0], cfg)[:2] == real


def test_cli_prints_the_counts_per_rank(capsys):
    from zhlora.cli import main as zhlora_main

    assert zhlora_main(["params", "--model", QWEN, "--ranks", "16,32", "lora.target_modules=q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "494,032,768" in out and "1,081,344" in out and "2,162,688" in out
    assert "4.125" in out  # 1,081,344 fp32 numbers = 4.125 MB of adapter


def test_cli_reads_a_zhlora_config(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"# zhlora train --config run.yaml\nmodel:\n  name: {tiny_model_dir}\n")
    assert zhlora(["params", "--model", str(tmp_path / "run.yaml"), "lora.r=2"]) == 0
    assert str(tiny_model_dir) in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "8,x"], "--ranks 8,x: write whole numbers"),
    (["--ranks", "0"], "every r must be >= 1"),
    (["--ranks", "8", "training.method=full"], "r does not apply"),
    (["lora.rank=8"], "did you mean lora.r?"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert zhlora(["params", "--model", SMOLLM2, *argv]) == 2
    assert message in capsys.readouterr().err
