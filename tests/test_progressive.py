"""Progressive rank growth keeps the model's function and the optimizer's memory."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.train import train
from zhlora.training.progressive import grow_lora, parse_schedule


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
    # new entries: no momentum, and B's new columns take the mean squared gradient of their row
    assert not optimizer.state[new_A]["exp_avg"][4:].any()
    mean_B = moments_B.mean(1, keepdim=True).expand(-1, 4)
    assert torch.equal(optimizer.state[new_B]["exp_avg_sq"][:, 4:], mean_B) and mean_B.all()
    assert old_A not in optimizer.state and any(p is new_A for p in optimizer.param_groups[0]["params"])
    optimizer.step()  # and it still steps


def steady_gradients(model, new_r: int, seed: int = 0):
    """name -> function(noise generator) giving each LoRA weight's gradient at its grown shape.

    Each entry has a steady sign plus 10% noise, scaled by 0.1-10x along the non-rank
    dimension (A's input features, B's output rows), so one entry's |g| is not another's."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    pattern = {}
    for name, (rows, cols) in shapes.items():
        if "lora_A" in name:  # r x in: grows in rows
            rows, scale = new_r, torch.logspace(-1, 1, cols)[None, :]
        else:  # out x r: grows in columns
            cols, scale = new_r, torch.logspace(-1, 1, rows)[:, None]
        pattern[name] = torch.randn(rows, cols, generator=gen).sign() * scale
    return lambda noise: {n: d * (1 + 0.1 * torch.randn(d.shape, generator=noise)) for n, d in pattern.items()}


def adam_step(params: dict, optimizer, grads: dict) -> dict:
    """One step with the given gradients (cut to each weight's shape); returns |change| per weight."""
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[n][:p.shape[0], :p.shape[1]].clone()
    optimizer.step()
    return {n: (p.detach() - before[n]).abs() for n, p in params.items()}


def new_entries_mean(changes: dict, old_r: int) -> float:
    parts = [c[old_r:] if "lora_A" in n else c[:, old_r:] for n, c in changes.items()]
    return torch.cat([p.flatten() for p in parts]).mean().item()


def test_new_entries_take_fresh_sized_adam_steps(tiny_model_dir):
    """After growth at step 1000 the new entries step about as far as a fresh parameter's.

    Zero moments under the tensor's shared step count (1000) gave 2.52x a fresh parameter's
    step 1 step after growth, 5.21x after 10 and 3.63x after 50 (the mean over new entries)."""
    lr, old_r, new_r = 1e-3, 4, 8
    model = tiny_peft(tiny_model_dir).train()
    gradients, noise = steady_gradients(model, new_r), torch.Generator().manual_seed(1)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    for _ in range(1000):
        adam_step(params, optimizer, gradients(noise))
    grow_lora(model, optimizer, new_r)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fresh = {n: torch.zeros_like(p, requires_grad=True) for n, p in params.items()}
    fresh_optimizer = torch.optim.AdamW(fresh.values(), lr=lr, weight_decay=0.0)
    ratios = {}
    for t in range(1, 51):
        grads = gradients(noise)
        grown_step = new_entries_mean(adam_step(params, optimizer, grads), old_r) / lr
        fresh_step = new_entries_mean(adam_step(fresh, fresh_optimizer, grads), old_r) / lr
        ratios[t] = grown_step / fresh_step
    shown = {t: round(ratios[t], 2) for t in (1, 10, 50)}
    assert max(ratios.values()) < 1.5, (shown, max(ratios.values()))
    assert ratios[50] > 0.5, shown  # and the new entries do train


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
