"""Progressive rank growth keeps the model's function and the optimizer's memory."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.progressive import grow_lora, parse_schedule
from zhlora.train import train


def tiny_peft(tiny_model_dir, use_rslora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             use_rslora=use_rslora))
    for name, p in model.named_parameters():  # a trained-looking adapter: B no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_growth_keeps_logits_and_scaling(tiny_model_dir, use_rslora):
    model = tiny_peft(tiny_model_dir, use_rslora)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    scaling = layer.scaling["default"]
    assert grow_lora(model, None, 16) == 4  # q and v in 2 layers
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert layer.lora_A["default"].weight.shape[0] == 16 and layer.lora_B["default"].weight.shape[1] == 16
    assert layer.scaling["default"] == scaling
    # Equal up to float32 rounding (bigger matmuls add the zero terms in another order).
    assert torch.allclose(after, before, rtol=1e-5, atol=2e-5)
    expected_alpha = 8 * (2 if use_rslora else 4)
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == expected_alpha


def test_growth_keeps_optimizer_moments(tiny_model_dir):
    model = tiny_peft(tiny_model_dir).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=torch.randint(3, 100, (2, 12)), labels=torch.randint(3, 100, (2, 12))).loss.backward()
    optimizer.step()
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    old_A, old_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    moments_A, moments_B = optimizer.state[old_A]["exp_avg"].clone(), optimizer.state[old_B]["exp_avg_sq"].clone()
    grow_lora(model, optimizer, 8)
    new_A, new_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.equal(optimizer.state[new_A]["exp_avg"][:4], moments_A)
    assert torch.equal(optimizer.state[new_B]["exp_avg_sq"][:, :4], moments_B)
    assert not optimizer.state[new_B]["exp_avg_sq"][:, 4:].any()
    assert old_A not in optimizer.state and any(p is new_A for p in optimizer.param_groups[0]["params"])
    optimizer.step()  # and it still steps


def test_schedule_is_checked():
    assert parse_schedule(["16@100", "32@200"], 8) == [(100, 16), (200, 32)]
    with pytest.raises(ConfigError, match="must increase"):
        parse_schedule(["8@100"], 8)
    with pytest.raises(ConfigError, match="R@STEP"):
        load_config(None, ["training.progressive=[16-100]"])


def test_progressive_training_runs_and_resumes_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ("lora.r=2", "lora.lora_alpha=4", "training.progressive=[4@6, 8@12]", "training.max_steps=16",
              "training.save_steps=8")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, full, *common)))
    adapter = json.loads((full / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert summary["trainable_params"] == 8 * 2 * 2 * (64 + 64) - 8 * 2 * 32  # q 64->64, v 64->32, 2 layers
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), full)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-8", resumed / "checkpoints" / "checkpoint-8")
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, resumed, *common, "training.resume=true")))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
