"""第三步: LoRA (or full) fine-tuning, one readable loop.

    python training/train.py [--config configs/default.yaml] [key=value ...]
    torchrun --nproc_per_node=2 training/train.py ...      # data-parallel (gloo on CPU)

The loop is ours (not HF Trainer) so that what it optimises stays visible
(`compute_loss`), and so resume is exact: the batch order of each epoch is a pure
function of the seed, and a checkpoint stores weights, optimizer, scheduler, each
process's RNG and the position in the epoch. accelerate handles devices, mixed
precision and DDP / DeepSpeed (DeepSpeed with gradient_accumulation_steps=1), so the
same command runs on a laptop CPU or many GPUs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, gather_object
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from zhlora.adapter import apply_lora, count_parameters, save_trained, trainable_state
from zhlora.batching import collate_packed, collate_padded, epoch_batches, pack_samples
from zhlora.checkpoint import list_checkpoints, rng_state, save_checkpoint
from zhlora.config import Config, ConfigError, save_config
from zhlora.distill import Distiller
from zhlora.formatting import IGNORE_INDEX
from zhlora.models import answer_logits, load_model, resolve_model_path
from zhlora.progressive import grow_lora, parse_schedule
from zhlora.tracking import Tracker, check_report_to
from zhlora.train_setup import (Run, batch_stream_settings, check_output_dir, load_split, make_accelerator,
                                raw_optimizer, resume, resume_point)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, an interrupted run); the message says what to do."""


