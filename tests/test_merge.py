"""Merging an adapter into its base gives the adapter's logits; adapters mix by weight."""
import json

import pytest
import torch

from zhlora.cli import main as zhlora


def test_merged_model_equals_adapter(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert zhlora(["merge", "--model_path", str(tiny_run_dir), "--output", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["max_logit_diff"] <= 1e-4
    assert "largest logit difference" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_bf16_export_reports_its_rounding(tiny_run_dir, tmp_path):
    out = tmp_path / "merged-bf16"
    assert zhlora(["merge", "--model_path", str(tiny_run_dir), "--output", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "merge_report.json").read_text())["max_logit_diff"] > 0


def test_weighted_merge_of_two_adapters(tiny_run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhlora.generation import load_run

    out = tmp_path / "mixed"
    args = ["merge-adapters", "--model_path", str(tiny_run_dir), "--adapters",
            f"x={tiny_run_dir},y={tiny_run_dir}", "--weights", "0.5,0.5", "--output", str(out)]
    assert zhlora(args) == 0
    # Half of the same adapter twice, concatenated, is exactly the adapter itself.
    model, tokenizer, cfg = load_run(tiny_run_dir)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    mixed = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(mixed(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("adapters, name", [("lo={run},y={run}", "merged"), ("x={run},y={run}", "a")])
def test_merge_refuses_names_peft_cannot_load(tiny_run_dir, tmp_path, capsys, adapters, name):
    out = tmp_path / "mixed"
    assert zhlora(["merge-adapters", "--model_path", str(tiny_run_dir), "--adapters", adapters.format(run=tiny_run_dir),
                   "--weights", "0.5,0.5", "--name", name, "--output", str(out)]) == 2
    assert "part of PEFT's parameter prefix 'lora_'" in capsys.readouterr().err and not out.exists()
