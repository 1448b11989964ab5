"""Put LoRA on a model (PEFT, or the hand-written zhlora/lora.py), count what trains,
and save the result atomically.

Saved LoRA output is PEFT's own format (adapter_config.json +
adapter_model.safetensors), loadable with plain `PeftModel.from_pretrained`.
The weights file is moved into place first and the config last, so a folder
never holds a config without its complete weights: an interrupted save is never
taken for an adapter (and the next save removes its temporary folder).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from zhlora.config import Config, ConfigError


def target_modules(names: list[str]):
    """PEFT takes "all-linear" as a string (every linear layer but the output head)."""
    return "all-linear" if names == ["all-linear"] else list(names)


def upcast_trainable(model):
    """Cast every trainable parameter to fp32, in place; frozen ones keep their dtype.

    model.dtype=auto loads bf16 on a GPU. AdamW on bf16 weights has no fp32 master copy:
    at lr 5e-5 only 28.8% of a 576x576 weight's entries changed in 10 steps (99.999% in
    fp32), since 0.05 + 1e-4 rounds back to 0.05. A frozen bf16 base is fine (and half the
    memory); with bf16 autocast the matmuls still run in bf16. `.data` is replaced, not the
    Parameter, so tied weights (embed_tokens = lm_head) stay tied.
    """
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


@contextmanager
def peft_wrapping():
    """Around PEFT's wrapping of a model (get_peft_model, PeftModel.from_pretrained). PEFT 0.21
    reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated for
    `is_activation_checkpointing`: a FutureWarning on every wrap, in every learner's quick start,
    that only PEFT can act on. Only that message, only here, is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model, cfg: Config):
    """Wrap a base model for training according to cfg.lora / cfg.training.method.

    Whatever the base's dtype, what trains is fp32 (`upcast_trainable`).
    """
    if cfg.training.method == "full":
        return upcast_trainable(model.requires_grad_(True))
    lora = cfg.lora
    if lora.backend == "scratch":
        from zhlora.lora import inject_lora

        if lora.use_dora:
            raise ConfigError("lora.use_dora: DoRA needs lora.backend=peft (the scratch layer is plain LoRA)")
        inject_lora(model, target_modules(lora.target_modules), lora.r, lora.lora_alpha,
                    lora.lora_dropout, lora.use_rslora)
        return upcast_trainable(model)
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=target_modules(lora.target_modules), use_dora=lora.use_dora,
                             use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
    try:  # PEFT upcasts bf16 adapters itself (autocast_adapter_dtype); upcast_trainable checks the rest
        with peft_wrapping():
            return upcast_trainable(get_peft_model(model, peft_config))
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"lora.target_modules={lora.target_modules}: {err}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; tied embeddings counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_state(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_scratch_adapter(model, cfg: Config, base_path: str, folder: Path) -> None:
    """The hand-written layers saved in PEFT's format, so PEFT can load them."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from zhlora.lora import lora_state_dict

    lora = cfg.lora
    LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
               target_modules=target_modules(lora.target_modules), use_rslora=lora.use_rslora,
               task_type="CAUSAL_LM", base_model_name_or_path=base_path).save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()},
              str(folder / "adapter_model.safetensors"))


def save_trained(model, tokenizer, cfg: Config, base_path: str, output_dir: Path) -> list[Path]:
    """Save the adapter (or the full model) and tokenizer into output_dir, atomically per file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".saving-*"):  # left by a save that SIGKILL stopped before its cleanup
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".saving-") as tmp:
        tmp = Path(tmp)
        if cfg.training.method == "lora" and cfg.lora.backend == "scratch":
            save_scratch_adapter(model, cfg, base_path, tmp)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        configs = {"adapter_config.json", "config.json"}  # what makes a folder "a model"
        files = sorted(tmp.iterdir(), key=lambda p: p.name in configs)
        moved = []
        for path in files:
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(path, output_dir / path.name)
                moved.append(output_dir / path.name)
            else:
                shutil.move(str(path), output_dir / path.name)
    return moved
