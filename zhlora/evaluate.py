"""第四步: score a trained run on its held-out test split, beside the base model it started from.

    python training/evaluate.py --model_path outputs [--max_samples 200] [--generate_samples 64] [--no_baseline]
    zhlora evaluate --model_path outputs --batch_size 32 --max_new_tokens 128
    zhlora evaluate --adapters math=runs/math,zh=runs/zh [--output_dir outputs/adapters_eval]

Reads <model_path>/config.yaml and the run's data.test_file (or --test_data, never the
train file), keeps the first --max_samples rows in file order (of the built-in families, only
those in data.tasks when the run was trained on a subset; rows of the user's own data always). Then, for the fine-tuned model and the base model:
  1. teacher forcing, every row (teacher_forced): one forward pass over prompt + reference says
     whether greedy decoding would write the reference and stop (exact_match of the tasks with
     one right answer), and gives the test loss over the supervised tokens;
  2. greedy batched generation (generation.generate) of the first --generate_samples rows (64 on
     the command line, all in evaluate_run by default) and of every row teacher forcing cannot score (self_cognition, open answers),
     prompts from formatting.encode_prompt, the very ids training saw before each answer;
  3. per-sample scores and their means, as metrics.py defines them; forced_vs_generated counts
     the generated rows on which both ways of scoring exact match agree.
For a LoRA run the base model is the same loaded model with its adapter switched off
(`model.disable_adapter()`), so nothing loads twice; a full fine-tune loads the base anew.

Writes, each atomically (zhlora/files.py; the tables it prints: evaluate_tables.py):
  <model_path>/evaluation_results.json  headline metrics, ci, per_task, baseline, delta, delta_ci,
                                        config, versions, settings, definitions, seconds (the
                                        whole evaluation, model load included)
  <model_path>/predictions.jsonl        one row per sample: prompt, reference, predictions, scores, loss

--adapters (task adapters: name=path; repeat the flag or join with commas, as on every
command) loads the base model once and every run's adapter into one PeftModel by name
(serving/adapters.py's load_adapters; they must share the base model). Each adapter is scored, as
above, on the test rows of its own run's data.tasks (all rows when the list is empty), so a
math adapter is never graded on traditional Chinese. The base model is scored once per
distinct row set. Written to --output_dir (runs are left untouched):
  evaluation_results.json  adapters: {name: path, tasks, test_data, the metrics above, config},
                           base_model, versions, settings, definitions
  predictions.jsonl        as above, each row starting with its "adapter"
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path

from zhlora import metrics
from zhlora.config import Config, ConfigError, load_config
from zhlora.evaluate_tables import print_adapters_table, print_table
from zhlora.files import write_json, write_jsonl
from zhlora.formatting import encode_prompt, prompt_is_truncated
from zhlora.generation import decoding_settings, generate, load_base, load_run
from zhlora.serving.adapters import add_adapters_argument, answering_as, load_adapters, parse_adapters
from zhlora.tasks import CHECKABLE_TASKS, selected
from zhlora.teacher_forcing import teacher_forced

# torch (and what imports it) is imported inside the functions that run a model: `zhlora --help`
# imports this module to list the command and should not wait seconds for torch.

RESULTS_FILE, PREDICTIONS_FILE = "evaluation_results.json", "predictions.jsonl"
ADAPTERS_OUTPUT_DIR = "outputs/adapters_eval"
# Generation is one forward pass per new token, teacher forcing one per row: the command line
# generates this many rows for examples, similarity and ROUGE, and scores every row by forcing.
GENERATE_SAMPLES = 64


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
    rows = [r for r in rows if selected(r, cfg.data.tasks)]
    rows = rows[:max_samples] if max_samples else rows
    if not rows:
        subset = f" of data.tasks={cfg.data.tasks}" if cfg.data.tasks else ""
        raise ConfigError(f"{path}: no rows to evaluate{subset}")
    return rows


# Tasks scored by teacher forcing: their reference is the one right answer, token for token.
# self_cognition is not (any wording that names the assistant and its maker passes), so its
# rows are always generated; open_qa and user data have no exact answer at all.
FORCED_TASKS = CHECKABLE_TASKS - {"self_cognition"}


def generation_rows(rows: list[dict], generate_samples: int | None) -> list[int]:
    """Which rows get a real generation: the first generate_samples rows (all when None) and every
    row that teacher forcing cannot score (self_cognition, open answers)."""
    limit = len(rows) if generate_samples is None else generate_samples
    return [i for i, row in enumerate(rows) if i < limit or row.get("task") not in FORCED_TASKS]


def score_model(model, tokenizer, rows: list[dict], cfg: Config, batch_size: int, max_new_tokens: int,
                generate_samples: int | None = None, refill: bool = True, precision: str | None = None):
    """(prompts, generations, per-sample scores, summary) of one model on the test rows.

    exact_match of a FORCED_TASKS row is the teacher-forced match (every row); a generated row
    also records generated_exact_match, the check of its generated text, and the summary says
    how often the two agree. Similarity, BLEU, ROUGE, length and success_rate come from the
    generated rows only; prompts and generations are None for rows not generated.
    """
    forced, loss, row_losses = teacher_forced(model, tokenizer, rows, cfg, batch_size, max_new_tokens, precision)
    chosen = generation_rows(rows, generate_samples)
    prompts: list = [None] * len(rows)
    generations: list = [None] * len(rows)
    for i in chosen:  # a prompt longer than training ever saw is cut as training cuts it (and counted)
        prompts[i] = encode_prompt(rows[i], tokenizer, cfg.model.template, cfg.data.max_length)
    truncated = sum(prompt_is_truncated(rows[i], tokenizer, cfg.model.template, cfg.data.max_length) for i in chosen)
    for i, g in zip(chosen, generate(model, tokenizer, [prompts[i] for i in chosen],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, refill=refill)):
        generations[i] = g
    scores = [score_row(row, g, f, l) for row, g, f, l in zip(rows, generations, forced, row_losses)]
    summary = metrics.summarize(scores)
    pairs = [(s["exact_match"], s["generated_exact_match"]) for s in scores
             if s.get("generated_exact_match") is not None and s["exact_match"] is not None]
    summary = {**{k: summary[k] for k in metrics.HEADLINE}, "test_loss": loss,
               "perplexity": None if loss is None else metrics.perplexity(loss), **summary,  # headline keys first
               "num_generated": len(chosen), "prompts_truncated": truncated,
               "unscored": sum(s["exact_match"] is None for s in scores if s["task"] in FORCED_TASKS),
               "forced_vs_generated": {"rows": len(pairs), "agree": sum(f == g for f, g in pairs),
                                       "generated_only": sum(g and not f for f, g in pairs),
                                       "forced_only": sum(f and not g for f, g in pairs)}}
    return prompts, generations, scores, summary


def score_row(row: dict, generation, forced: bool | None, loss: tuple[float, int] | None = None) -> dict:
    """score_sample of a generated row; exact_match from teacher forcing where that applies, and loss
    (mean per answer token) with loss_tokens from that pass (None for a row max_length drops)."""
    task = row.get("task") or "user"
    if generation is None:
        score = {key: None for key in metrics.score_sample(task, "", row["output"], False, 0, 0.0)}
        score["task"] = task
    else:
        score = metrics.score_sample(task, generation.text, row["output"], generation.finished,
                                     len(generation.token_ids), generation.seconds)
        score["generated_exact_match"] = score["exact_match"] if task in FORCED_TASKS else None
    if task in FORCED_TASKS:
        score["exact_match"] = forced
    score["loss"], score["loss_tokens"] = (None, None) if not loss or not loss[1] else (loss[0] / loss[1], loss[1])
    return score


def read_run(model_path: str | Path, test_data: str | Path | None, max_samples: int | None):
    """(config as trained, test file, test rows) of a run folder (load_run renames a full run's model)."""
    model_path = Path(model_path)
    if not (model_path / "config.yaml").is_file():
        raise ConfigError(f"{model_path}/config.yaml not found: is {model_path} a zhlora run folder?")
    run_cfg = load_config(model_path / "config.yaml")
    test_path = check_test_file(test_data or run_cfg.data.test_file, run_cfg)
    return run_cfg, test_path, read_test_rows(test_path, run_cfg, max_samples)


def trained_precision(model_path: Path) -> str | None:
    """train_summary.json's mixed_precision, which teacher forcing runs in (teacher_forcing.py);
    None (fp32) for a folder without one."""
    path = model_path / "train_summary.json"
    return json.loads(path.read_text("utf-8")).get("mixed_precision") if path.is_file() else None


def add_baseline(results: dict, base_summary: dict, scores: list[dict], base_scores: list[dict]) -> None:
    results["baseline"] = base_summary
    results["delta"] = {k: None if results[k] is None or base_summary[k] is None else results[k] - base_summary[k]
                        for k in metrics.DELTA_METRICS}
    # both models answered the same rows: the delta's interval comes from the per-row differences
    results["delta_ci"] = metrics.delta_ci(scores, base_scores)


def evaluate_run(model_path: str | Path, max_samples: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 128, test_data: str | Path | None = None, baseline: bool = True,
                 device: str | None = None, generate_samples: int | None = None, refill: bool = True) -> dict:
    """Evaluate a run folder, write evaluation_results.json and predictions.jsonl, return the results."""
    import torch
    from peft import PeftModel

    began = time.perf_counter()
    model_path = Path(model_path)
    run_cfg, test_path, rows = read_run(model_path, test_data, max_samples)
    model, tokenizer, cfg = load_run(model_path, device)
    print(f"[evaluate] {len(rows)} rows of {test_path} (teacher-forced exact match), generating "
          f"{len(generation_rows(rows, generate_samples))} of them: greedy, batch {batch_size}, "
          f"max_new_tokens {max_new_tokens}, device {next(model.parameters()).device}")
    score = functools.partial(score_model, rows=rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              generate_samples=generate_samples, refill=refill, precision=trained_precision(model_path))
    prompts, tuned, scores, results = score(model, tokenizer, cfg=cfg)
    used_device = str(next(model.parameters()).device)
    base = None
    if baseline:
        print("[evaluate] baseline: the base model " + ("(adapter disabled)" if isinstance(model, PeftModel)
                                                         else f"{run_cfg.model.name}"))
        if isinstance(model, PeftModel):
            with answering_as(model, "base"):
                _, base, base_scores, base_summary = score(model, tokenizer, cfg=cfg)
        else:  # a full fine-tune: free it, then load the weights it started from
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if device:
                run_cfg.model.device = device
            base_model, base_tokenizer = load_base(run_cfg)
            _, base, base_scores, base_summary = score(base_model, base_tokenizer, cfg=run_cfg)
        add_baseline(results, base_summary, scores, base_scores)

    results.update(config=run_cfg.to_dict(), versions=_versions(),
                   settings={"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                             "refill": refill, "generation_config": decoding_settings(),
                             "test_data": str(test_path), "max_samples": max_samples,
                             "generate_samples": generate_samples, "device": used_device},
                   definitions=metrics.DEFINITIONS, seconds=round(time.perf_counter() - began, 1))
    lines = prediction_rows(rows, [p and tokenizer.decode(p) for p in prompts], tuned, scores, base)
    write_jsonl(model_path / PREDICTIONS_FILE, lines)
    write_json(model_path / RESULTS_FILE, _finite(results))
    return results


def evaluate_adapters(adapters: list[tuple[str, Path]], output_dir: str | Path = ADAPTERS_OUTPUT_DIR,
                      max_samples: int | None = None, batch_size: int = 32, max_new_tokens: int = 128,
                      test_data: str | Path | None = None, baseline: bool = True, device: str | None = None,
                      generate_samples: int | None = None, refill: bool = True) -> dict:
    """Score each (name, run folder) adapter on its own run's tasks, all in one loaded model; write
    evaluation_results.json and predictions.jsonl into output_dir and return the results."""
    runs = {name: read_run(path, test_data, max_samples) for name, path in adapters}  # a bad folder fails here
    model, tokenizer, _ = load_adapters(adapters, device)
    used_device = str(next(model.parameters()).device)
    results, lines, base_runs = {}, [], {}
    for name, path in adapters:
        run_cfg, test_path, rows = runs[name]
        print(f"[evaluate] adapter {name}: {len(rows)} rows of {test_path} "
              f"(data.tasks={run_cfg.data.tasks or 'all'}), device {used_device}")
        precision = trained_precision(Path(path))
        score = functools.partial(score_model, model, tokenizer, rows, run_cfg, batch_size, max_new_tokens,
                                  generate_samples, refill, precision)
        with answering_as(model, name):
            prompts, tuned, scores, summary = score()
        base = None
        if baseline:  # the same rows and prompts give the same base scores: score them once
            key = (str(test_path), tuple(sorted(run_cfg.data.tasks)), run_cfg.model.template,
                   run_cfg.data.max_length, run_cfg.data.train_on_prompt, precision)
            if key not in base_runs:
                print("[evaluate] baseline: the base model (every adapter disabled)")
                with answering_as(model, "base"):
                    base_runs[key] = score()[1:]
            base, base_scores, base_summary = base_runs[key]
            add_baseline(summary, base_summary, scores, base_scores)
        results[name] = {"path": str(path), "tasks": list(run_cfg.data.tasks), "test_data": str(test_path),
                         **summary, "config": run_cfg.to_dict()}
        lines += [{"adapter": name, **line}
                  for line in prediction_rows(rows, [p and tokenizer.decode(p) for p in prompts], tuned, scores, base)]

    first_cfg = runs[adapters[0][0]][0]
    results = {"adapters": results, "base_model": first_cfg.model.name, "versions": _versions(),
               "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                            "refill": refill, "generation_config": decoding_settings(),
                            "max_samples": max_samples, "generate_samples": generate_samples, "device": used_device},
               "definitions": metrics.DEFINITIONS}
    write_jsonl(Path(output_dir) / PREDICTIONS_FILE, lines)
    write_json(Path(output_dir) / RESULTS_FILE, _finite(results))
    return results


