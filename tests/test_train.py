"""Training smoke runs on the tiny model: loss falls, adapters reload, resume is exact,
packing is lossless, full fine-tuning and the hand-written LoRA train, DDP stays in sync."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.train import TrainingError, train
from zhlora.training.compiling import cpp_compiler

REPO = Path(__file__).resolve().parents[1]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_history.jsonl").read_text().splitlines()]


def run(tiny_model_dir, tiny_data_dir, out, *extra):
    return train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, out, *extra)))


def tiny_logits(model, tokenizer):
    ids = torch.tensor([tokenizer("把1234写成中文数字", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loss_falls_and_adapter_reloads_with_plain_peft(tiny_model_dir, tiny_data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhlora.adapter import apply_lora

    out = tmp_path / "out"
    summary = run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=40", "training.save_steps=40",
                  "lora.target_modules=all-linear")
    losses = [row["loss"] for row in history(out) if "loss" in row]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert summary["trainable_params"] > 0 and summary["adapter_size_mb"] > 0
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(history(out)[0])
    assert any("eval_loss" in row for row in history(out))

    tokenizer = AutoTokenizer.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    # The same weights, put back by our own code from the last checkpoint.
    cfg = load_config(out / "config.yaml")
    ours = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg).eval()
    ours.load_state_dict(load_file(out / "checkpoints" / "checkpoint-40" / "trainable.safetensors"), strict=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert torch.equal(tiny_logits(peft_model, tokenizer), tiny_logits(ours, tokenizer))
    assert not torch.allclose(tiny_logits(peft_model, tokenizer), tiny_logits(base, tokenizer))


@pytest.mark.parametrize("fast_dropout", [False, True])
def test_resume_equals_uninterrupted_run(tiny_model_dir, tiny_data_dir, tmp_path, fast_dropout):
    """Tolerance: bit-identical on CPU (we assert max |diff| <= 1e-6). With training.fast_dropout the
    masks come from the same global generator, whose state the checkpoint restores."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("training.max_steps=20", "training.save_steps=10", "lora.lora_dropout=0.1",
              "training.gradient_accumulation_steps=2", f"training.fast_dropout={str(fast_dropout).lower()}")
    run(tiny_model_dir, tiny_data_dir, full, *common)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-10", resumed / "checkpoints" / "checkpoint-10")
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    run(tiny_model_dir, tiny_data_dir, resumed, *common, "training.resume=true")
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["step"] for r in history(resumed) if "loss" in r] == list(range(11, 21))


