"""Batches that waste little compute on padding, in an order a resumed run can replay.

Three ways to batch encoded samples ({"input_ids", "labels"}):
  - dynamic padding: each batch is padded only to its own longest sample;
  - length grouping (training.group_by_length, default): samples of similar length
    share a batch (sorted inside chunks of 50 batches, then the batches shuffled),
    so little padding is computed (the idea of HF's LengthGroupedSampler);
  - packing (training.packing): samples are concatenated into rows of max_length
    tokens with position ids restarting at 0 for each sample and no attention mask.
    transformers then builds a block-diagonal causal mask from the position ids, so
    a sample never attends to its neighbours, and no padding is computed at all.

The batch order of an epoch is a pure function of (seed, epoch): resume replays it
and skips the batches already done. step_windows cuts that stream into the micro-batches
of each optimizer step, as the training loop draws them.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import TYPE_CHECKING

import torch

from zhlora.formatting import IGNORE_INDEX

if TYPE_CHECKING:
    from zhlora.training.setup import Run

MEGABATCH = 50  # batches per chunk sorted by length: larger = less padding, less randomness


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index lists, one per (global) batch, for one epoch."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        chunk = batch_size * MEGABATCH
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)  # otherwise every chunk would start with its longest batch
    return batches


def pack_samples(samples: list[dict], order: list[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit packing: groups of sample indices whose total length <= max_length."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def collate_padded(samples: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest sample; padding gets attention 0 and label -100."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict:
    """Each row is several samples end to end; position ids restart per sample.

    Labels are shifted inside each sample by the loss (token t predicts t+1), and
    the first token of a sample has no predecessor, so the last token of one sample
    never learns to predict the first token of the next: the label of a sample's
    first token is set to -100 (it is always a prompt token anyway, except with
    train_on_prompt, where it can have no target in the unpacked run either).
    """
    width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s["input_ids"])
            ids[r, start:start + n] = torch.tensor(s["input_ids"])
            labels[r, start:start + n] = torch.tensor(s["labels"])
            labels[r, start] = IGNORE_INDEX
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # padding forms its own sequence
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


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


def collate(run: Run, mine) -> dict:
    """The tensors of this process's part of a batch (sample indices, or packed rows of them), on its device."""
    if run.cfg.training.packing:
        batch = collate_packed([[run.train[i] for i in row] for row in mine], run.pad_id)
    else:
        batch = collate_padded([run.train[i] for i in mine], run.pad_id)
    return {k: v.to(run.acc.device) for k, v in batch.items()}


def real_tokens(run: Run, mine) -> int:
    """Tokens of the samples in a batch: never the padding (a packed row's tail included)."""
    ids = [i for row in mine for i in row] if run.cfg.training.packing else mine
    return sum(len(run.train[i]["input_ids"]) for i in ids)
