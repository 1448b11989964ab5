"""第三步: LoRA (or full) fine-tuning, one readable loop.

    python training/train.py [--config configs/default.yaml] [key=value ...]
    torchrun --nproc_per_node=2 training/train.py ...      # data-parallel (gloo on CPU)

The loop is ours (not HF Trainer) so that what it optimises stays visible: `train` is the
loop, `step` one optimizer step, and the loss is zhlora/loss.py's `compute_loss`.
`build_run` does everything before the first step (with zhlora/training/'s helpers),
`finish` everything after the last. Resume is exact: the batch order of each epoch is a
pure function of the seed, and a checkpoint stores weights, optimizer, scheduler, each
process's RNG and the position in the epoch. accelerate handles devices, mixed precision
and DDP / DeepSpeed (DeepSpeed with gradient_accumulation_steps=1), so the same command
runs on a laptop CPU or many GPUs.
"""
from __future__ import annotations

import hashlib
import math
import os
import resource
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import DistributedType, gather_object
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from zhlora import allocator
from zhlora.adapter import apply_lora, count_parameters, save_trained, trainable_state
from zhlora.config import Config, ConfigError, save_config
from zhlora.cpu_share import CpuShare
from zhlora.errors import ZhloraError
from zhlora.files import write_json
from zhlora.formatting import IGNORE_INDEX
from zhlora.loss import compute_loss
from zhlora.models import load_model, resolve_model_path
from zhlora.training.batching import batch_stream, collate, collate_padded, count_steps, real_tokens, step_windows
from zhlora.training.checkpoint import list_checkpoints, rng_state, save_checkpoint
from zhlora.training.compiling import compile_decoder_layers
from zhlora.training.distill import Distiller
from zhlora.training.dropout import lora_inputs_kept, use_word_mask_dropout
from zhlora.training.progressive import grow_lora, parse_schedule
from zhlora.training.setup import (Run, batch_stream_settings, check_output_dir, load_split, make_accelerator,
                                   raw_optimizer, resume, resume_point)
from zhlora.training.tracking import Tracker, check_report_to


class TrainingError(ZhloraError, RuntimeError):
    """Training cannot go on (a NaN loss, an interrupted run); the message says what to do."""

    exit_code = 1  # the config was fine; the run itself stopped
    verb = "stopped"


def train(cfg: Config) -> dict:
    """Run a whole training; returns the summary also written to train_summary.json."""
    run = build_run(cfg)
    acc, t = run.acc, cfg.training
    tracker = Tracker(run.output_dir, t.report_to, cfg.to_dict(), run.step if run.resumed else None,
                      acc.is_main_process)
    stream = step_windows(run, run.epoch, run.index)
    stop = StopFlag()
    run.model.train()
    meter = Meter(run.step)
    last_loss = last_eval = float("nan")
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", disable=not acc.is_main_process)
    try:
        while run.step < run.total_steps:
            last_loss, lr, grad_norm, tokens, supervised = step(run, next(stream))
            meter.add(tokens, supervised)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            end = run.step == run.total_steps
            if run.step % t.logging_steps == 0 or end:
                size = run.epoch_sizes[min(run.epoch, len(run.epoch_sizes) - 1)]
                row = {"step": run.step, "epoch": round(run.epoch + run.index / max(1, size), 3),
                       "loss": last_loss, "learning_rate": lr, **meter.window()}
                tracker.log(row if grad_norm is None else {**row, "grad_norm": float(grad_norm)})  # None: missing
            with meter.paused():  # evaluation and saving are not training time
                if run.val and (run.step % t.eval_steps == 0 or end):
                    last_eval = evaluate_loss(run, run.val)
                    tracker.log({"step": run.step, "eval_loss": last_eval})
                if run.step % t.save_steps == 0 or stop.requested:
                    save_state(run)
            if stop.requested:
                raise TrainingError(f"interrupted at step {run.step}; checkpoint saved. Resume with: "
                                    f"training.resume=true output.dir={cfg.output.dir}")
    finally:
        stop.restore()
        bar.close()
        tracker.close()
    return finish(run, meter, last_loss, last_eval)


