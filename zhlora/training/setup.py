"""What training needs before its first step: processes and precision, the output
folder's state (refuse to clobber a finished run, find the checkpoint to resume),
and the encoded data; and `Run`, what the loop's parts share. zhlora/train.py's
build_run calls these, so the loop itself stays one screen.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhlora.adapter import trainable_state
from zhlora.config import Config, ConfigError, load_config
from zhlora.formatting import encode_sample
from zhlora.tasks import selected
from zhlora.training.checkpoint import list_checkpoints, load_checkpoint
from zhlora.training.progressive import grow_lora


@dataclass
class Run:
    """Everything the loop and its helpers share: what train.build_run made, and where the run is."""
    cfg: Config
    acc: object  # accelerate.Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train: list[dict]
    pad_id: int
    stream_settings: dict = field(default_factory=dict)  # saved in each checkpoint: batch_stream_settings
    tokenizer: object = None
    val: list[dict] = field(default_factory=list)
    output_dir: Path = Path("outputs")
    params: list = field(default_factory=list)  # the trainable tensors clipped; progressive growth replaces some
    total_params: int = 0
    growth: dict = field(default_factory=dict)  # training.progressive: {after this step: new r}
    distiller: object = None  # training/distill.py's Distiller when training.distill_teacher is set
    epoch_sizes: list[int] = field(default_factory=list)  # micro-batches of each epoch (count_steps)
    total_steps: int = 0
    resumed: bool = False
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the next micro-batch's place in the batch stream: (epoch, index)
    index: int = 0


def make_accelerator(cfg: Config):
    """accelerate picks up torchrun / accelerate launch (DDP: gloo on CPU, nccl on GPU)."""
    from accelerate import Accelerator

    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    precision = cfg.training.mixed_precision
    if precision == "auto":
        # bf16 autocast on a GPU that has it; fp32 on CPU by default (exact and safe;
        # training.mixed_precision=bf16 is ~25% faster on a CPU with bf16 support).
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and cpu:
        raise ConfigError("training.mixed_precision=fp16: fp16 runs ~100x slower on a CPU; use bf16 or no")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A notebook, a test or a sweep may train twice in one process; one process alone
        # has nothing to share, so it starts from a fresh state.
        reset_accelerate_state()
    acc = Accelerator(cpu=cpu, mixed_precision=precision)
    check_deepspeed(cfg, acc)
    return acc


def check_deepspeed(cfg: Config, acc) -> None:
    """The loop accumulates gradients itself: acc.no_sync on all micro-batches but the last.
    Under DeepSpeed no_sync does nothing, and accelerate's backward steps the engine whenever
    sync_gradients is true, which it always is here: accumulation 4 would take 4 optimizer
    steps of a quarter-batch each. Refused rather than trained differently from what was asked."""
    from accelerate.utils import DistributedType

    n = cfg.training.gradient_accumulation_steps
    if acc.distributed_type == DistributedType.DEEPSPEED and n > 1:
        raise ConfigError(f"training.gradient_accumulation_steps={n}: DeepSpeed would step the optimizer on every "
                          "micro-batch of zhlora's loop; use 1 with a larger training.batch_size or more processes, "
                          "or run data-parallel without DeepSpeed (torchrun)")


def end_process_group() -> None:
    """Tear the torchrun process group down before the process exits. Left to interpreter exit,
    gloo's threads can be destroyed while still joinable: "terminate called without an active
    exception" and SIGABRT in a rank that had finished its work (seen once in the test suite)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def reset_accelerate_state() -> None:
    """accelerate keeps one state per process and refuses a second Accelerator with another
    mixed precision: clear it, as accelerate's own test cases do."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load_split(path: str, tokenizer, cfg: Config) -> tuple[list[dict], int]:
    """Encode a split file; returns (samples, count dropped because the prompt is too long)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data: {path} does not exist; run `python data/prepare_data.py` first")
    rows = json.loads(file.read_text(encoding="utf-8"))
    if cfg.data.tasks:
        rows = [r for r in rows if selected(r, cfg.data.tasks)]
        if not rows:
            raise ConfigError(f"data.tasks={cfg.data.tasks}: no row of {path} has one of these tasks")
    encoded = [encode_sample(r, tokenizer, cfg.model.template, cfg.data.max_length, cfg.data.train_on_prompt)
               for r in rows]
    samples = [e for e in encoded if e is not None]
    return samples, len(encoded) - len(samples)


