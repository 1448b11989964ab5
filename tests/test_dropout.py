"""training.fast_dropout: the mask cut from 64-bit words is dropout with the same p, scale and
reproducibility as nn.Dropout, and it reaches every LoRA dropout (PEFT's and the scratch layer's)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zhlora.training.dropout import WordMaskDropout, keep_mask, kept_share, lora_inputs_kept, use_word_mask_dropout


def test_each_of_the_four_draws_in_a_word_keeps_1_minus_p():
    n, p = 4 * 250_000, 0.05
    torch.manual_seed(0)
    kept = keep_mask(torch.Size([n]), p, torch.device("cpu")).view(-1, 4).float().mean(0)
    sigma = math.sqrt(p * (1 - p) / (n // 4))
    # random_() without a lower bound leaves the top bit of the fourth draw at 0: it would keep
    # every element of that slot, 1.0 instead of 0.95
    assert torch.all((kept - kept_share(p)).abs() < 5 * sigma), kept
    assert kept_share(0.05) == 1 - 3277 / 65536


def test_kept_elements_are_scaled_and_eval_mode_drops_nothing():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    drop = WordMaskDropout(0.3)
    y = drop(x)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], x[kept] / kept_share(0.3))
    y.sum().backward()  # the gradient flows through kept elements only, with the same scale
    torch.testing.assert_close(x.grad, kept.float() / kept_share(0.3))
    assert drop.eval()(x) is x


def test_the_global_seed_reproduces_the_masks_and_bf16_inputs_keep_their_dtype():
    x = torch.ones(8, 300, dtype=torch.bfloat16)
    torch.manual_seed(7)
    first = WordMaskDropout(0.1)(x)
    torch.manual_seed(7)
    assert torch.equal(first, WordMaskDropout(0.1)(x)) and first.dtype == torch.bfloat16
    assert not torch.equal(first, WordMaskDropout(0.1)(x))  # the next call draws anew


class Scratchish(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.q_proj.lora_dropout = nn.Dropout(0.05)  # zhlora/lora.py's name
        self.attention_dropout = nn.Dropout(0.1)  # a model's own dropout is not LoRA's: left alone


def test_only_lora_dropouts_are_swapped_and_p_is_kept():
    model = Scratchish()
    assert use_word_mask_dropout(model) == 1
    assert type(model.q_proj.lora_dropout) is WordMaskDropout and model.q_proj.lora_dropout.p == 0.05
    assert type(model.attention_dropout) is nn.Dropout


def test_every_peft_lora_dropout_is_swapped_and_the_adapter_keys_stay():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = peft.get_peft_model(tiny, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                      target_modules=["q_proj", "v_proj"]))
    keys = set(peft.get_peft_model_state_dict(model))
    assert use_word_mask_dropout(model) == 4  # 2 layers x (q_proj, v_proj)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_dropout["default"]) is WordMaskDropout
    assert set(peft.get_peft_model_state_dict(model)) == keys
    model.train()
    model(torch.randint(0, 64, (2, 9)), labels=torch.randint(0, 64, (2, 9))).loss.backward()
    assert layer.lora_A["default"].weight.grad is not None


def tiny_bf16_lora(dropout_cls):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model = peft.get_peft_model(tiny, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable parameters in fp32, frozen weights in bf16, as zhlora trains
    if dropout_cls is WordMaskDropout:
        use_word_mask_dropout(model)
    return model.train()


def loss_and_grads(model, kept: bool, mixed_precision: str = "bf16"):
    ids = torch.randint(0, 64, (4, 160), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # the same dropout masks for both runs
    with torch.autocast("cpu", dtype=torch.bfloat16), lora_inputs_kept(model, kept, mixed_precision):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def test_keeping_lora_inputs_in_bf16_changes_neither_loss_nor_gradients():
    model = tiny_bf16_lora(WordMaskDropout)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.lora_dropout["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    cast_loss, cast_grads = loss_and_grads(model, kept=False)
    kept_loss, kept_grads = loss_and_grads(model, kept=True)
    handle.remove()
    assert seen == [torch.float32, torch.bfloat16]  # PEFT's fp32 copy, then the input as it came
    assert torch.equal(cast_loss, kept_loss)
    assert cast_grads.keys() == kept_grads.keys() and all(torch.equal(cast_grads[n], kept_grads[n]) for n in cast_grads)
    assert layer.cast_input_dtype_enabled  # the context restores PEFT's flag


def test_lora_inputs_are_cast_without_autocast_or_without_the_switch():
    model = tiny_bf16_lora(WordMaskDropout)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    for fast_dropout, mixed_precision in ((True, "no"), (False, "bf16")):
        with lora_inputs_kept(model, fast_dropout, mixed_precision):
            assert layer.cast_input_dtype_enabled
    with lora_inputs_kept(model, True, "bf16"):
        assert not layer.cast_input_dtype_enabled