def step(run: Run, micro: list) -> tuple[float, float, torch.Tensor | None, int, int]:
    """One optimizer step over `micro`, its micro-batches ((epoch, index, samples) each): returns
    (loss, learning rate, grad norm, tokens, supervised tokens), the counts over all processes.

    Gradients accumulate over the micro-batches (DDP syncs on the last only). Each summed loss is
    divided by the supervised tokens of the whole step, so the step minimises the mean loss per
    answer token however the tokens fall into micro-batches and processes.
    """
    acc, cfg = run.acc, run.cfg
    batches = [collate(run, mine) for _, _, mine in micro]
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n_step = int(acc.reduce(torch.tensor(n_local, device=acc.device), reduction="sum"))
    loss_total = torch.zeros((), device=acc.device)
    for k, (batch, (_, _, mine)) in enumerate(zip(batches, micro)):
        sync = k == len(batches) - 1
        with (nullcontext() if sync else acc.no_sync(run.model)), acc.autocast(), \
                lora_inputs_kept(run.model, cfg.training.fast_dropout, acc.mixed_precision):
            if run.distiller:
                loss_sum, _ = run.distiller.loss(run.model, batch, mine)
            else:
                loss_sum, _ = compute_loss(run.model, batch, cfg.training.supervised_logits,
                                           cfg.training.fused_cross_entropy)
        # DDP averages gradients over processes: multiply back so the result is
        # the mean over all supervised tokens of the step.
        acc.backward(loss_sum * acc.num_processes / max(n_step, 1))
        loss_total += loss_sum.detach()
    loss = float(acc.reduce(loss_total, reduction="sum")) / max(n_step, 1)
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at step {run.step + 1}: lower training.learning_rate "
                            f"(now {cfg.training.learning_rate}) or check the data; last good checkpoint: "
                            f"{list_checkpoints(run.output_dir / 'checkpoints')[-1:] or 'none'}")
    max_norm = cfg.training.max_grad_norm or float("inf")
    grad_norm = acc.clip_grad_norm_(run.params, max_norm)  # None under DeepSpeed when the engine has none
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if run.step in run.growth:
        grow_lora(acc.unwrap_model(run.model), raw_optimizer(run.optimizer), run.growth[run.step])
        run.params = [p for p in run.model.parameters() if p.requires_grad]
        acc.print(f"\n[train] step {run.step}: LoRA rank grown to r={run.growth[run.step]}")
    run.epoch, run.index = micro[-1][0], micro[-1][1] + 1
    tokens = sum(real_tokens(run, mine) for _, _, mine in micro)
    tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum"))
    return loss, lr, grad_norm, tokens, n_step


class Meter:
    """Throughput in tokens and supervised (answer) tokens per second, over each logging window
    and over the whole run. Evaluation and saving are not training: their time is left out."""

    def __init__(self, start_step: int):
        self.start_step = start_step  # a resumed run times only its own steps
        self.started = self.window_start = time.perf_counter()
        self.tokens = self.supervised = self.window_tokens = self.window_supervised = 0
        self.paused_seconds = 0.0
        self.cpu_share = CpuShare()

    def add(self, tokens: int, supervised: int) -> None:
        self.tokens, self.supervised = self.tokens + tokens, self.supervised + supervised
        self.window_tokens, self.window_supervised = self.window_tokens + tokens, self.window_supervised + supervised

    def window(self) -> dict:
        """The rates since the last call; a new window starts."""
        elapsed = time.perf_counter() - self.window_start
        rates = {"tokens_per_s": self.window_tokens / elapsed,
                 "supervised_tokens_per_s": self.window_supervised / elapsed}
        self.window_start, self.window_tokens, self.window_supervised = time.perf_counter(), 0, 0
        return rates

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.paused_seconds += seconds
        self.window_start += seconds

    def summary(self, steps_done: int, processes: int = 1) -> dict:
        """cpu_others_share: how much of the CPU other programs took meanwhile (zhlora/cpu_share.py);
        reports leave out the timings of a run where it is above cpu_share.SHARED_ABOVE."""
        wall = time.perf_counter() - self.started
        seconds = wall - self.paused_seconds
        return {"wall_seconds": wall, "eval_and_save_seconds": self.paused_seconds,
                "seconds_per_step": seconds / max(1, steps_done - self.start_step),
                "tokens_per_s": self.tokens / seconds, "supervised_tokens_per_s": self.supervised / seconds,
                "cpu_others_share": self.cpu_share.others(processes)}


