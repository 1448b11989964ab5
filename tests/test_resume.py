"""Exact resume beyond one CPU process, and DeepSpeed's gradient accumulation (issue 15, faults 3 and 4).

- estimate_seconds' two dropout passes leave every random generator as they found it
  (the CUDA one is mocked: these tests run on a CPU);
- each process saves and restores its own random state;
- a checkpoint whose trainable weights do not match the model is refused, naming the keys;
- a resume that would change the batch stream is refused, naming the setting and both values;
- DeepSpeed with gradient accumulation > 1 is refused; a grad norm DeepSpeed does not report
  is logged as missing.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.train import train

REPO = Path(__file__).resolve().parents[1]


def run(tiny_model_dir, tiny_data_dir, out, *extra):
    return train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, out, *extra)))


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_history.jsonl").read_text().splitlines()]


def test_estimate_seconds_leaves_the_cuda_random_state_as_it_found_it(monkeypatch):
    """On a GPU, dropout draws from the CUDA generator; a resumed run must find it as the
    checkpoint left it. The CUDA generator is a counter here, advanced once per forward pass."""
    import zhlora.train as zt

    cuda = {"state": 7}
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.tensor([cuda["state"]], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": cuda.update(state=int(state[0])))
    model = torch.nn.Linear(2, 1)

    def forward_with_dropout(_model, batch, supervised_logits, fused_cross_entropy):
        cuda["state"] += 1
        return torch.nn.functional.dropout(model(torch.ones(1, 2)), 0.5).sum(), 1

    monkeypatch.setattr(zt, "compute_loss", forward_with_dropout)
    monkeypatch.setattr(zt, "collate", lambda run, mine: {})
    from accelerate.utils import DistributedType

    acc = SimpleNamespace(device=torch.device("cuda", 0), num_processes=1, process_index=0, autocast=nullcontext,
                          backward=lambda loss: loss.backward(), distributed_type=DistributedType.NO)
    training = SimpleNamespace(batch_size=1, seed=0, group_by_length=False, packing=False, supervised_logits=True,
                               fused_cross_entropy=True,
                               gradient_accumulation_steps=1)
    fake_run = SimpleNamespace(cfg=SimpleNamespace(training=training), acc=acc, model=model,
                               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train=[{"input_ids": [1]}])
    cpu_before = torch.get_rng_state()
    zt.estimate_seconds(fake_run, 10)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert cuda["state"] == 7


def tiny_optimizer():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_each_process_resumes_its_own_random_state(tmp_path):
    """Two processes draw different dropout masks (different batches); rank 1 must not resume
    with rank 0's generator."""
    from zhlora.training.checkpoint import load_checkpoint, rng_state, save_checkpoint

    states = []
    for rank in range(2):  # what save_state gathers from each process
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        states.append(rng_state())
    optimizer, scheduler = tiny_optimizer()
    folder = save_checkpoint(tmp_path / "checkpoint-1", {"w": torch.zeros(1)}, optimizer, scheduler,
                             {"step": 1}, states)
    for rank in (1, 0):
        torch.manual_seed(0)
        random.seed(0)
        load_checkpoint(folder, optimizer, scheduler, rank)
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"]), rank
        assert random.getstate() == states[rank]["python"], rank


@pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun needs a POSIX system")
def test_torchrun_two_processes_resume_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    """Two processes with dropout: resuming from step 3 ends with the uninterrupted adapter
    (before each process kept its own RNG state, rank 1 resumed with rank 0's: max diff 0.01)."""
    common = ("training.max_steps=6", "training.save_steps=3", "lora.lora_dropout=0.1")

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
               str(REPO / "training" / "train.py"),
               *tiny_overrides(tiny_model_dir, tiny_data_dir, out, *common, *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(full)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    torchrun(resumed, "training.resume=true")
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A 2-step run with its checkpoint, trained on its own copy of the train file."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copy(tiny_data_dir / "train.json", root / "train.json")
    run(tiny_model_dir, tiny_data_dir, root / "out", "training.max_steps=2", "training.save_steps=2",
        f"data.train_file={root / 'train.json'}")
    return root


def resume_copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    return out


def test_resume_refuses_missing_or_unexpected_trainable_weights(finished, tiny_model_dir, tiny_data_dir, tmp_path):
    out = resume_copy(finished, tmp_path)
    file = out / "checkpoints" / "checkpoint-2" / "trainable.safetensors"
    tensors = load_file(file)
    dropped = sorted(tensors)[0]
    tensors["base_model.model.lm_head.lora_A.default.weight"] = tensors.pop(dropped)
    save_file(tensors, file)
    with pytest.raises(ConfigError, match="missing: " + dropped.replace(".", r"\.") + r".*\n.*unexpected: "
                                          r"base_model\.model\.lm_head\.lora_A\.default\.weight"):
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=4", "training.resume=true",
            f"data.train_file={finished / 'train.json'}")


def drop_a_row(source: Path, target: Path) -> Path:
    rows = json.loads(source.read_text(encoding="utf-8"))
    target.write_text(json.dumps(rows[1:], ensure_ascii=False), encoding="utf-8")
    return target


@pytest.mark.parametrize("setting, change, message", [
    ("accumulation", "training.gradient_accumulation_steps=2", "training.gradient_accumulation_steps: "
     "the checkpoint was trained with 1, this run asks 2"),
    ("packing", "training.packing=true", "training.packing: the checkpoint was trained with False, this run asks True"),
    ("max_length", "data.max_length=256", "data.max_length: the checkpoint was trained with 512, this run asks 256"),
    ("content", None, "data.train_file sha256: the checkpoint was trained with '[0-9a-f]{64}', this run asks "
     "'[0-9a-f]{64}'"),
    ("processes", None, "processes: the checkpoint was trained with 2, this run asks 1"),
], ids=["accumulation", "packing", "max_length", "content", "processes"])
def test_resume_refuses_a_changed_batch_stream(finished, tiny_model_dir, tiny_data_dir, tmp_path,
                                               setting, change, message):
    out = resume_copy(finished, tmp_path)
    train_file = finished / "train.json"
    if setting == "content":  # one row fewer: the content counts, not the name
        train_file = drop_a_row(train_file, tmp_path / "train.json")
    if setting == "processes":  # a one-process test stands for a checkpoint written by two processes
        state_file = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["batch_stream"]["processes"] = 2
        state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=message + "; resume needs the same value"):
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=4", "training.resume=true",
            f"data.train_file={train_file}", *([change] if change else []))


def test_resume_with_the_same_settings_and_a_moved_train_file_is_accepted(finished, tiny_model_dir, tiny_data_dir,
                                                                           tmp_path):
    out = resume_copy(finished, tmp_path)
    moved = shutil.copy(finished / "train.json", tmp_path / "moved.json")
    summary = run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=4", "training.resume=true",
                  f"data.train_file={moved}")
    assert summary["steps"] == 4


def fake_deepspeed(monkeypatch) -> None:
    """accelerate's Accelerator reporting DeepSpeed (deepspeed itself is not installed here)."""
    import accelerate
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator(accelerate.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.DEEPSPEED

    monkeypatch.setattr(accelerate, "Accelerator", DeepSpeedAccelerator)


def test_deepspeed_with_gradient_accumulation_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    fake_deepspeed(monkeypatch)
    with pytest.raises(ConfigError, match="training.gradient_accumulation_steps=4: DeepSpeed"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=2",
            "training.gradient_accumulation_steps=4")


def test_a_grad_norm_that_is_not_reported_is_logged_as_missing(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """accelerate's clip_grad_norm_ returns None under DeepSpeed when the engine has no norm."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", lambda self, params, max_norm: None)
    out = tmp_path / "out"
    summary = run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=2")
    assert summary["steps"] == 2
    rows = [row for row in history(out) if "loss" in row]
    assert len(rows) == 2 and not any("grad_norm" in row for row in rows)