def test_resume_refuses_a_changed_config(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=4", "training.save_steps=2")
    with pytest.raises(ConfigError, match="lora.r: the checkpoint was trained with 16"):
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=4", "training.resume=true", "lora.r=8")


def test_refuses_to_overwrite_a_finished_run(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=2")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=2")
    run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=2", "output.overwrite=true")


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import zhlora.train as zt

    real = zt.compute_loss

    def nan_loss(model, batch, *args):
        loss_sum, n = real(model, batch, *args)
        return loss_sum * float("nan"), n

    monkeypatch.setattr(zt, "compute_loss", nan_loss)
    with pytest.raises(TrainingError, match="loss is nan at step 1: lower training.learning_rate"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=3")


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM

    from zhlora.training.batching import collate_packed, collate_padded
    from zhlora.models import load_tokenizer
    from zhlora.loss import compute_loss
    from zhlora.training.setup import load_split

    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    samples = load_split(str(tiny_data_dir / "train.json"), tokenizer, cfg)[0][:6]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        parts = [compute_loss(model, collate_padded([s], tokenizer.pad_token_id)) for s in samples]
        padded = compute_loss(model, collate_padded(samples, tokenizer.pad_token_id))
        packed = compute_loss(model, collate_packed([samples[:3], samples[3:]], tokenizer.pad_token_id))
    one_by_one = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert packed[1] == padded[1] == sum(p[1] for p in parts)
    assert torch.allclose(packed[0] / packed[1], one_by_one, atol=1e-5)
    assert torch.allclose(padded[0] / padded[1], one_by_one, atol=1e-5)



@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_supervised_and_fused_losses_give_the_same_loss_and_gradients(tiny_model_dir, tiny_data_dir, packed, method,
                                                                       monkeypatch):
    """training.supervised_logits only skips the output layer where nothing is trained, and
    training.fused_cross_entropy only cuts the logits into chunks (7 tokens here, so a batch spans
    several): the same loss and the same gradients, the output layer's own included when it trains."""
    import zhlora.loss
    from zhlora.adapter import apply_lora
    from zhlora.training.batching import collate_packed, collate_padded
    from zhlora.models import load_model, load_tokenizer
    from zhlora.loss import compute_loss, fusable_head
    from zhlora.training.setup import load_split

    monkeypatch.setattr(zhlora.loss, "LOSS_CHUNK", 7)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "lora.lora_dropout=0"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    samples = load_split(str(tiny_data_dir / "train.json"), tokenizer, cfg)[0][:6]
    batch = (collate_packed([samples[:3], samples[3:]], tokenizer.pad_token_id) if packed
             else collate_padded(samples, tokenizer.pad_token_id))
    model, _ = load_model(cfg.model)
    model = apply_lora(model, cfg) if method == "lora" else model
    assert fusable_head(model) is not None
    assert fusable_head(model).weight.requires_grad == (method == "full")
    results = []
    for supervised_logits, fused in ((False, False), (True, False), (True, True)):
        model.zero_grad()
        loss, n = compute_loss(model, batch, supervised_logits, fused)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    full, n_full, g_full = results[0]
    for part, n_part, g_part in results[1:]:
        assert n_full == n_part > 0
        assert torch.allclose(full, part, rtol=1e-5)
        assert g_full.keys() == g_part.keys()
        # fp32 sums in another order (chunks): equal to about 1e-6 of each gradient's own scale
        bad = {k: (g_full[k] - g_part[k]).abs().max().item() / g_full[k].abs().max().item() for k in g_full
               if (g_full[k] - g_part[k]).abs().max() > 1e-5 * g_full[k].abs().max()}
        assert not bad, bad


def test_the_fused_loss_under_bf16_autocast_matches_the_plain_one(tiny_model_dir, tiny_data_dir, monkeypatch):
    """With bf16 matmuls (autocast, as CPU training runs) both paths round the same products: the
    loss and the LoRA gradients agree to bf16's precision, and nothing comes back NaN."""
    import zhlora.loss
    from zhlora.adapter import apply_lora
    from zhlora.training.batching import collate_padded
    from zhlora.models import load_model, load_tokenizer
    from zhlora.loss import compute_loss
    from zhlora.training.setup import load_split

    monkeypatch.setattr(zhlora.loss, "LOSS_CHUNK", 5)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "lora.lora_dropout=0"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = collate_padded(load_split(str(tiny_data_dir / "train.json"), tokenizer, cfg)[0][:4], tokenizer.pad_token_id)
    model = apply_lora(load_model(cfg.model)[0], cfg)
    results = []
    for fused in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = compute_loss(model, batch, True, fused)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}))
    (plain, g_plain), (fused, g_fused) = results
    assert torch.isfinite(fused) and torch.allclose(plain, fused, rtol=1e-2)
    for k in g_plain:
        assert torch.isfinite(g_fused[k]).all()
        scale = g_plain[k].abs().max().item() or 1.0
        assert (g_plain[k] - g_fused[k]).abs().max().item() <= 0.05 * scale, k


