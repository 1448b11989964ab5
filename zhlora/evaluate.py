"""第四步: score a trained run on its held-out test split, beside the base model it started from.

    python training/evaluate.py --model_path outputs [--max_samples 200] [--no_baseline]
    zhlora evaluate --model_path outputs --batch_size 8 --max_new_tokens 128

Reads <model_path>/config.yaml and the run's data.test_file (or --test_data, never the
train file), keeps the first --max_samples rows in file order (rows of data.tasks only,
when the run was trained on a subset). Then, for the fine-tuned model and the base model:
  1. prompts from formatting.encode_prompt: the very ids training saw before each answer;
  2. greedy batched generation (generation.generate);
  3. per-sample scores and their means, as metrics.py defines them;
  4. test loss over the same rows' supervised tokens with train.compute_loss.
For a LoRA run the base model is the same loaded model with its adapter switched off
(`model.disable_adapter()`), so nothing loads twice; a full fine-tune loads the base anew.

Writes, each atomically (temp file + os.replace):
  <model_path>/evaluation_results.json  headline metrics, ci, per_task, baseline, delta,
                                        config, versions, settings, definitions
  <model_path>/predictions.jsonl        one row per sample: prompt, reference, predictions, scores
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from zhlora import metrics
from zhlora.batching import collate_padded
from zhlora.config import Config, ConfigError, load_config
from zhlora.formatting import encode_prompt, encode_sample
from zhlora.generation import generate, load_base, load_run
from zhlora.train import compute_loss

RESULTS_FILE, PREDICTIONS_FILE = "evaluation_results.json", "predictions.jsonl"
DELTA_METRICS = [*metrics.HEADLINE, "test_loss", "perplexity"]


def check_test_file(test_file: str | Path, cfg: Config) -> Path:
    """The test split to read; refuses the run's train file (its scores would say nothing)."""
    path, train = Path(test_file), Path(cfg.data.train_file)
    if not path.is_file():
        raise ConfigError(f"test data {path}: no such file; run `python data/prepare_data.py` or pass --test_data")
    same = train.is_file() and (path.samefile(train) or (  # the same file, or a copy of it
        path.stat().st_size == train.stat().st_size and path.read_bytes() == train.read_bytes()))
    if same:
        raise ConfigError(f"--test_data {path} is the run's training file (data.train_file={train}): scores on "
                          f"data the model was trained on measure memory, not skill; use the test split "
                          f"({cfg.data.test_file})")
    return path


