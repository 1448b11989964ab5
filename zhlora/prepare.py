"""Stage 1 of the guide: build the dataset files that training and evaluation read.

    python data/prepare_data.py                      # generated Chinese tasks (default)
    zhlora prepare --source my.jsonl --source generated:2000 --output_dir data

Writes, into the output folder:
  chinese_instructions.json  every row (alpaca: instruction, input, output, task)
  train.json / val.json / test.json  the splits; no val or test row shares its
                             normalised instruction + input with a train row
  data_problems.txt          with --source: every refused row, PATH:LINE: FIELD: problem
  data_settings.json         the settings that made these files (data_settings), so a later
                             run can tell whether they still fit its config (settings_changes)
Then prints a stats report: rows per task and split, token-length percentiles for
the configured model's tokenizer, and how many samples `data.max_length` truncates.
"""
from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

from zhlora import data as zdata
from zhlora.config import Config
from zhlora.files import write_atomic
from zhlora.formatting import IGNORE_INDEX, encode_sample
from zhlora.tasks import generate_samples

GENERATED = "generated"  # --source generated[:N] mixes the built-in tasks with user data
MAX_PRINTED_PROBLEMS = 50
SETTINGS_FILE = "data_settings.json"


def data_settings(cfg: Config, sources: list[str]) -> dict:
    """Everything that decides which rows the files hold (written beside them as SETTINGS_FILE);
    `generator` fingerprints the task generator itself (tasks.py and its resources), so data made
    by another zhlora version is not taken for this one's."""
    return {"sources": list(sources), "num_samples": cfg.data.num_samples, "tasks": list(cfg.data.tasks),
            "val_ratio": cfg.data.val_ratio, "test_ratio": cfg.data.test_ratio, "seed": cfg.training.seed,
            "generator": generator_fingerprint()}


