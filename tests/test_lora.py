"""The hand-written LoRA (zhlora/lora.py) against PEFT, on a tiny random Llama (CPU, seconds).

Run: python -m pytest tests/test_lora.py -q
"""

import copy

import pytest
import torch
import transformers
from peft import (LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict,
                  set_peft_model_state_dict)
from safetensors.torch import save_file

from zhlora.lora import LoRALinear, inject_lora, lora_state_dict, merge_lora

R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def base_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def make_peft(model, target_modules=TARGETS, use_rslora=False):
    """PEFT edits the model in place, so it always gets its own copy."""
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=target_modules, use_rslora=use_rslora)
    return get_peft_model(copy.deepcopy(model), config).eval()


def make_ours(model, target_modules=TARGETS, use_rslora=False):
    ours = copy.deepcopy(model)
    names = inject_lora(ours, target_modules, r=R, lora_alpha=ALPHA, use_rslora=use_rslora)
    return ours, names


def randomize_lora(model):
    """B starts at zero, which would make every comparison trivially pass; fill it."""
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)


@torch.no_grad()
def copy_into_peft(ours, peft_model):
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            theirs = peft_model.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids).logits


def test_single_layer_matches_peft(base_model):
    peft_model = make_peft(base_model)
    theirs = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    ours = LoRALinear(copy.deepcopy(theirs.base_layer), r=R, lora_alpha=ALPHA)
    torch.manual_seed(3)
    with torch.no_grad():
        for w in (ours.lora_A.weight, ours.lora_B.weight):
            w.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        x = torch.randn(2, 5, 64)
        assert ours.lora_B(ours.lora_A(x)).abs().max() > 0.1  # the LoRA path is really on
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"),
                                   atol=1e-6, rtol=0)
    assert ours.scaling == theirs.scaling["default"] == ALPHA / R


def test_init_matches_peft_default(base_model):
    # same seed, same order of nn.Linear creations and init calls -> bitwise the same A
    torch.manual_seed(4)
    ours, _ = make_ours(base_model)
    torch.manual_seed(4)
    peft_model = make_peft(base_model)
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            theirs = peft_model.base_model.model.get_submodule(name)
            assert torch.equal(m.lora_A.weight, theirs.lora_A["default"].weight), name
            assert not m.lora_B.weight.any() and not theirs.lora_B["default"].weight.any()


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("target_modules", [TARGETS, "all-linear"])
def test_model_logits_match_peft(base_model, input_ids, target_modules, use_rslora):
    ours, names = make_ours(base_model, target_modules, use_rslora)
    peft_model = make_peft(base_model, target_modules, use_rslora)
    assert sorted(names) == sorted(peft_model.targeted_module_names)
    assert "lm_head" not in names
    randomize_lora(ours)
    copy_into_peft(ours, peft_model)
    out = logits(ours, input_ids)
    assert not torch.allclose(out, logits(base_model, input_ids), atol=1e-3)
    torch.testing.assert_close(out, logits(peft_model, input_ids), atol=1e-6, rtol=0)


def test_init_is_the_base_model(base_model, input_ids):
    ours, _ = make_ours(base_model, "all-linear")
    assert torch.equal(logits(ours, input_ids), logits(base_model, input_ids))


def test_merge_keeps_logits(base_model, input_ids):
    ours, names = make_ours(base_model)
    randomize_lora(ours)
    before = logits(ours, input_ids)
    merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert all(type(ours.get_submodule(n)) is torch.nn.Linear for n in names)
    torch.testing.assert_close(logits(ours, input_ids), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target_modules", [TARGETS, "all-linear"])
def test_only_lora_is_trainable(base_model, target_modules):
    ours, _ = make_ours(base_model, target_modules)
    trainable = {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    peft_trainable, _ = make_peft(base_model, target_modules).get_nb_trainable_parameters()
    assert sum(trainable.values()) == peft_trainable
    if target_modules == TARGETS:  # q: 64->64, v: 64->32 (2 KV heads x 16); 2 layers
        assert peft_trainable == 2 * (R * (64 + 64) + R * (64 + 32))


def test_training_lowers_loss(base_model, input_ids):
    ours, _ = make_ours(base_model)
    ours.train()
    frozen = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = ours(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)


def test_state_dict_loads_into_peft(base_model, input_ids, tmp_path):
    ours, _ = make_ours(base_model)
    randomize_lora(ours)
    sd = lora_state_dict(ours)
    peft_model = make_peft(base_model)
    assert set(sd) == set(get_peft_model_state_dict(peft_model))
    result = set_peft_model_state_dict(peft_model, sd)
    assert not result.unexpected_keys
    expected = logits(ours, input_ids)
    torch.testing.assert_close(logits(peft_model, input_ids), expected, atol=1e-6, rtol=0)

    # the same weights as a file, in a folder PeftModel.from_pretrained loads
    peft_model.peft_config["default"].save_pretrained(tmp_path)  # adapter_config.json
    save_file(sd, tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=1e-6, rtol=0)


def test_bf16_base_matches_peft(base_model, input_ids):
    """A bf16 base keeps fp32 adapters (as PEFT's autocast_adapter_dtype): x goes in cast to
    fp32, the sum comes back in bf16, so both give the same logits."""
    base_model = base_model.to(torch.bfloat16)
    ours, _ = make_ours(base_model)
    peft_model = make_peft(base_model)
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    randomize_lora(ours)
    copy_into_peft(ours, peft_model)
    out = logits(ours, input_ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(peft_model, input_ids), atol=0, rtol=0)


@pytest.mark.parametrize("adapter_dtype", [None, torch.bfloat16])
def test_merge_on_a_bf16_base_rounds_once(adapter_dtype):
    """W0 + (alpha / r) B A is summed in fp32 and rounded to bf16 once, not B A first."""
    torch.manual_seed(5)
    base = torch.nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=R, lora_alpha=ALPHA)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    if adapter_dtype is not None:  # e.g. adapter weights loaded back from a bf16 file
        layer.to(adapter_dtype)
    with torch.no_grad():
        A, B = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        expected = (base.weight.float() + (B @ A) * layer.scaling).to(torch.bfloat16)
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.bias, base.bias)
    assert torch.equal(merged.weight, expected)


# Each form PEFT accepts (tuners_utils.check_target_module_exists): a list matches a full name or
# a suffix after a dot; a string is a regex that must match the full name (re.fullmatch).
TARGET_FORMS = [["self_attn.q_proj"], ["model.layers.0.self_attn.q_proj", "v_proj"], [r"mlp.down_proj", "o_proj"],
                r".*\.(q|v)_proj", r"model\.layers\.1\..*proj", "all-linear", "ALL-LINEAR", ["lm_head"]]


@pytest.mark.parametrize("target_modules", TARGET_FORMS, ids=str)
def test_target_modules_select_what_peft_selects(base_model, target_modules):
    _, names = make_ours(base_model, target_modules)
    assert sorted(names) == sorted(make_peft(base_model, target_modules).targeted_module_names)


@pytest.mark.parametrize("target_modules", ["q_proj", ["proj"], ["mlp"]])
def test_target_modules_peft_refuses_are_refused(base_model, target_modules):
    """"q_proj" as a string is a regex over full names: nothing matches. "mlp" is no nn.Linear."""
    with pytest.raises(ValueError):
        make_peft(base_model, target_modules)
    with pytest.raises(ValueError, match="target_modules"):
        make_ours(base_model, target_modules)