def prediction_rows(rows, prompts: list, tuned, scores, base=None) -> list[dict]:
    """One predictions.jsonl row per test sample, in file order; prompt, prediction and the
    generated scores are null for a row that was scored by teacher forcing alone."""
    lines = []
    for k, (row, g, s) in enumerate(zip(rows, tuned, scores)):
        line = {"instruction": row["instruction"], "input": row.get("input", ""), "task": s["task"],
                "prompt": prompts[k], "reference": row["output"], "prediction": g and g.text}
        if base is not None:
            line["baseline_prediction"] = base[k] and base[k].text
        line.update(finished=g and g.finished, exact_match=s["exact_match"],
                    generated_exact_match=s.get("generated_exact_match"), similarity=s["similarity"],
                    rouge_l=s["rouge_l"], bleu_4=s["bleu_4"], loss=s["loss"], loss_tokens=s["loss_tokens"],
                    generation_time=g and g.seconds)
        lines.append(_finite(line))
    return lines


def _versions() -> dict:
    import peft
    import torch
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default=None, help="the run folder training wrote (default: outputs)")
    add_adapters_argument(parser, "LoRA runs sharing a base model, each scored on its own data.tasks")
    parser.add_argument("--output_dir", default=None,
                        help=f"where --adapters writes its results (default: {ADAPTERS_OUTPUT_DIR})")
    parser.add_argument("--max_samples", type=int, default=None, help="the first N test rows (default: all)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="rows per teacher-forced pass, and rows answering at once while generating")
    parser.add_argument("--no_refill", action="store_true",
                        help="generate in fixed batches, each until its longest answer ends (slower; same text)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--generate_samples", type=int, default=GENERATE_SAMPLES,
                        help="generate only the first N rows (and every self_cognition or open row); exact match "
                             f"of every row comes from teacher forcing (default: {GENERATE_SAMPLES}; -1: all rows)")
    parser.add_argument("--test_data", default=None, help="a JSON array of alpaca rows (default: data.test_file)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the base model")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: the run's model.device)")


def run(args: argparse.Namespace) -> int:
    for name in ("max_samples", "batch_size", "max_new_tokens", "generate_samples"):
        least = -1 if name == "generate_samples" else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise ConfigError(f"--{name} must be >= {least}")
    generate_samples = None if args.generate_samples == -1 else args.generate_samples
    if args.adapters and args.model_path:
        raise ConfigError("give --model_path (one run) or --adapters (several), not both")
    if args.output_dir and not args.adapters:
        raise ConfigError("--output_dir is for --adapters; one run's results go into its folder")
    out = Path(args.output_dir or ADAPTERS_OUTPUT_DIR) if args.adapters else Path(args.model_path or "outputs")
    if args.adapters:
        results = evaluate_adapters(parse_adapters(args.adapters), out, args.max_samples, args.batch_size,
                                    args.max_new_tokens, args.test_data, not args.no_baseline, args.device,
                                    generate_samples, not args.no_refill)
        print_adapters_table(results)
    else:
        results = evaluate_run(out, args.max_samples, args.batch_size, args.max_new_tokens,
                               args.test_data, not args.no_baseline, args.device, generate_samples, not args.no_refill)
        print_table(results)
    print(f"\n[evaluate] -> {out / RESULTS_FILE}, {out / PREDICTIONS_FILE}")
    return 0