def generator_fingerprint() -> str:
    """sha256 (first 16 hex digits) of zhlora/tasks.py and every zhlora/resources/*.json."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in [package / "tasks.py", *sorted((package / "resources").glob("*.json"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def settings_changes(cfg: Config, sources: list[str], output_dir: str | Path) -> list[str]:
    """How the data files in output_dir differ from what cfg would make: [] when they match,
    ["no data_settings.json"] for files written without one (or no files at all)."""
    path = Path(output_dir) / SETTINGS_FILE
    if not path.is_file() or not (Path(output_dir) / "train.json").is_file():
        return [f"no {path}"]
    saved, wanted = json.loads(path.read_text("utf-8")), data_settings(cfg, sources)
    return [f"{key}: {saved.get(key)!r} in {path}, {value!r} now" for key, value in wanted.items()
            if saved.get(key) != value]


def load_sources(specs: list[str], cfg: Config, columns: dict | None, encoding: str,
                 problems_file: Path) -> list[dict]:
    """Load and mix every --source. Every refused row is named in problems_file (the
    first ones are printed too): nothing is dropped silently."""
    loaded, problems = [], []
    for spec in specs:
        path, amount = zdata.parse_source_spec(spec)
        if path == GENERATED:
            rows = generate_samples(int(amount) if isinstance(amount, int) else cfg.data.num_samples,
                                    seed=cfg.training.seed, tasks=cfg.data.tasks or None)
            loaded.append((zdata.LoadResult(rows, [], collections.Counter(loaded=len(rows))), None))
            continue
        result = zdata.load_source(path, columns=columns, encoding=encoding)
        problems += result.problems
        for problem in result.problems[:MAX_PRINTED_PROBLEMS]:
            print(problem)
        if len(result.problems) > MAX_PRINTED_PROBLEMS:
            print(f"... and {len(result.problems) - MAX_PRINTED_PROBLEMS} more problems in {path}")
        counts = ", ".join(f"{k}={v}" for k, v in sorted(result.counts.items()))
        print(f"[prepare] {path}: {counts}")
        loaded.append((result, amount))
    if problems:
        write_atomic(problems_file, "".join(f"{p}\n" for p in problems))
        print(f"[prepare] {len(problems)} rows refused, each listed with its reason in {problems_file}")
    return zdata.mix_sources(loaded, seed=cfg.training.seed)


def token_stats(rows: list[dict], tokenizer, cfg: Config) -> dict:
    """Token lengths at full length, and what max_length would cut or drop."""
    lengths, supervised, truncated, dropped = [], 0, 0, 0
    for row in rows:
        full = encode_sample(row, tokenizer, cfg.model.template, max_length=10**9)
        lengths.append(len(full["input_ids"]))
        kept = encode_sample(row, tokenizer, cfg.model.template, cfg.data.max_length, cfg.data.train_on_prompt)
        if kept is None:
            dropped += 1
            continue
        truncated += len(full["input_ids"]) > cfg.data.max_length
        supervised += sum(label != IGNORE_INDEX for label in kept["labels"])
    lengths.sort()

    def pct(q):
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lengths[-1] if lengths else 0,
            "total_tokens": sum(lengths), "supervised_tokens": supervised,
            "truncated": truncated, "dropped_prompt_too_long": dropped, "max_length": cfg.data.max_length}


def print_report(splits: dict[str, list[dict]], stats: dict | None) -> None:
    tasks = sorted({row["task"] for rows in splits.values() for row in rows})
    print(f"\n{'task':<12}" + "".join(f"{name:>8}" for name in splits))
    for task in tasks:
        print(f"{task:<12}" + "".join(f"{sum(r['task'] == task for r in rows):>8}" for rows in splits.values()))
    print(f"{'total':<12}" + "".join(f"{len(rows):>8}" for rows in splits.values()))
    if stats:
        print(f"\ntokens per sample (train): p50={stats['p50']} p90={stats['p90']} p99={stats['p99']} "
              f"max={stats['max']}; supervised share {stats['supervised_tokens'] / max(1, stats['total_tokens']):.0%}")
        print(f"data.max_length={stats['max_length']}: {stats['truncated']} samples truncated, "
              f"{stats['dropped_prompt_too_long']} dropped (prompt alone too long)")


def prepare(cfg: Config, sources: list[str], output_dir: str | Path, columns: dict | None = None,
            encoding: str = "utf-8", tokenizer=None) -> dict:
    """Build and write the dataset files; returns {"paths": ..., "counts": ..., "stats": ...}."""
    output_dir = Path(output_dir)
    if sources:
        rows = load_sources(sources, cfg, columns, encoding, output_dir / "data_problems.txt")
    else:
        rows = generate_samples(cfg.data.num_samples, seed=cfg.training.seed, tasks=cfg.data.tasks or None)
    if not rows:
        raise zdata.DataError("no usable rows in the sources; run `zhlora validate` on them to see why")
    train, val, test = zdata.split_rows(rows, cfg.data.val_ratio, cfg.data.test_ratio, seed=cfg.training.seed)
    paths = {"all": output_dir / "chinese_instructions.json", "train": output_dir / "train.json",
             "val": output_dir / "val.json", "test": output_dir / "test.json"}
    (output_dir / SETTINGS_FILE).unlink(missing_ok=True)  # the old settings stop vouching for the files now
    for name, split in (("all", rows), ("train", train), ("val", val), ("test", test)):
        zdata.write_json(paths[name], split)
    # last: a run killed before this line leaves no settings, so the files count as unknown
    zdata.write_json(output_dir / SETTINGS_FILE, data_settings(cfg, sources))
    splits = {"train": train, "val": val, "test": test}
    stats = token_stats(train, tokenizer, cfg) if tokenizer is not None else None
    print_report(splits, stats)
    for name, path in paths.items():
        print(f"[prepare] wrote {path} ({len(rows) if name == 'all' else len(splits[name])} rows)")
    return {"paths": {k: str(v) for k, v in paths.items()},
            "counts": {k: len(v) for k, v in splits.items()}, "stats": stats}
