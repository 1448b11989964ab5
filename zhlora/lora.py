"""LoRA written by hand, to read beside PEFT (training itself uses PEFT).

LoRA freezes a pretrained weight W0 (out x in) and learns a low-rank change:

    h = W0 x + (alpha / r) * B A x        A: r x in,  B: out x r,  r << in, out

A 576x576 q_proj (SmolLM2-135M) at r=16 trains 2 * 576 * 16 = 18,432 parameters
instead of 576 * 576 = 331,776, i.e. 5.6%. A starts Kaiming-uniform and B starts
at zero, so B A = 0 and step 0 is exactly the base model. With lora_alpha=32 and
r=16 the update is scaled by 2; rsLoRA (use_rslora) scales by alpha / sqrt(r) = 8
instead, so raising r does not shrink the update. After training, W0 + (alpha / r)
B A folds into one matrix (`merge`) and inference costs nothing extra.

Names follow PEFT (`r`, `lora_alpha`, `lora_dropout`, `lora_A`, `lora_B`), and
`lora_state_dict` uses PEFT's keys, so its output is a PEFT adapter's weights.
Test: python -m pytest tests/test_lora.py -q
"""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """h = W0 x + (alpha / r) * B A x, with W0 (`base_layer`) frozen."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.lora_alpha = r, lora_alpha
        # rsLoRA: alpha / sqrt(r), so r=64 is not damped 4x more than r=16
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        like = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **like)
        # A: nn.Linear's own default init (Kaiming-uniform, a=sqrt(5)), as PEFT does;
        # B: zeros, so B A = 0 and the wrapped layer starts equal to the base layer
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # B (A x) costs r * (in + out) per token; building B A first would cost in * out
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, the out x in matrix that training adds to W0."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new frozen nn.Linear with weight W0 + delta; this layer stays unchanged."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(base.weight + self.delta_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def inject_lora(model: nn.Module, target_modules: list[str] | str, r: int, lora_alpha: float,
                lora_dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wrap the targeted nn.Linear layers in LoRALinear, freeze the rest, return their names.

    target_modules: last name components (["q_proj", "v_proj"]) or "all-linear",
    which, as in PEFT, means every nn.Linear except the output head (`lm_head`).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; call merge_lora(model) first")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            # PEFT reads any other string as a regex over full names; we refuse to guess
            raise ValueError(
                f"target_modules={target_modules!r}: use a list of names or 'all-linear'")
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if get_head else getattr(model, "lm_head", None)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    else:
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.rpartition(".")[2] in target_modules]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    model.requires_grad_(False)
    for name in names:
        layer = LoRALinear(model.get_submodule(name), r, lora_alpha, lora_dropout, use_rslora)
        _set_submodule(model, name, layer)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).merge())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the lora_A / lora_B weights, under PEFT's keys.

    PEFT wraps the model twice (PeftModel.base_model = LoraModel, .model = ours), hence
    `base_model.model.<name>.lora_A.weight`; it drops the adapter name ("default") when
    saving. safetensors.torch.save_file(sd, "adapter_model.safetensors") next to an
    adapter_config.json gives a folder that PeftModel.from_pretrained loads.
    """
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach()
            sd[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd
