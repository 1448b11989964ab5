"""第三步: LoRA (or full) fine-tuning, one readable loop.

    python training/train.py [--config configs/default.yaml] [key=value ...]
    torchrun --nproc_per_node=2 training/train.py ...      # data-parallel (gloo on CPU)

The loop is ours (not HF Trainer) so that what it optimises stays visible
(`compute_loss`), and so resume is exact: the batch order of each epoch is a pure
function of the seed, and a checkpoint stores weights, optimizer, scheduler, RNG
and the position in the epoch. accelerate handles devices, mixed precision and
DDP / DeepSpeed, so the same command runs on a laptop CPU or many GPUs.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zhlora.adapter import apply_lora, count_parameters, save_trained, trainable_state
from zhlora.batching import collate_packed, collate_padded, epoch_batches, pack_samples
from zhlora.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from zhlora.config import Config, ConfigError, save_config
from zhlora.distill import Distiller
from zhlora.formatting import IGNORE_INDEX
from zhlora.models import answer_logits, load_model, resolve_model_path
from zhlora.progressive import grow_lora, parse_schedule
from zhlora.tracking import Tracker, check_report_to
from zhlora.train_setup import Run, check_output_dir, load_split, make_accelerator, resume_point


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
    """Time one forward+backward on a typical batch; RNG restored so results don't change."""
    rng = torch.get_rng_state()
    mine = next(batch_stream(run, 0, 0))[2]
    batch = collate(run, mine)
    for _ in range(2):  # the first pass pays one-time costs (allocation, kernel choice): time the second
        start = time.perf_counter()
        with run.acc.autocast():
            loss_sum, n = compute_loss(run.model, batch, run.cfg.training.supervised_logits)
        run.acc.backward(loss_sum / max(n, 1))
        seconds = time.perf_counter() - start
        run.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return seconds * steps * run.cfg.training.gradient_accumulation_steps


def make_distiller(run: Run, tokenizer, output_dir: Path, steps_left: int, epoch: int, index: int) -> Distiller:
    """The teacher's cache covers exactly the rows the remaining steps will draw."""
    stream = batch_stream(run, epoch, index)
    needed = {i for _ in range(steps_left * run.cfg.training.gradient_accumulation_steps)
              for i in next(stream)[2]}
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
    resume_from = resume_point(cfg, output_dir)
    if acc.is_main_process:
        check_output_dir(cfg, output_dir, resuming=resume_from is not None)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.training.seed)
    if acc.is_main_process:
        resolve_model_path(cfg.model.name)  # converts the embedded model once, before others read it
    acc.wait_for_everyone()
    model, tokenizer = load_model(cfg.model, acc.device)
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
    run = Run(cfg, acc, model, optimizer, None, train_set, tokenizer.pad_token_id)

    n_batches = batches_per_epoch(run)
    steps_per_epoch = math.ceil(n_batches / cfg.training.gradient_accumulation_steps)
    total_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else math.ceil(
        steps_per_epoch * cfg.training.num_epochs)
    warmup = int(total_steps * cfg.training.warmup_ratio)
    # Linear warmup, then linear decay to 0 (the HF default schedule).
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / max(1, warmup), max(0.0, (total_steps - s) / max(1, total_steps - warmup))))

    growth = dict(parse_schedule(cfg.training.progressive, cfg.lora.r)) if cfg.training.progressive else {}
    if growth and (acc.num_processes > 1 or cfg.training.method != "lora" or cfg.lora.backend != "peft"):
        raise ConfigError("training.progressive: needs one process, training.method=lora and lora.backend=peft")
    step, epoch, index = 0, 0, 0
    if resume_from is not None:
        done = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        for at, r in growth.items():  # the checkpoint holds the grown shapes
            if at <= done:
                grow_lora(acc.unwrap_model(model), raw_optimizer(optimizer), r)
        params = [p for p in model.parameters() if p.requires_grad]
        tensors, state = load_checkpoint(resume_from, optimizer, run.scheduler)
        acc.unwrap_model(model).load_state_dict(tensors, strict=False)
        step, epoch, index = state["step"], state["epoch"], state["next_index"]
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
    stream = batch_stream(run, epoch, index)
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
            micro = [next(stream) for _ in range(cfg.training.gradient_accumulation_steps)]
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
            grad_norm = float(acc.clip_grad_norm_(params, max_norm))
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
                tracker.log({"step": step, "epoch": round(epoch + index / max(1, n_batches), 3), "loss": loss,
                             "learning_rate": lr, "grad_norm": grad_norm,
                             "tokens_per_s": window_tokens / elapsed, "supervised_tokens_per_s": window_sup / elapsed})
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


def batches_per_epoch(run: Run) -> int:
    """Micro-batches this process runs in one epoch (epoch 0; every epoch has as many)."""
    count = 0
    for epoch, _, _ in batch_stream(run, 0, 0):
        if epoch > 0:
            return count
        count += 1
    return count


def raw_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_state(run: Run, output_dir: Path, step: int, epoch: int, next_index: int) -> None:
    if run.acc.is_main_process:
        save_checkpoint(output_dir / "checkpoints" / f"checkpoint-{step}",
                        trainable_state(run.acc.unwrap_model(run.model)), raw_optimizer(run.optimizer),
                        run.scheduler, {"step": step, "epoch": epoch, "next_index": next_index})
    run.acc.wait_for_everyone()


def finish(run: Run, tokenizer, output_dir: Path, summary: dict) -> dict:
    """Save the adapter / model, print and write the summary."""
    acc = run.acc
    # One fingerprint per process: data-parallel replicas must end bit-identical.
    from accelerate.utils import gather_object

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
