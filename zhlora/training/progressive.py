"""Progressive rank growth: start LoRA at a small r and grow it while training.

    python training/train.py lora.r=8 "training.progressive=[16@100, 32@200]"

means r=8 for steps 1-100, r=16 from step 101, r=32 from step 201. Growing keeps
the model's function exactly:

    A' = [A; A_new]   (new rows Kaiming-uniform, like a fresh lora_A)
    B' = [B, 0]       (new columns zero, like a fresh lora_B)
    B'A' = B A + 0 A_new = B A

and the scale of the update, lora_alpha / r, is kept constant by growing lora_alpha
with r (alpha 16 at r=8 becomes 32 at r=16; with rsLoRA, alpha / sqrt(r) is kept).
So logits just before and just after a growth step are equal (up to float32 rounding:
the bigger matmuls sum in another order, |diff| ~1e-5), and the saved
adapter_config.json holds the final r and the grown lora_alpha.

AdamW's moments of the old rows and columns are kept, so the old part of the adapter
goes on training as if nothing happened. The new entries' exp_avg starts at zero and
their exp_avg_sq at the old entries' mean, so that under the tensor's shared step count
their steps are a fresh parameter's size (see _grown_moment).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def parse_schedule(items: list[str], start_r: int) -> list[tuple[int, int]]:
    """["16@100", "32@200"] -> [(100, 16), (200, 32)]: (after this step, grow to r).

    Written R@STEP, not R:STEP, because YAML reads 16:100 as the base-60 number 1060.
    """
    from zhlora.config import ConfigError

    schedule, last_r, last_step = [], start_r, 0
    for item in items:
        try:
            r_text, step_text = item.split("@")
            r, step = int(r_text), int(step_text)
        except ValueError:
            raise ConfigError(f"training.progressive: {item!r} should be R@STEP, e.g. 16@100") from None
        if r <= last_r or step <= last_step:
            raise ConfigError(f"training.progressive: {item!r}: ranks and steps must increase "
                              f"(after r={last_r} at step {last_step})")
        schedule.append((step, r))
        last_r, last_step = r, step
    return schedule


def _grown(old: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A bigger copy of a LoRA matrix: extra rows Kaiming-uniform (lora_A), extra columns zero (lora_B)."""
    out_f, in_f = rows or old.out_features, cols or old.in_features
    new = nn.Linear(in_f, out_f, bias=False, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if rows:
            nn.init.kaiming_uniform_(new.weight, a=math.sqrt(5))  # PEFT's lora_A init
        else:
            new.weight.zero_()
        new.weight[:old.out_features, :old.in_features] = old.weight
    return new


def _grown_moment(key: str, value: torch.Tensor, new: nn.Parameter) -> torch.Tensor:
    """An AdamW moment padded to the grown shape; the old entries' values are kept as they are.

    The new entries share the tensor's step count t0 (say 1000), so Adam's bias correction
    divides their moments by 1 - beta^t0 (0.63 for beta2=0.999 at t0=1000), where a fresh
    entry t steps old divides by 1 - beta^t (0.001 at t=1). From zero, exp_avg_sq then
    reads ~600x too small one step after growth, and the steps came out 2.5-5x a fresh
    parameter's. Started instead from the old entries' mean along the rank dimension (per
    input feature for A, per output row for B), it already holds (1 - beta2^t0) g^2, which
    the shared correction turns into g^2, as a fresh entry's does, at every t. exp_avg
    starts at zero (a gradient's sign cannot be borrowed): its steps are (1 - 0.9^t) of a
    fresh one's (0.1 at t=1, 0.65 at t=10, 0.99 at t=50), a short warmup, never an overshoot.
    Assumes the new entries' gradients are about as large as the old ones' along that dimension.
    """
    grown = torch.zeros_like(new)
    grown[tuple(slice(0, n) for n in value.shape)] = value
    if key in ("exp_avg_sq", "max_exp_avg_sq"):
        dim = next(d for d, n in enumerate(value.shape) if new.shape[d] > n)
        fresh = [slice(None)] * value.dim()
        fresh[dim] = slice(value.shape[dim], None)
        grown[tuple(fresh)] = value.mean(dim, keepdim=True)
    return grown


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put `new` where `old` was in the optimizer, its moments grown by _grown_moment."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {key: _grown_moment(key, value, new)
                                if torch.is_tensor(value) and value.shape == old.shape
                                else value  # AdamW's step counter, shared by old and new entries
                                for key, value in state.items()}


@torch.no_grad()
def grow_lora(model, optimizer: torch.optim.Optimizer | None, new_r: int, adapter: str = "default") -> int:
    """Grow every PEFT LoRA layer of `adapter` to rank new_r; returns how many layers grew."""
    from peft.tuners.lora import LoraLayer

    grown = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        A, B = module.lora_A[adapter], module.lora_B[adapter]
        old_r = A.out_features
        if new_r <= old_r:
            raise ValueError(f"cannot grow r={old_r} to r={new_r}")
        new_A, new_B = _grown(A, rows=new_r), _grown(B, cols=new_r)
        if optimizer is not None:
            _move_state(optimizer, A.weight, new_A.weight)
            _move_state(optimizer, B.weight, new_B.weight)
        module.lora_A[adapter], module.lora_B[adapter] = new_A, new_B
        factor = math.sqrt(new_r / old_r) if module.use_rslora.get(adapter) else new_r / old_r
        module.r[adapter] = new_r
        module.lora_alpha[adapter] = module.lora_alpha[adapter] * factor  # scaling unchanged
        grown += 1
    peft_config = model.peft_config[adapter]
    factor = math.sqrt(new_r / peft_config.r) if peft_config.use_rslora else new_r / peft_config.r
    alpha = peft_config.lora_alpha * factor
    peft_config.lora_alpha = int(alpha) if float(alpha).is_integer() else alpha
    peft_config.r = new_r
    return grown