def read_test_rows(path: Path, cfg: Config, max_samples: int | None) -> list[dict]:
    """The first max_samples rows in file order (deterministic), of the run's data.tasks if it had any."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a JSON array of alpaca rows (instruction, input, output)")
    if cfg.data.tasks:
        rows = [r for r in rows if r.get("task") in cfg.data.tasks]
    rows = rows[:max_samples] if max_samples else rows
    if not rows:
        subset = f" of data.tasks={cfg.data.tasks}" if cfg.data.tasks else ""
        raise ConfigError(f"{path}: no rows to evaluate{subset}")
    return rows


@torch.no_grad()
def test_loss(model, tokenizer, rows: list[dict], cfg: Config, batch_size: int) -> float | None:
    """Mean cross-entropy per supervised token (the tokens training learned: answers and stop tokens).

    Rows whose answer does not survive data.max_length are skipped, as training skips them.
    """
    samples = [s for s in (encode_sample(r, tokenizer, cfg.model.template, cfg.data.max_length,
                                         cfg.data.train_on_prompt) for r in rows) if s is not None]
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate_padded(samples[start:start + batch_size], tokenizer.pad_token_id)
        batch_sum, n = compute_loss(model, {k: v.to(device) for k, v in batch.items()})
        loss_sum, tokens = loss_sum + batch_sum.item(), tokens + n
    return loss_sum / tokens if tokens else None


def score_model(model, tokenizer, rows: list[dict], cfg: Config, batch_size: int, max_new_tokens: int):
    """(prompts, generations, per-sample scores, summary) of one model on the test rows."""
    prompts = [encode_prompt(row, tokenizer, cfg.model.template) for row in rows]
    generations = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [metrics.score_sample(row.get("task") or "user", g.text, row["output"], g.finished, len(g.token_ids),
                                   g.seconds) for row, g in zip(rows, generations)]
    summary = metrics.summarize(scores)
    loss = test_loss(model, tokenizer, rows, cfg, batch_size)
    summary = {**{k: summary[k] for k in metrics.HEADLINE}, "test_loss": loss,
               "perplexity": None if loss is None else metrics.perplexity(loss), **summary}  # headline keys first
    return prompts, generations, scores, summary


def evaluate_run(model_path: str | Path, max_samples: int | None = None, batch_size: int = 8,
                 max_new_tokens: int = 128, test_data: str | Path | None = None, baseline: bool = True,
                 device: str | None = None) -> dict:
    """Evaluate a run folder, write evaluation_results.json and predictions.jsonl, return the results."""
    from peft import PeftModel

    model_path = Path(model_path)
    if not (model_path / "config.yaml").is_file():
        raise ConfigError(f"{model_path}/config.yaml not found: is {model_path} a zhlora run folder?")
    run_cfg = load_config(model_path / "config.yaml")  # as trained (load_run renames a full run's model)
    test_path = check_test_file(test_data or run_cfg.data.test_file, run_cfg)
    rows = read_test_rows(test_path, run_cfg, max_samples)

    model, tokenizer, cfg = load_run(model_path, device)
    print(f"[evaluate] {len(rows)} rows of {test_path}, greedy, batch {batch_size}, "
          f"max_new_tokens {max_new_tokens}, device {next(model.parameters()).device}")
    prompts, tuned, scores, results = score_model(model, tokenizer, rows, cfg, batch_size, max_new_tokens)
    used_device = str(next(model.parameters()).device)
    base = None
    if baseline:
        print("[evaluate] baseline: the base model " + ("(adapter disabled)" if isinstance(model, PeftModel)
                                                         else f"{run_cfg.model.name}"))
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                _, base, _, base_summary = score_model(model, tokenizer, rows, cfg, batch_size, max_new_tokens)
        else:  # a full fine-tune: free it, then load the weights it started from
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if device:
                run_cfg.model.device = device
            base_model, base_tokenizer = load_base(run_cfg)
            _, base, _, base_summary = score_model(base_model, base_tokenizer, rows, run_cfg, batch_size,
                                                   max_new_tokens)
        results["baseline"] = base_summary
        results["delta"] = {k: None if results[k] is None or base_summary[k] is None else results[k] - base_summary[k]
                            for k in DELTA_METRICS}

    results.update(config=run_cfg.to_dict(), versions=_versions(),
                   settings={"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                             "test_data": str(test_path), "max_samples": max_samples, "device": used_device},
                   definitions=metrics.DEFINITIONS)
    lines = prediction_rows(rows, [tokenizer.decode(p) for p in prompts], tuned, scores, base)
    _write_atomic(model_path / PREDICTIONS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    _write_atomic(model_path / RESULTS_FILE, json.dumps(_finite(results), indent=2, ensure_ascii=False) + "\n")
    return results


def prediction_rows(rows, prompts: list[str], tuned, scores, base=None) -> list[dict]:
    """One predictions.jsonl row per test sample, in file order."""
    lines = []
    for k, (row, g, s) in enumerate(zip(rows, tuned, scores)):
        line = {"instruction": row["instruction"], "input": row.get("input", ""), "task": s["task"],
                "prompt": prompts[k], "reference": row["output"], "prediction": g.text}
        if base is not None:
            line["baseline_prediction"] = base[k].text
        line.update(finished=g.finished, exact_match=s["exact_match"], similarity=s["similarity"],
                    rouge_l=s["rouge_l"], bleu_4=s["bleu_4"], generation_time=g.seconds)
        lines.append(_finite(line))
    return lines


def _versions() -> dict:
    import peft
    import transformers

    import zhlora

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "zhlora": zhlora.__version__}


def _finite(value):
    """NaN and infinity -> None, so the files stay valid JSON (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def _cell(value, width: int = 11) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}"


def print_table(results: dict) -> None:
    base, delta = results.get("baseline", {}), results.get("delta", {})
    print(f"\n{'metric':<20}{'fine-tuned':>11}{'baseline':>11}{'delta':>11}   95% CI (fine-tuned)")
    for key in DELTA_METRICS:
        ci = results["ci"].get(key)
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"{key:<20}{_cell(results[key])}{_cell(base.get(key))}{_cell(delta.get(key))}   {ci_text}")
    checkable = {t: row for t, row in results["per_task"].items() if "exact_match" in row}
    if checkable:
        print(f"\n{'exact match by task':<20}{'n':>5}{'fine-tuned':>11}{'baseline':>11}")
        for task, row in checkable.items():
            base_row = base.get("per_task", {}).get(task, {})
            print(f"{task:<20}{row['n']:>5}{_cell(row['exact_match'])}{_cell(base_row.get('exact_match'))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlora evaluate", description="Score a trained run on its test split.")
    parser.add_argument("--model_path", default="outputs", help="the run folder training wrote (output.dir)")
    parser.add_argument("--max_samples", type=int, default=None, help="the first N test rows (default: all)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--test_data", default=None, help="a JSON array of alpaca rows (default: data.test_file)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the base model")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: the run's model.device)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from zhlora.data import DataError
    from zhlora.formatting import TemplateError
    from zhlora.models import ModelSourceError

    args = build_parser().parse_args(argv)
    for name in ("max_samples", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"zhlora evaluate: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        results = evaluate_run(args.model_path, args.max_samples, args.batch_size, args.max_new_tokens,
                               args.test_data, not args.no_baseline, args.device)
    except (ConfigError, DataError, ModelSourceError, TemplateError, FileNotFoundError) as err:
        print(f"zhlora evaluate: error: {err}", file=sys.stderr)
        return 2
    print_table(results)
    print(f"\n[evaluate] -> {Path(args.model_path) / RESULTS_FILE}, {Path(args.model_path) / PREDICTIONS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