def compute_loss(model, batch: dict, supervised_logits: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are.

    Token t predicts token t+1, so logits drop the last position and labels the
    first. Labels of -100 (prompt and padding) are skipped. The caller divides by
    the supervised-token count of the whole optimizer step (all micro-batches, all
    processes), so every answer token weighs the same however batches are cut.

    supervised_logits (training.supervised_logits): apply the output layer only at
    the trained positions (models.answer_logits); the same loss, with less time and
    memory, since 80% of our tokens are prompt.
    """
    logits, targets = answer_logits(model, batch, supervised_logits)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def batch_stream(run: Run, start_epoch: int, start_index: int):
    """Yield (epoch, index, samples for this process) from a position onwards, forever."""
    cfg, world, rank = run.cfg, run.acc.num_processes, run.acc.process_index
    lengths = [len(s["input_ids"]) for s in run.train]
    epoch, index = start_epoch, start_index
    while True:
        global_batches = epoch_batches(lengths, cfg.training.batch_size * world, cfg.training.seed, epoch,
                                       cfg.training.group_by_length or cfg.training.packing)
        if cfg.training.packing:  # pack rows of max_length, then batch rows
            order = [i for b in global_batches for i in b]
            rows = pack_samples(run.train, order, cfg.data.max_length)
            global_batches = [rows[s:s + cfg.training.batch_size * world]
                              for s in range(0, len(rows), cfg.training.batch_size * world)]
        for index in range(index, len(global_batches)):
            # A last batch smaller than the number of processes would leave one of
            # them without work (and DDP waiting for it forever): skip it on all.
            if len(global_batches[index]) >= world:
                yield epoch, index, global_batches[index][rank::world]
        epoch, index = epoch + 1, 0


def step_windows(run: Run, start_epoch: int, start_index: int):
    """Yield the micro-batches of each optimizer step: gradient_accumulation_steps of them, fewer
    in the last step of an epoch. A step never spans two epochs (as in HF Trainer), so an epoch
    of 10 batches at accumulation 4 is 3 steps of 4, 4 and 2, and 3 epochs train 30 batches, not 36."""
    window = []
    for micro in batch_stream(run, start_epoch, start_index):
        if window and micro[0] != window[0][0]:
            yield window
            window = []
        window.append(micro)
        if len(window) == run.cfg.training.gradient_accumulation_steps:
            yield window
            window = []


def batches_per_epoch(run: Run, epoch: int) -> int:
    """Micro-batches this process runs in an epoch (with packing, epochs can differ by a row)."""
    return sum(1 for _ in itertools.takewhile(lambda m: m[0] == epoch, batch_stream(run, epoch, 0)))


def count_steps(run: Run) -> tuple[list[int], int]:
    """Micro-batches of each epoch, and the optimizer steps of the run: training.max_steps, else
    exactly training.num_epochs epochs of ceil(batches / accumulation) steps each (as HF counts;
    a fraction of the last epoch rounded up)."""
    t = run.cfg.training
    sizes = [batches_per_epoch(run, e) for e in range(1 if t.max_steps > 0 else math.ceil(t.num_epochs))]
    if t.max_steps > 0:
        return sizes, t.max_steps
    steps = [math.ceil(n / t.gradient_accumulation_steps) for n in sizes]
    whole = int(t.num_epochs)
    return sizes, sum(steps[:whole]) + math.ceil((t.num_epochs - whole) * steps[-1])


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """HF's default schedule (transformers.get_linear_schedule_with_warmup): the lr rises linearly
    from 0 at the first step to training.learning_rate, over warmup_ratio of the steps rounded up as
    TrainingArguments.get_warmup_steps does (15 steps at 0.1: 2), then falls linearly to 0 at the end."""
    return get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * cfg.training.warmup_ratio),
                                           total_steps)


def collate(run: Run, mine) -> dict:
    if run.cfg.training.packing:
        batch = collate_packed([[run.train[i] for i in row] for row in mine], run.pad_id)
    else:
        batch = collate_padded([run.train[i] for i in mine], run.pad_id)
    return {k: v.to(run.acc.device) for k, v in batch.items()}


def real_tokens(run: Run, mine) -> int:
    """Tokens of the samples in a batch: never the padding (a packed row's tail included)."""
    ids = [i for row in mine for i in row] if run.cfg.training.packing else mine
    return sum(len(run.train[i]["input_ids"]) for i in ids)


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
                                   run.cfg.training.supervised_logits)
        total += torch.tensor([loss_sum.item(), n], device=run.acc.device)
    total = run.acc.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


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
                loss_sum, n = compute_loss(run.model, batch, run.cfg.training.supervised_logits)
            if not deepspeed:
                run.acc.backward(loss_sum / max(n, 1))
            seconds = time.perf_counter() - start
            run.optimizer.zero_grad(set_to_none=True)
    return seconds * (3 if deepspeed else 1) * steps * run.cfg.training.gradient_accumulation_steps


def make_distiller(run: Run, tokenizer, output_dir: Path, steps_left: int, epoch: int, index: int) -> Distiller:
    """The teacher's cache covers exactly the rows the remaining steps will draw."""
    stream = step_windows(run, epoch, index)
    needed = {i for _ in range(steps_left) for _, _, mine in next(stream) for i in mine}
    name = f"teacher_top{run.cfg.training.distill_top_k}"
    if run.acc.num_processes > 1:  # each process draws its own rows
        name += f".rank{run.acc.process_index}"
    return Distiller(run.cfg, tokenizer, run.acc.device, run.train, output_dir / f"{name}.safetensors", needed)


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


def train(cfg: Config) -> dict:
    """Run a whole training; returns the summary also written to train_summary.json."""
    output_dir = Path(cfg.output.dir)
    check_report_to(cfg.training.report_to)  # a missing wandb is told now, not after the model loads
    acc = make_accelerator(cfg)
    settings = batch_stream_settings(cfg, acc.num_processes)
    resume_from = resume_point(cfg, output_dir, settings)
    if acc.is_main_process:
        check_output_dir(cfg, output_dir, resuming=resume_from is not None)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.training.seed)
    if acc.is_main_process:
        resolve_model_path(cfg.model.name)  # converts the embedded model once, before others read it
    acc.wait_for_everyone()
    # Full fine-tuning trains every weight, and trainable weights are fp32 (adapter.upcast_trainable):
    # load them in fp32 rather than round an fp32 checkpoint to bf16 and back.
    full_fp32 = cfg.training.method == "full" and cfg.model.dtype == "auto"
    model, tokenizer = load_model(replace(cfg.model, dtype="float32") if full_fp32 else cfg.model, acc.device)
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg)
    trainable_n, total_n = count_parameters(model)
    train_set, dropped = load_split(cfg.data.train_file, tokenizer, cfg)
    val_set, _ = load_split(cfg.data.val_file, tokenizer, cfg) if Path(cfg.data.val_file).is_file() else ([], 0)

    if cfg.training.distill_teacher and cfg.training.packing:
        raise ConfigError("training.distill_teacher: distillation needs training.packing=false")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    run = Run(cfg, acc, model, optimizer, None, train_set, tokenizer.pad_token_id, settings)
    epoch_sizes, total_steps = count_steps(run)
    steps_per_epoch = math.ceil(epoch_sizes[0] / cfg.training.gradient_accumulation_steps)
    run.scheduler = make_scheduler(optimizer, cfg, total_steps)

    growth = dict(parse_schedule(cfg.training.progressive, cfg.lora.r)) if cfg.training.progressive else {}
    if growth and (acc.num_processes > 1 or cfg.training.method != "lora" or cfg.lora.backend != "peft"):
        raise ConfigError("training.progressive: needs one process, training.method=lora and lora.backend=peft")
    step, epoch, index = 0, 0, 0
    if resume_from is not None:
        step, epoch, index = resume(run, resume_from, growth)
        params = [p for p in model.parameters() if p.requires_grad]  # growth replaced some
        acc.print(f"[train] resumed from {resume_from} at step {step}")

    distiller = None
    if cfg.training.distill_teacher:
        distiller = make_distiller(run, tokenizer, output_dir, total_steps - step, epoch, index)

    tokens_total = sum(len(s["input_ids"]) for s in train_set)
    tokens_sup = sum(sum(l != IGNORE_INDEX for l in s["labels"]) for s in train_set)
    eta = estimate_seconds(run, total_steps - step)
    acc.print(f"[train] method={cfg.training.method} model={cfg.model.name} device={acc.device} "
              f"processes={acc.num_processes} mixed_precision={acc.mixed_precision}")
    acc.print(f"[train] trainable params: {trainable_n:,} / {total_n:,} ({100 * trainable_n / total_n:.4f}%)")
    acc.print(f"[train] data: {len(train_set)} train samples ({dropped} dropped: prompt > max_length), "
              f"{tokens_total:,} tokens, {tokens_sup:,} supervised; {len(val_set)} val samples")
    acc.print(f"[train] steps: {total_steps} ({steps_per_epoch}/epoch, batch {cfg.training.batch_size} x "
              f"{acc.num_processes} processes x {cfg.training.gradient_accumulation_steps} accumulation), "
              f"estimated time {eta / 60:.1f} min")

    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    tracker = Tracker(output_dir, cfg.training.report_to, cfg.to_dict(),
                      step if resume_from is not None else None, acc.is_main_process)
    stream = step_windows(run, epoch, index)
    stop = StopFlag()
    model.train()
    started, window_start = time.perf_counter(), time.perf_counter()
    seen_tokens = seen_sup = window_tokens = window_sup = 0
    other_seconds = 0.0
    last_loss = last_eval = float("nan")
    start_step = step
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not acc.is_main_process)
    try:
        while step < total_steps:
            micro = next(stream)
            batches = [collate(run, mine) for _, _, mine in micro]
            sample_ids = [mine for _, _, mine in micro]
            n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            n_step = int(acc.reduce(torch.tensor(n_local, device=acc.device), reduction="sum"))
            loss_total = torch.zeros((), device=acc.device)
            for k, batch in enumerate(batches):
                sync = k == len(batches) - 1
                with (nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    if distiller:
                        loss_sum, _ = distiller.loss(model, batch, sample_ids[k])
                    else:
                        loss_sum, _ = compute_loss(model, batch, cfg.training.supervised_logits)
                # DDP averages gradients over processes: multiply back so the result is
                # the mean over all supervised tokens of the step.
                acc.backward(loss_sum * acc.num_processes / max(n_step, 1))
                loss_total += loss_sum.detach()
            loss = float(acc.reduce(loss_total, reduction="sum")) / max(n_step, 1)
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {step + 1}: lower training.learning_rate "
                                    f"(now {cfg.training.learning_rate}) or check the data; last good "
                                    f"checkpoint: {list_checkpoints(output_dir / 'checkpoints')[-1:] or 'none'}")
            max_norm = cfg.training.max_grad_norm or float("inf")
            grad_norm = acc.clip_grad_norm_(params, max_norm)  # None under DeepSpeed when the engine has none
            lr = run.scheduler.get_last_lr()[0]
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss
            if step in growth:
                grow_lora(acc.unwrap_model(model), raw_optimizer(optimizer), growth[step])
                params = [p for p in model.parameters() if p.requires_grad]
                acc.print(f"\n[train] step {step}: LoRA rank grown to r={growth[step]}")
            epoch, index = micro[-1][0], micro[-1][1] + 1
            tokens = sum(real_tokens(run, mine) for mine in sample_ids)
            tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum"))
            seen_tokens, seen_sup = seen_tokens + tokens, seen_sup + n_step
            window_tokens, window_sup = window_tokens + tokens, window_sup + n_step
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % cfg.training.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                size = epoch_sizes[min(epoch, len(epoch_sizes) - 1)]
                row = {"step": step, "epoch": round(epoch + index / max(1, size), 3), "loss": loss,
                       "learning_rate": lr, "tokens_per_s": window_tokens / elapsed,
                       "supervised_tokens_per_s": window_sup / elapsed}
                tracker.log(row if grad_norm is None else {**row, "grad_norm": float(grad_norm)})  # None: missing
                window_start, window_tokens, window_sup = time.perf_counter(), 0, 0
            paused = time.perf_counter()  # evaluation and saving are not training time
            if val_set and (step % cfg.training.eval_steps == 0 or step == total_steps):
                last_eval = evaluate_loss(run, val_set)
                tracker.log({"step": step, "eval_loss": last_eval})
            if step % cfg.training.save_steps == 0 or stop.requested:
                save_state(run, output_dir, step, epoch, index)
            paused = time.perf_counter() - paused
            other_seconds += paused
            window_start += paused
            if stop.requested:
                raise TrainingError(f"interrupted at step {step}; checkpoint saved. Resume with: "
                                    f"training.resume=true output.dir={cfg.output.dir}")
    finally:
        stop.restore()
        bar.close()
        tracker.close()
    wall = time.perf_counter() - started
    train_seconds = wall - other_seconds
    acc.wait_for_everyone()
    trainable_n = count_parameters(model)[0]  # progressive growth changes it
    return finish(run, tokenizer, output_dir, {
        "method": cfg.training.method, "model": cfg.model.name, "trainable_params": trainable_n,
        "total_params": total_n, "trainable_percent": 100 * trainable_n / total_n, "steps": step,
        "train_samples": len(train_set), "processes": acc.num_processes, "final_loss": last_loss,
        "final_eval_loss": last_eval, "wall_seconds": wall, "eval_and_save_seconds": other_seconds,
        "seconds_per_step": train_seconds / max(1, step - start_step),
        "tokens_per_s": seen_tokens / train_seconds, "supervised_tokens_per_s": seen_sup / train_seconds,
        "mixed_precision": acc.mixed_precision, "device": str(acc.device)})


