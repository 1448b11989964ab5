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
import re

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
        # A and B are trained, so they stay fp32 on a bf16/fp16 base, as PEFT's autocast_adapter_dtype
        # does: an AdamW step of 1e-4 on 0.05 is lost in bf16 (8-bit mantissa, spacing 2.4e-4 there).
        low = base_layer.weight.dtype in (torch.float16, torch.bfloat16)
        like = dict(device=base_layer.weight.device, dtype=torch.float32 if low else base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **like)
        # A: nn.Linear's own default init (Kaiming-uniform, a=sqrt(5)), as PEFT does;
        # B: zeros, so B A = 0 and the wrapped layer starts equal to the base layer
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # As PEFT: x is cast to the adapter's dtype (fp32 on a bf16 base) and the sum back to
        # the base's, so the next layer sees the dtype it would see without LoRA.
        # B (A x) costs r * (in + out) per token; building B A first would cost in * out
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (result + self.lora_B(self.lora_A(x)) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, the out x in matrix that training adds to W0, in fp32 at least."""
        A, B = self.lora_A.weight, self.lora_B.weight
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new frozen nn.Linear with weight W0 + delta; this layer stays unchanged.

        The sum is formed in fp32 and cast to the base's dtype once: in bf16, rounding B A
        and then the sum again doubles the error (bf16 keeps 8 bits of mantissa).
        """
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        delta = self.delta_weight()
        merged.weight.copy_(base.weight.to(delta.dtype) + delta)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _is_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule (tuners_utils.check_target_module_exists): a string is a regex over the
    full name (re.fullmatch, so "q_proj" alone matches nothing); a list entry is a full
    name or a suffix after a dot ("q_proj", "self_attn.q_proj", "model.layers.0.mlp")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def target_names(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """The names of the modules that target_modules selects, as PEFT selects them."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        # as PEFT: every nn.Linear except the output head (`lm_head`, 49152 x 576 in SmolLM2-135M)
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if get_head else getattr(model, "lm_head", None)
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    names = [n for n, _ in model.named_modules() if n and _is_target(n, target_modules)]
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            kind = type(model.get_submodule(name)).__name__
            raise ValueError(f"target_modules={target_modules!r} selects {name} ({kind}); "
                             "the hand-written layer wraps only nn.Linear")
    if not names:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    return names


def inject_lora(model: nn.Module, target_modules: list[str] | str, r: int, lora_alpha: float,
                lora_dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wrap the targeted nn.Linear layers in LoRALinear, freeze the rest, return their names.

    target_modules takes PEFT's forms: a list of names or name suffixes (["q_proj",
    "self_attn.v_proj"]), a regex over full names (r".*\\.(q|v)_proj"), or "all-linear".
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; call merge_lora(model) first")
    names = target_names(model, target_modules)
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
