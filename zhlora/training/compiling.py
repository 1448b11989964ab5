"""training.torch_compile: compile each decoder layer with torch.compile (inductor), in place.

Why the layers and not the whole model: the 30 layers of SmolLM2 are one class, so inductor
compiles one layer and reuses the code for the other 29 ("regional compilation", as
accelerate.utils.compile_regions does). On two CPU cores that makes a 30-step run about 16 s
longer with an empty inductor cache than with a warm one (bench/README.md), against minutes
for the whole model.

Why in place (nn.Module.compile) rather than accelerate's compile_regions: compile_regions
swaps each layer for a torch._dynamo OptimizedModule, whose state_dict keys gain an
`_orig_mod.` part, and the adapter PEFT saves would no longer name the base model's modules.
Module.compile keeps the module and its names; only its forward runs compiled.

What it saves: the elementwise work between the matmuls (RMSNorm, rotary, SiLU x up, the
casts between bf16 weights and fp32 LoRA weights) is fused into a few loops instead of one
pass over memory per op, and fewer intermediates are kept for the backward pass. Measured
(bench/README.md): 5% faster and 0.5 GB less peak on long rows, slower over 30 steps of short
ones, where the first steps' compile work weighs more. The loss is the same to rounding
(tests/test_train.py).
"""
from __future__ import annotations

import os
import shutil

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF model: modules whose class the model lists in
    _no_split_modules (LlamaDecoderLayer, Qwen2DecoderLayer, ...), the names transformers
    itself uses to know which blocks must stay whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU (CXX, else g++ or c++ on PATH), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place; returns how many. dynamic=True: batches differ in
    length every step, and one shape-generic graph avoids a recompile for each new length."""
    from zhlora.config import ConfigError

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"training.torch_compile=true: {type(model).__name__} lists no repeated decoder "
                          "layer (_no_split_modules) to compile; set training.torch_compile=false")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not cpp_compiler():
        # inductor writes C++ for the CPU; without a compiler it fails only at the first forward
        raise ConfigError("training.torch_compile=true on a CPU needs a C++ compiler (g++, or CXX=...): "
                          "install one (apt install g++) or set training.torch_compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
