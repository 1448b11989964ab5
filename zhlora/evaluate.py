"""第四步: score a trained run on its held-out test split, beside the base model it started from.

    python training/evaluate.py --model_path outputs [--max_samples 200] [--no_baseline]
    zhlora evaluate --model_path outputs --batch_size 8 --max_new_tokens 128
    zhlora evaluate --adapters math=runs/math,zh=runs/zh [--output_dir outputs/adapters_eval]

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

--adapters (task adapters: name=path, or a bare path named after its folder; repeat the flag
or join with commas) loads the base model once and every run's adapter into one PeftModel by
name (generation.load_adapters; they must share the base model). Each adapter is scored, as
above, on the test rows of its own run's data.tasks (all rows when the list is empty), so a
math adapter is never graded on traditional Chinese. The base model is scored once per
distinct row set. Written to --output_dir (runs are left untouched):
  evaluation_results.json  adapters: {name: path, tasks, test_data, the metrics above, config},
                           base_model, versions, settings, definitions
  predictions.jsonl        as above, each row starting with its "adapter"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch

from zhlora import metrics
from zhlora.batching import collate_padded
from zhlora.config import Config, ConfigError, load_config
from zhlora.formatting import encode_prompt, encode_sample
from zhlora.generation import generate, load_adapters, load_base, load_run
from zhlora.safety import adapter_name_problem
from zhlora.train import compute_loss

RESULTS_FILE, PREDICTIONS_FILE = "evaluation_results.json", "predictions.jsonl"
ADAPTERS_OUTPUT_DIR = "outputs/adapters_eval"
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


def read_run(model_path: str | Path, test_data: str | Path | None, max_samples: int | None):
    """(config as trained, test file, test rows) of a run folder (load_run renames a full run's model)."""
    model_path = Path(model_path)
    if not (model_path / "config.yaml").is_file():
        raise ConfigError(f"{model_path}/config.yaml not found: is {model_path} a zhlora run folder?")
    run_cfg = load_config(model_path / "config.yaml")
    test_path = check_test_file(test_data or run_cfg.data.test_file, run_cfg)
    return run_cfg, test_path, read_test_rows(test_path, run_cfg, max_samples)


def add_baseline(results: dict, base_summary: dict) -> None:
    results["baseline"] = base_summary
    results["delta"] = {k: None if results[k] is None or base_summary[k] is None else results[k] - base_summary[k]
                        for k in DELTA_METRICS}


def evaluate_run(model_path: str | Path, max_samples: int | None = None, batch_size: int = 8,
                 max_new_tokens: int = 128, test_data: str | Path | None = None, baseline: bool = True,
                 device: str | None = None) -> dict:
    """Evaluate a run folder, write evaluation_results.json and predictions.jsonl, return the results."""
    from peft import PeftModel

    model_path = Path(model_path)
    run_cfg, test_path, rows = read_run(model_path, test_data, max_samples)
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
        add_baseline(results, base_summary)

    results.update(config=run_cfg.to_dict(), versions=_versions(),
                   settings={"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                             "test_data": str(test_path), "max_samples": max_samples, "device": used_device},
                   definitions=metrics.DEFINITIONS)
    lines = prediction_rows(rows, [tokenizer.decode(p) for p in prompts], tuned, scores, base)
    _write_atomic(model_path / PREDICTIONS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    _write_atomic(model_path / RESULTS_FILE, json.dumps(_finite(results), indent=2, ensure_ascii=False) + "\n")
    return results


def parse_adapters(values: list[str]) -> list[tuple[str, Path]]:
    """["math=runs/math,zh=runs/zh", "runs/code"] -> [("math", runs/math), ("zh", runs/zh), ("code", runs/code)]"""
    pairs: list[tuple[str, Path]] = []
    for item in (part.strip() for value in values for part in value.split(",")):
        if not item:
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep:  # a bare run folder is named after the folder
            name, path = Path(item).resolve().name, item
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not path:
            raise ConfigError(f"--adapters {item}: write name=path (name: letters, digits, _ and -), "
                              "e.g. math=runs/math")
        if name in [n for n, _ in pairs]:
            raise ConfigError(f"--adapters {item}: the name {name} is given twice; write name=path to tell them apart")
        if adapter_name_problem(name):
            raise ConfigError(f"--adapters {item}: {adapter_name_problem(name)}")
        pairs.append((name, Path(path)))
    if not pairs:
        raise ConfigError("--adapters: no adapter given; write name=path,name=path")
    return pairs


def evaluate_adapters(adapters: list[tuple[str, Path]], output_dir: str | Path = ADAPTERS_OUTPUT_DIR,
                      max_samples: int | None = None, batch_size: int = 8, max_new_tokens: int = 128,
                      test_data: str | Path | None = None, baseline: bool = True, device: str | None = None) -> dict:
    """Score each (name, run folder) adapter on its own run's tasks, all in one loaded model; write
    evaluation_results.json and predictions.jsonl into output_dir and return the results."""
    runs = {name: read_run(path, test_data, max_samples) for name, path in adapters}  # a bad folder fails here
    model, tokenizer, _ = load_adapters(adapters, device)
    used_device = str(next(model.parameters()).device)
    results, lines, base_runs = {}, [], {}
    for name, path in adapters:
        run_cfg, test_path, rows = runs[name]
        model.set_adapter(name)
        print(f"[evaluate] adapter {name}: {len(rows)} rows of {test_path} "
              f"(data.tasks={run_cfg.data.tasks or 'all'}), device {used_device}")
        prompts, tuned, scores, summary = score_model(model, tokenizer, rows, run_cfg, batch_size, max_new_tokens)
        base = None
        if baseline:  # the same rows and prompts give the same base scores: score them once
            key = (str(test_path), tuple(sorted(run_cfg.data.tasks)), run_cfg.model.template,
                   run_cfg.data.max_length, run_cfg.data.train_on_prompt)
            if key not in base_runs:
                print("[evaluate] baseline: the base model (every adapter disabled)")
                with model.disable_adapter():
                    base_runs[key] = score_model(model, tokenizer, rows, run_cfg, batch_size, max_new_tokens)[1::2]
            base, base_summary = base_runs[key]
            add_baseline(summary, base_summary)
        results[name] = {"path": str(path), "tasks": list(run_cfg.data.tasks), "test_data": str(test_path),
                         **summary, "config": run_cfg.to_dict()}
        lines += [{"adapter": name, **line}
                  for line in prediction_rows(rows, [tokenizer.decode(p) for p in prompts], tuned, scores, base)]

    first_cfg = runs[adapters[0][0]][0]
    results = {"adapters": results, "base_model": first_cfg.model.name, "versions": _versions(),
               "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                            "max_samples": max_samples, "device": used_device},
               "definitions": metrics.DEFINITIONS}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(output_dir / PREDICTIONS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    _write_atomic(output_dir / RESULTS_FILE, json.dumps(_finite(results), indent=2, ensure_ascii=False) + "\n")
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
    # Large values (the perplexity of a model that has not learned the format) drop decimals,
    # and a leading space keeps columns apart whatever the width.
    return f" {value:>{width - 1}.{4 if abs(value) < 1e4 else 1}f}"


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


def print_adapters_table(results: dict) -> None:
    adapters = results["adapters"]
    print(f"\n{'adapter':<16}{'n':>5}{'exact_match':>12}{'baseline':>11}{'test_loss':>11}   data.tasks")
    for name, row in adapters.items():
        base = row.get("baseline", {}).get("exact_match")
        print(f"{name:<16}{row['num_samples']:>5}{_cell(row['exact_match'], 12)}{_cell(base)}"
              f"{_cell(row['test_loss'])}   {', '.join(row['tasks']) or 'all'}")
    tasks = sorted({t for row in adapters.values() for t, cell in row["per_task"].items() if "exact_match" in cell})
    if tasks:  # '-': the adapter was not trained, so not scored, on that task
        widths = [max(11, len(name) + 2) for name in adapters]
        print(f"\n{'exact match by task':<20}" + "".join(f"{n:>{w}}" for n, w in zip(adapters, widths)))
        for task in tasks:
            print(f"{task:<20}" + "".join(_cell(row["per_task"].get(task, {}).get("exact_match"), w)
                                          for row, w in zip(adapters.values(), widths)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlora evaluate", description="Score a trained run on its test split.")
    parser.add_argument("--model_path", default=None, help="the run folder training wrote (default: outputs)")
    parser.add_argument("--adapters", action="append", default=None, metavar="NAME=PATH,...",
                        help="LoRA runs sharing a base model, each scored on its own data.tasks; "
                             "a bare PATH is named after its folder; may be repeated")
    parser.add_argument("--output_dir", default=None,
                        help=f"where --adapters writes its results (default: {ADAPTERS_OUTPUT_DIR})")
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
    if args.adapters and args.model_path:
        print("zhlora evaluate: error: give --model_path (one run) or --adapters (several), not both", file=sys.stderr)
        return 2
    if args.output_dir and not args.adapters:
        print("zhlora evaluate: error: --output_dir is for --adapters; one run's results go into its folder",
              file=sys.stderr)
        return 2
    out = Path(args.output_dir or ADAPTERS_OUTPUT_DIR) if args.adapters else Path(args.model_path or "outputs")
    try:
        if args.adapters:
            results = evaluate_adapters(parse_adapters(args.adapters), out, args.max_samples, args.batch_size,
                                        args.max_new_tokens, args.test_data, not args.no_baseline, args.device)
        else:
            results = evaluate_run(out, args.max_samples, args.batch_size, args.max_new_tokens,
                                   args.test_data, not args.no_baseline, args.device)
    except (ConfigError, DataError, ModelSourceError, TemplateError, FileNotFoundError) as err:
        print(f"zhlora evaluate: error: {err}", file=sys.stderr)
        return 2
    if args.adapters:
        print_adapters_table(results)
    else:
        print_table(results)
    print(f"\n[evaluate] -> {out / RESULTS_FILE}, {out / PREDICTIONS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