def test_packed_training_runs(tiny_model_dir, tiny_data_dir, tmp_path):
    summary = run(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=5", "training.packing=true")
    assert summary["steps"] == 5 and summary["final_loss"] > 0


def test_full_fine_tuning_saves_a_model(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary = run(tiny_model_dir, tiny_data_dir, out, "training.method=full", "training.max_steps=10",
                  "training.learning_rate=1e-3")
    assert summary["trainable_params"] == summary["total_params"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_scratch_lora_backend_trains_and_saves_peft_format(tiny_model_dir, tiny_data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run(tiny_model_dir, tiny_data_dir, out, "lora.backend=scratch", "training.max_steps=20")
    losses = [row["loss"] for row in history(out) if "loss" in row]
    assert sum(losses[-5:]) < sum(losses[:5])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def _cli(tiny_model_dir, tiny_data_dir, out, *extra):
    return [sys.executable, str(REPO / "training" / "train.py"),
            *tiny_overrides(tiny_model_dir, tiny_data_dir, out, *extra)]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = _cli(tiny_model_dir, tiny_data_dir, out, "training.max_steps=300", "training.save_steps=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "training_history.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output
    assert "checkpoint saved. Resume with: training.resume=true" in output
    (checkpoint,) = (out / "checkpoints").glob("checkpoint-*")
    assert not (out / "adapter_config.json").exists()  # no adapter until a run finishes
    assert int(checkpoint.name.split("-")[1]) < 300
    done = subprocess.run(cmd + ["training.resume=true"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [row["step"] for row in history(out) if "loss" in row]
    assert steps == list(range(1, 301))
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun needs a POSIX system")
def test_torchrun_two_processes_end_identical(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(REPO / "training" / "train.py"),
           *tiny_overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=6")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2
    fingerprints = summary["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]


def test_real_tokens_never_counts_padding():
    from types import SimpleNamespace

    from zhlora.training.batching import real_tokens

    train = [{"input_ids": [1] * n} for n in (5, 3, 7)]
    padded = SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(packing=False)), train=train)
    packed = SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(packing=True)), train=train)
    assert real_tokens(padded, [0, 2]) == 12  # a padded batch of 2 x 7 holds 12 real tokens
    assert real_tokens(packed, [[0, 1], [2]]) == 15  # packed rows of width 8: the tails are padding


@pytest.mark.skipif(not cpp_compiler(), reason="torch.compile (inductor) on a CPU needs a C++ compiler")
def test_torch_compile_gives_the_same_losses_and_a_plain_peft_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    """training.torch_compile compiles each decoder layer in place: the losses are the eager ones
    to rounding, and the adapter keeps PEFT's key names (no `_orig_mod.`). Dropout 0: compiled
    dropout draws its masks from inductor's own generator, so with dropout the runs differ by
    their draws, not by their arithmetic."""
    from zhlora.training.compiling import decoder_layers

    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=6", "training.logging_steps=1",
            "lora.lora_dropout=0", f"training.torch_compile={str(compiled).lower()}")
        losses[compiled] = [row["loss"] for row in history(out) if "loss" in row]
    assert len(losses[True]) == len(losses[False]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses
    assert load_file(tmp_path / "compiled_True" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "compiled_False" / "adapter_model.safetensors").keys()

    from transformers import AutoModelForCausalLM

    assert len(decoder_layers(AutoModelForCausalLM.from_pretrained(tiny_model_dir))) >= 2


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_losses(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                       monkeypatch):
    """training.gradient_checkpointing (the low-memory setting) reaches every decoder layer, and
    recomputing a layer in the backward pass replays its dropout masks: same losses as without."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    plain = modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return plain(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counted)
    losses = {}
    for checkpointed in (False, True):
        out = tmp_path / f"checkpointed_{checkpointed}"
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=3", "lora.lora_dropout=0.3",
            f"training.gradient_checkpointing={str(checkpointed).lower()}")
        losses[checkpointed] = [row["loss"] for row in history(out) if "loss" in row]
        if not checkpointed:
            assert calls == []
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    assert calls == [False] * (3 * layers)  # non-reentrant, once per layer and step (not while evaluating)
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5), losses


def test_fast_dropout_draws_other_masks_than_nn_dropout(tiny_model_dir, tiny_data_dir, tmp_path):
    """The switch reaches the training model: same seed, other masks, so other losses from the
    second step on (lora_B starts at 0, so the first step's loss does not see the masks; its
    gradient does); without dropout the switch changes nothing."""
    losses = {}
    for fast, p in ((False, 0.3), (True, 0.3), (False, 0.0), (True, 0.0)):
        out = tmp_path / f"fast_{fast}_{p}"
        run(tiny_model_dir, tiny_data_dir, out, "training.max_steps=3", "training.logging_steps=1",
            f"lora.lora_dropout={p}", f"training.fast_dropout={str(fast).lower()}")
        losses[fast, p] = [row["loss"] for row in history(out) if "loss" in row]
    assert losses[True, 0.3][0] == losses[False, 0.3][0] and losses[True, 0.3][1:] != losses[False, 0.3][1:]
    assert losses[True, 0.0] == losses[False, 0.0]
