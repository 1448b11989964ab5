"""training.fast_dropout: the mask cut from 64-bit words is dropout with the same p, scale and
reproducibility as nn.Dropout, and it reaches every LoRA dropout (PEFT's and the scratch layer's)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zhlora.training.dropout import WordMaskDropout, keep_mask, kept_share, use_word_mask_dropout


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
