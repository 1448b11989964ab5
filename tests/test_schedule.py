"""The learning-rate schedule is HF's, and num_epochs means that many passes over the data
(issue 15, fault 5)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from zhlora.config import load_config
from zhlora.train import train


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_history.jsonl").read_text().splitlines()]


def hf_learning_rates(lr: float, warmup: int, total: int) -> list[float]:
    """The lr each optimizer step uses under transformers' default linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


# HF's TrainingArguments.get_warmup_steps rounds up: ceil(15 * 0.1) = 2, ceil(10 * 0.1) = 1.
@pytest.mark.parametrize("steps, warmup", [(15, 2), (10, 1)])
def test_learning_rate_of_every_step_is_hf_linear_schedule_with_warmup(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                       steps, warmup):
    out = tmp_path / "out"
    train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, out, f"training.max_steps={steps}",
                                           "training.warmup_ratio=0.1", "training.eval_steps=1000")))
    logged = [row["learning_rate"] for row in history(out) if "loss" in row]
    expected = hf_learning_rates(1e-2, warmup, steps)
    assert expected[0] == 0.0 and expected[warmup] == 1e-2  # from 0, the peak once, then down
    assert logged == pytest.approx(expected, rel=1e-12, abs=0), list(zip(logged, expected))


@pytest.mark.parametrize("packing", [False, True])
def test_num_epochs_trains_exactly_that_many_epochs(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, packing):
    """10 batches of 2, accumulation 4, 3 epochs: 3 steps of 4 + 4 + 2 batches per epoch,
    30 batches in all, every sample seen exactly 3 times (HF: a step never crosses an epoch)."""
    import zhlora.train as zt

    rows = json.loads((tiny_data_dir / "train.json").read_text(encoding="utf-8"))[:20]
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    drawn = []
    real_collate = zt.collate

    def counting_collate(run, mine):
        drawn.append([i for row in mine for i in row] if packing else list(mine))
        return real_collate(run, mine)

    monkeypatch.setattr(zt, "collate", counting_collate)
    monkeypatch.setattr(zt, "estimate_seconds", lambda run, steps: 0.0)  # draws no batch of the run
    out = tmp_path / "out"
    summary = train(load_config(None, tiny_overrides(
        tiny_model_dir, tiny_data_dir, out, f"data.train_file={train_file}", "training.batch_size=2",
        "training.gradient_accumulation_steps=4", "training.num_epochs=3", f"training.packing={packing}",
        "training.eval_steps=1000")))
    assert Counter(i for batch in drawn for i in batch) == {i: 3 for i in range(20)}
    assert [row["epoch"] for row in history(out) if "loss" in row][-1] == 3.0
    if not packing:
        assert len(drawn) == 30 and summary["steps"] == 9