def build_run(cfg: Config) -> Run:
    """Everything before the first step: processes, the model with LoRA, data, optimizer and schedule,
    the checkpoint to resume from and the distillation teacher. What can be refused is refused first."""
    output_dir = Path(cfg.output.dir)
    check_report_to(cfg.training.report_to)  # a missing wandb is told now, not after the model loads
    acc = make_accelerator(cfg)
    settings = batch_stream_settings(cfg, acc.num_processes)
    resume_from = resume_point(cfg, output_dir, settings)
    if acc.is_main_process:
        check_output_dir(cfg, output_dir, resuming=resume_from is not None)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.training.seed)
    model, tokenizer = load_for_training(cfg, acc)
    trainable_n, total_n = count_parameters(model)
    train_set, dropped = load_split(cfg.data.train_file, tokenizer, cfg)
    val_set, _ = load_split(cfg.data.val_file, tokenizer, cfg) if Path(cfg.data.val_file).is_file() else ([], 0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    run = Run(cfg, acc, model, optimizer, None, train_set, tokenizer.pad_token_id, settings, tokenizer=tokenizer,
              val=val_set, output_dir=output_dir, params=params, total_params=total_n)
    run.epoch_sizes, run.total_steps = count_steps(run)
    run.scheduler = make_scheduler(optimizer, cfg, run.total_steps)
    run.growth = dict(parse_schedule(cfg.training.progressive, cfg.lora.r)) if cfg.training.progressive else {}
    if run.growth and acc.num_processes > 1:  # method and backend are checked when the config loads
        raise ConfigError(f"training.progressive: needs one process (this run has {acc.num_processes}): growing "
                          "r replaces the LoRA weights that DDP has registered")
    if resume_from is not None:
        run.step, run.epoch, run.index = resume(run, resume_from, run.growth)
        run.params = [p for p in model.parameters() if p.requires_grad]  # growth replaced some
        run.resumed = True
        acc.print(f"[train] resumed from {resume_from} at step {run.step}")
    if cfg.training.distill_teacher:
        run.distiller = make_distiller(run)
    describe(run, trainable_n, dropped)
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    return run


def load_for_training(cfg: Config, acc):
    """(model with LoRA applied, or all weights trainable for full fine-tuning; tokenizer)."""
    if acc.is_main_process:
        resolve_model_path(cfg.model.name)  # converts the embedded model once, before others read it
    acc.wait_for_everyone()
    # Full fine-tuning trains every weight, and trainable weights are fp32 (adapter.upcast_trainable):
    # load them in fp32 rather than round an fp32 checkpoint to bf16 and back.
    full_fp32 = cfg.training.method == "full" and cfg.model.dtype == "auto"
    model, tokenizer = load_model(replace(cfg.model, dtype="float32") if full_fp32 else cfg.model, acc.device)
    if cfg.training.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg)
    if cfg.training.fast_dropout:
        use_word_mask_dropout(model)
    if cfg.training.torch_compile:
        compile_decoder_layers(model)
    return model, tokenizer


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """HF's default schedule (transformers.get_linear_schedule_with_warmup): the lr rises linearly
    from 0 at the first step to training.learning_rate, over warmup_ratio of the steps rounded up as
    TrainingArguments.get_warmup_steps does (15 steps at 0.1: 2), then falls linearly to 0 at the end."""
    return get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * cfg.training.warmup_ratio),
                                           total_steps)