def save_state(run: Run, output_dir: Path, step: int, epoch: int, next_index: int) -> None:
    rng_states = gather_object([rng_state()])  # one per process, by rank: each drew its own dropout masks
    if run.acc.is_main_process:
        save_checkpoint(output_dir / "checkpoints" / f"checkpoint-{step}",
                        trainable_state(run.acc.unwrap_model(run.model)), raw_optimizer(run.optimizer),
                        run.scheduler, {"step": step, "epoch": epoch, "next_index": next_index,
                                        "batch_stream": run.stream_settings}, rng_states)
    run.acc.wait_for_everyone()


def finish(run: Run, tokenizer, output_dir: Path, summary: dict) -> dict:
    """Save the adapter / model, print and write the summary."""
    acc = run.acc
    # One fingerprint per process: data-parallel replicas must end bit-identical.
    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(acc.unwrap_model(run.model)).items()):
        digest.update(name.encode() + tensor.float().cpu().numpy().tobytes())
    summary["replica_fingerprints"] = gather_object([digest.hexdigest()[:16]])
    if acc.is_main_process:
        model = acc.unwrap_model(run.model)
        saved = save_trained(model, tokenizer, run.cfg, resolve_model_path(run.cfg.model.name), output_dir)
        weights = [p for p in saved if p.suffix == ".safetensors"]
        summary["adapter_size_mb" if run.cfg.training.method == "lora" else "model_size_mb"] = round(
            sum(p.stat().st_size for p in weights) / 2**20, 3)
        if acc.device.type == "cuda":
            summary["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            summary["peak_memory_kind"] = "cuda max_memory_allocated"
        else:
            summary["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            summary["peak_memory_kind"] = "process peak RSS"
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        print(f"[train] done in {summary['wall_seconds']:.1f} s ({summary['eval_and_save_seconds']:.1f} s of it "
              f"evaluating and saving), {summary['seconds_per_step']:.2f} s/step, "
              f"{summary['supervised_tokens_per_s']:.0f} supervised tokens/s "
              f"({summary['tokens_per_s']:.0f} total), peak memory {summary['peak_memory_mb']:.0f} MB "
              f"({summary['peak_memory_kind']})")
        size_key = "adapter_size_mb" if "adapter_size_mb" in summary else "model_size_mb"
        print(f"[train] final loss {summary['final_loss']:.4f}, eval loss {summary['final_eval_loss']:.4f}; "
              f"{size_key.replace('_mb', '')} {summary[size_key]} MB -> {output_dir}/")
    acc.wait_for_everyone()
    return summary