def file_sha256(path: str) -> str | None:
    """The content's fingerprint (None for a missing file: load_split says so, with advice)."""
    file = Path(path)
    if not file.is_file():
        return None
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def batch_stream_settings(cfg: Config, processes: int) -> dict:
    """What decides which samples each process draws at each step, besides training.batch_size
    and training.seed (checked from config.yaml). A checkpoint records them; a resume that
    changes one would replay another stream from the saved position, so it is refused. The
    train file counts by content: moving it is fine, editing it is not."""
    return {"training.gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
            "training.packing": cfg.training.packing, "training.group_by_length": cfg.training.group_by_length,
            "data.max_length": cfg.data.max_length, "data.tasks": cfg.data.tasks,
            "data.train_file sha256": file_sha256(cfg.data.train_file), "processes": processes}


def check_batch_stream(folder: Path, settings: dict) -> None:
    saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")).get("batch_stream", {})
    for key, new in settings.items():
        if key in saved and saved[key] != new:  # a setting a checkpoint does not hold cannot be checked
            raise ConfigError(f"{key}: the checkpoint was trained with {saved[key]!r}, this run asks {new!r}; "
                              "resume needs the same value")


def resume_point(cfg: Config, output_dir: Path, settings: dict) -> Path | None:
    """The checkpoint to resume from: training.resume = false | true | a path. settings:
    batch_stream_settings of this run, which must equal the checkpoint's."""
    resume = cfg.training.resume
    if resume == "false":
        return None
    if resume == "true":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            # A run killed before its first save (save_steps=100 by default) left none.
            print(f"[train] training.resume=true but {output_dir}/checkpoints holds no complete checkpoint: "
                  f"starting over from step 0 in {output_dir}")
            return None
        folder = found[-1]
    else:
        folder = Path(resume)
        if not (folder / "trainer_state.json").is_file():
            raise ConfigError(f"training.resume={resume}: not a complete checkpoint folder")
    saved = output_dir / "config.yaml"
    if saved.is_file():
        before = load_config(saved)
        for key in ("model.name", "lora.r", "lora.lora_alpha", "lora.target_modules", "training.method",
                    "training.batch_size", "training.seed"):
            section, name = key.split(".")
            old, new = getattr(getattr(before, section), name), getattr(getattr(cfg, section), name)
            if old != new:
                raise ConfigError(f"{key}: the checkpoint was trained with {old!r}, this run asks {new!r}; "
                                  "resume needs the same value")
    check_batch_stream(folder, settings)
    return folder


def raw_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def resume(run: Run, folder: Path, growth: dict) -> tuple[int, int, int]:
    """Load a checkpoint into the run (this process's own RNG state); returns (step, epoch, next_index)."""
    model = run.acc.unwrap_model(run.model)
    done = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    for at, r in growth.items():  # the checkpoint holds the grown shapes
        if at <= done:
            grow_lora(model, raw_optimizer(run.optimizer), r)
    tensors, state = load_checkpoint(folder, run.optimizer, run.scheduler, run.acc.process_index)
    load_trainable(model, tensors)
    return state["step"], state["epoch"], state["next_index"]


def load_trainable(model, tensors: dict) -> None:
    """A checkpoint holds no frozen base weight, hence strict=False; so check by hand that it holds
    exactly the trainable parameters: another lora.target_modules or a renamed module would
    otherwise leave some at their initial values, silently."""
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ConfigError(f"training.resume: the checkpoint's trainable weights do not match the model\n"
                          f"  missing: {few(missing)}\n  unexpected: {few(unexpected)}")
    model.load_state_dict(tensors, strict=False)


def few(keys: list[str]) -> str:
    """At most 5 names: a wrong lora.target_modules misses hundreds."""
    return (", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")) if keys else "none"


def check_output_dir(cfg: Config, output_dir: Path, resuming: bool) -> None:
    """Check that output.dir can be written (before minutes of model loading), and refuse
    to write over a run unless output.overwrite=true (then clear it). training.resume=true
    with no checkpoint to resume from clears an unfinished run too: it starts over."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"output.dir={output_dir}: cannot write: {err.strerror or err}") from None
    if resuming:
        return
    markers = ["config.yaml", "train_summary.json", "adapter_config.json", "checkpoints"]
    present = [m for m in markers if (output_dir / m).exists()]
    if not present:
        return
    finished = [m for m in ["train_summary.json", "adapter_config.json", "config.json"] if (output_dir / m).exists()]
    if cfg.training.resume == "true" and finished and not cfg.output.overwrite:
        raise ConfigError(f"output.dir={output_dir} holds a finished run ({', '.join(finished)}) and no checkpoint "
                          "to resume from; use output.overwrite=true or another output.dir")
    if not cfg.output.overwrite and cfg.training.resume != "true":
        raise ConfigError(f"output.dir={output_dir} already holds a run ({', '.join(present)}); "
                          "use output.overwrite=true, another output.dir, or training.resume=true")
    for name in ["checkpoints", "runs", "training_history.jsonl", "train_summary.json", "adapter_config.json",
                 "adapter_model.safetensors", "config.json", "model.safetensors", "config.yaml"]:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