def make_distiller(run: Run) -> Distiller:
    """The teacher's cache covers exactly the rows the remaining steps will draw."""
    stream = step_windows(run, run.epoch, run.index)
    needed = {i for _ in range(run.total_steps - run.step) for _, _, mine in next(stream) for i in mine}
    name = f"teacher_top{run.cfg.training.distill_top_k}"
    if run.acc.num_processes > 1:  # each process draws its own rows
        name += f".rank{run.acc.process_index}"
    return Distiller(run.cfg, run.tokenizer, run.acc.device, run.train, run.output_dir / f"{name}.safetensors",
                     needed)


def describe(run: Run, trainable_n: int, dropped: int) -> None:
    """Print what is about to train, and how long it should take."""
    cfg, acc, total_n = run.cfg, run.acc, run.total_params
    tokens_total = sum(len(s["input_ids"]) for s in run.train)
    tokens_sup = sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in run.train)
    eta = estimate_seconds(run, run.total_steps - run.step)
    steps_per_epoch = math.ceil(run.epoch_sizes[0] / cfg.training.gradient_accumulation_steps)
    acc.print(f"[train] method={cfg.training.method} model={cfg.model.name} device={acc.device} "
              f"processes={acc.num_processes} mixed_precision={acc.mixed_precision}")
    acc.print(f"[train] trainable params: {trainable_n:,} / {total_n:,} ({100 * trainable_n / total_n:.4f}%)")
    acc.print(f"[train] data: {len(run.train)} train samples ({dropped} dropped: prompt > max_length), "
              f"{tokens_total:,} tokens, {tokens_sup:,} supervised; {len(run.val)} val samples")
    acc.print(f"[train] steps: {run.total_steps} ({steps_per_epoch}/epoch, batch {cfg.training.batch_size} x "
              f"{acc.num_processes} processes x {cfg.training.gradient_accumulation_steps} accumulation), "
              f"estimated time {eta / 60:.1f} min")


def estimate_seconds(run: Run, steps: int) -> float:
    """Time one forward+backward on a typical batch.

    The passes draw dropout masks, so they run inside torch.random.fork_rng over the CPU and the
    training device: a resumed run must draw the masks the uninterrupted run drew, on a GPU too.
    Under DeepSpeed accelerate's backward also steps the optimizer, so only the forward is timed
    there, times 3 (a backward costs about two forwards).
    """
    device = run.acc.device
    deepspeed = run.acc.distributed_type == DistributedType.DEEPSPEED
    batch = collate(run, next(batch_stream(run, 0, 0))[2])
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        for _ in range(2):  # the first pass pays one-time costs (allocation, kernel choice): time the second
            start = time.perf_counter()
            with run.acc.autocast():
                loss_sum, n = compute_loss(run.model, batch, run.cfg.training.supervised_logits,
                                           run.cfg.training.fused_cross_entropy)
            if not deepspeed:
                run.acc.backward(loss_sum / max(n, 1))
            seconds = time.perf_counter() - start
            run.optimizer.zero_grad(set_to_none=True)
    return seconds * (3 if deepspeed else 1) * steps * run.cfg.training.gradient_accumulation_steps


