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
and skips the batches already done.
"""
from __future__ import annotations

import random

import torch

from zhlora.formatting import IGNORE_INDEX

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
