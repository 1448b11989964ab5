"""training.fast_dropout: LoRA dropout masks cut from 64-bit random words (cheaper on a CPU).

PEFT applies `lora_dropout` to the input of every adapted projection (nn.Dropout). On a CPU,
PyTorch draws a dropout mask with bernoulli_, one Mersenne-Twister number per element; with
dropout on q_proj and v_proj of SmolLM2's 30 layers that is 60 masks a forward pass, about a
tenth of a training step (bench/results/profile_*.txt). One 64-bit random word holds four
independent 16-bit draws, so a mask cut from words needs a quarter of the draws: about 3x
cheaper per call (bench/README.md).

What stays as nn.Dropout: inverted dropout (kept elements scaled by 1 / (1 - p), so the
expected output is the input), nothing dropped in eval mode, masks from torch's global
generator (torch.manual_seed and a resumed checkpoint's RNG state reproduce them). What
differs: p is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the masks are
other draws than nn.Dropout's, so a run's losses differ from a run without the switch as two
seeds differ, not more (tests/test_dropout.py).

Under autocast the switch also keeps each adapted layer's input in its bf16 dtype (lora_inputs_kept).
"""
from __future__ import annotations

import math

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

WORDS = 65536  # the values one 16-bit draw takes


def kept_share(p: float) -> float:
    """1 - p, with p rounded to the 16-bit draws' resolution."""
    return 1 - round(p * WORDS) / WORDS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`, each element kept (True) with probability kept_share(p)."""
    n = math.prod(shape)
    # random_(-2**63, None) draws over the whole int64 range; the default random_() stops at 2**63 - 1,
    # which would leave the top bit of every fourth 16-bit draw at 0
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    draws = words.view(torch.int16)[:n]  # uniform on [-32768, 32767]
    return (draws >= round(p * WORDS) - WORDS // 2).view(shape)


class WordMaskDropout(nn.Dropout):
    """nn.Dropout whose mask comes from keep_mask (a subclass, so PEFT's isinstance checks hold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # autograd keeps the bool mask for the backward pass, as native dropout keeps its own
        return x * keep_mask(x.shape, self.p, x.device) * (1 / kept_share(self.p))


def use_word_mask_dropout(model: nn.Module) -> int:
    """Swap every LoRA dropout (PEFT's lora_dropout[adapter], zhlora/lora.py's lora_dropout) for a
    WordMaskDropout of the same p; returns how many. No-op when lora_dropout is 0 (nn.Identity)."""
    swaps = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Dropout and "lora_dropout" in name.split(".")[-2:]]
    for name, module in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, WordMaskDropout(module.p))
    return len(swaps)


def lora_inputs_kept(model: nn.Module, fast_dropout: bool, mixed_precision: str):
    """A context for the training forward: PEFT's cast of each adapted layer's input to the adapter's
    dtype turned off, under autocast with training.fast_dropout.

    With bf16 frozen weights PEFT copies the bf16 input to fp32 (the adapter's dtype) before the
    dropout, and autocast casts it back to bf16 for lora_A: two copies of every adapted input a
    forward pass, and two more in the backward. WordMaskDropout on the bf16 input gives the very
    values of dropout on the fp32 copy rounded to bf16 (its product is formed in fp32 either way),
    so the copies can go: same loss, same gradients (tests/test_dropout.py). nn.Dropout cannot: its
    bf16 masks are other draws than its fp32 ones. Without autocast the cast is kept, since lora_A's
    fp32 weight would then meet a bf16 input.
    """
    return disable_input_dtype_casting(model, active=fast_dropout and mixed_precision != "no")
