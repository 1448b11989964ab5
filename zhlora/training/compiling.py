"""training.torch_compile: compile each decoder layer with torch.compile (inductor), in place.

Why the layers and not the whole model: the 30 layers of SmolLM2 are one class, so inductor
compiles one layer and reuses the code for the other 29 ("regional compilation", as
accelerate.utils.compile_regions does). That is about 20 s on the first step on two CPU cores,
a few seconds once inductor's on-disk cache holds it, against minutes for the whole model.

Why in place (nn.Module.compile) rather than accelerate's compile_regions: compile_regions
swaps each layer for a torch._dynamo OptimizedModule, whose state_dict keys gain an
`_orig_mod.` part, and the adapter PEFT saves would no longer name the base model's modules.
Module.compile keeps the module and its names; only its forward runs compiled.

What it saves: the elementwise work between the matmuls (RMSNorm, rotary, SiLU x up, the
casts between bf16 weights and fp32 LoRA weights) is fused into a few loops instead of one
pass over memory per op. bench/README.md has the measured effect; the loss is the same to
rounding (tests/test_train.py).
"""
from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF model: modules whose class the model lists in
    _no_split_modules (LlamaDecoderLayer, Qwen2DecoderLayer, ...), the names transformers
    itself uses to know which blocks must stay whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place; returns how many. dynamic=True: batches differ in
    length every step, and one shape-generic graph avoids a recompile for each new length."""
    layers = decoder_layers(model)
    if not layers:
        from zhlora.config import ConfigError

        raise ConfigError(f"training.torch_compile=true: {type(model).__name__} lists no repeated decoder "
                          "layer (_no_split_modules) to compile; set training.torch_compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