@torch.no_grad()
def evaluate_loss(run: Run, samples: list[dict]) -> float:
    """Mean cross-entropy per supervised token over a split (sharded across processes)."""
    model = run.acc.unwrap_model(run.model)
    model.eval()
    total = torch.zeros(2, device=run.acc.device)
    mine = samples[run.acc.process_index::run.acc.num_processes]
    for s in range(0, len(mine), run.cfg.training.batch_size):
        batch = collate_padded(mine[s:s + run.cfg.training.batch_size], run.pad_id)
        with run.acc.autocast():
            loss_sum, n = compute_loss(model, {k: v.to(run.acc.device) for k, v in batch.items()},
                                       run.cfg.training.supervised_logits, run.cfg.training.fused_cross_entropy)
        total += torch.tensor([loss_sum.item(), n], device=run.acc.device)
    total = run.acc.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step and save."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\n[train] 收到中断信号 (interrupt): saving a checkpoint after this step ...")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def save_state(run: Run) -> None:
    rng_states = gather_object([rng_state()])  # one per process, by rank: each drew its own dropout masks
    if run.acc.is_main_process:
        save_checkpoint(run.output_dir / "checkpoints" / f"checkpoint-{run.step}",
                        trainable_state(run.acc.unwrap_model(run.model)), raw_optimizer(run.optimizer),
                        run.scheduler, {"step": run.step, "epoch": run.epoch, "next_index": run.index,
                                        "batch_stream": run.stream_settings}, rng_states)
    run.acc.wait_for_everyone()


def finish(run: Run, meter: Meter, last_loss: float, last_eval: float) -> dict:
    """After the last step: save the adapter / model, print and write the summary."""
    acc, cfg = run.acc, run.cfg
    # the ranks on this machine: /proc/stat sees one node's cores (cpu_share.py)
    timing = meter.summary(run.step, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    acc.wait_for_everyone()
    trainable_n = count_parameters(run.model)[0]  # progressive growth changes it
    summary = {"method": cfg.training.method, "model": cfg.model.name, "trainable_params": trainable_n,
               "total_params": run.total_params, "trainable_percent": 100 * trainable_n / run.total_params,
               "steps": run.step, "train_samples": len(run.train), "processes": acc.num_processes,
               "final_loss": last_loss, "final_eval_loss": last_eval, **timing,
               "mixed_precision": acc.mixed_precision, "device": str(acc.device),
               "allocator": allocator.active()}
    # One fingerprint per process: data-parallel replicas must end bit-identical.
    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(acc.unwrap_model(run.model)).items()):
        digest.update(name.encode() + tensor.float().cpu().numpy().tobytes())
    summary["replica_fingerprints"] = gather_object([digest.hexdigest()[:16]])
    if acc.is_main_process:
        save_result(run, summary)
    acc.wait_for_everyone()
    return summary


def save_result(run: Run, summary: dict) -> None:
    """The trained adapter or model, train_summary.json with its size and peak memory, and the last words."""
    output_dir = run.output_dir
    model = run.acc.unwrap_model(run.model)
    saved = save_trained(model, run.tokenizer, run.cfg, resolve_model_path(run.cfg.model.name), output_dir)
    weights = [p for p in saved if p.suffix == ".safetensors"]
    size_key = "adapter_size_mb" if run.cfg.training.method == "lora" else "model_size_mb"
    summary[size_key] = round(sum(p.stat().st_size for p in weights) / 2**20, 3)
    if run.acc.device.type == "cuda":
        summary["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        summary["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        summary["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        summary["peak_memory_kind"] = "process peak RSS"
    write_json(output_dir / "train_summary.json", summary)
    print(f"[train] done in {summary['wall_seconds']:.1f} s ({summary['eval_and_save_seconds']:.1f} s of it "
          f"evaluating and saving), {summary['seconds_per_step']:.2f} s/step, "
          f"{summary['supervised_tokens_per_s']:.0f} supervised tokens/s "
          f"({summary['tokens_per_s']:.0f} total), peak memory {summary['peak_memory_mb']:.0f} MB "
          f"({summary['peak_memory_kind']})")
    print(f"[train] final loss {summary['final_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}; "
          f"{size_key.replace('_mb', '')} {summary[size_key]} MB -> {output_dir}/")
