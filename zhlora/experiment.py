"""Experiments: train and evaluate a grid of settings over seeds, then compare them in one table.

    zhlora experiment configs/experiments/r_ablation.yaml [--output_dir runs/r_ablation] [key=value ...]
    python experiments/run.py configs/experiments/r_ablation.yaml lora.target_modules=all-linear

An experiment YAML (on the command line, key=value applies to every point like `overrides`,
and evaluate.KEY=VALUE changes `evaluate`, e.g. evaluate.max_samples=16):

    base_config: configs/quick_start.yaml   # a zhlora config; relative paths are from the working directory
    overrides: [training.max_steps=40]      # key=value applied to every point
    grid:                                   # the cartesian product of these lists
      lora.r: [4, 8, 16, 32]
      lora.target_modules: [[q_proj, v_proj], [all-linear]]   # a list value is a list inside the list
      recipe:                               # values that are mappings set several keys together
        - {training.method: lora, training.learning_rate: 1.0e-3}
        - {training.method: full, training.learning_rate: 5.0e-5}
      train_samples: [120, 480]             # not a config key: train on the first N rows of data.train_file
    seeds: [42, 43]                         # default: the base config's training.seed
    evaluate: {max_samples: 48, max_new_tokens: 48, batch_size: 16, baseline: false}
    baseline_only: false                    # true: evaluate the untrained model, no training
    reference: {lora.r: 16}                 # the point the others are compared with (comparisons.json)
    groups: {generated: [num2cn, digits]}   # also scored on these tasks' test rows alone (metric@group)

Each (point, seed) is a normal run folder, <output_dir>/<point>/seed<seed>/: train(cfg), then evaluate_run,
both in this process. Finished work is never redone, so an interrupted sweep is resumed by running the
same command: a folder holding train_summary.json and evaluation_results.json is skipped; one with
train_summary.json alone is only evaluated; a killed training resumes from its last checkpoint
(training.resume=true). A finished folder whose config.yaml differs from what the YAML now asks is
refused, never mixed in. Last, <output_dir>/results.csv and results.md (mean and std over seeds, one row
per point) and, from results.csv, plots of quality against each varied number and peak memory.

Choices, and why:
- train_samples writes <point>/train.json, the first N rows of data.train_file (prepare_data.py shuffles
  before writing, so the first N are a random sample and the small sets sit inside the large ones), and points
  data.train_file at it: the config needs no new key. Varying data.num_samples is refused: it only tells
  prepare_data.py how many rows to generate.
- baseline_only saves an untrained LoRA adapter and evaluates it with the same evaluate_run as every other run
  (same prompts, metrics and files). B starts at zero, so the adapter adds exactly 0 and the model computes
  the base model's outputs (see lora.py). Greedy decoding of an unchanged model does not depend on the seed,
  so only the first seed runs.
- peak_memory_mb is a high-water mark of the whole process (train.py: peak RSS on a CPU, CUDA's peak
  allocation on a GPU). Before each training the sweep resets both (Linux /proc/self/clear_refs,
  torch.cuda.reset_peak_memory_stats), so each row is its own run's peak. macOS cannot reset the RSS mark:
  there the column only ever grows along the sweep.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import itertools
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zhlora import allocator
from zhlora.config import Config, ConfigError, config_from_dict, load_config, parse_override, save_config
from zhlora.data import DataError
from zhlora.experiment_compare import GROUPED, compare, group_scores, timed_costs
from zhlora.experiment_report import QUALITY, SIZES, plot_results, write_csv, write_markdown
from zhlora.files import write_atomic, write_if_changed, write_json

TRAIN_SAMPLES = "train_samples"  # the grid key the experiment itself handles
# generate_samples: None generates every row; N generates N (exact match of the rest: teacher forcing)
EVALUATE_DEFAULTS = {"max_samples": 48, "max_new_tokens": 48, "batch_size": 16, "baseline": False,
                     "generate_samples": None}
TOP_KEYS = ["base_config", "overrides", "grid", "seeds", "evaluate", "baseline_only", "reference", "groups"]
SET_BY_THE_SWEEP = {"training.seed": "list them in seeds", "output.dir": "use --output_dir",
                    "training.resume": "a run with checkpoints always resumes",
                    "output.overwrite": "a finished run is never overwritten",
                    "data.num_samples": "it only tells prepare_data.py how many rows to generate; vary "
                                        "train_samples (the first N rows of data.train_file) instead"}


@dataclass
class Experiment:
    name: str
    base_config: str | None
    overrides: list[str]
    grid: dict[str, list]
    seeds: list[int]
    evaluate: dict = field(default_factory=lambda: dict(EVALUATE_DEFAULTS))
    baseline_only: bool = False
    reference: dict | None = None  # grid values of the point every other is compared with (default: the first)
    groups: dict[str, list[str]] = field(default_factory=dict)  # name -> tasks, scored apart as well

    def points(self) -> list[dict]:
        """Every combination of grid values as {config key: value}; a mapping value sets several keys."""
        axes = [[v if isinstance(v, dict) else {key: v} for v in values] for key, values in self.grid.items()]
        return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]

    def run_seeds(self) -> list[int]:
        return self.seeds[:1] if self.baseline_only else self.seeds

    def reference_point(self) -> dict:
        """The point the verdicts compare every other point with (experiment_compare.py)."""
        if not self.reference:
            return self.points()[0]
        return next(p for p in self.points() if all(p.get(k) == v for k, v in self.reference.items()))


def _text(value) -> str:
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def slug(point: dict) -> str:
    """{"lora.r": 4, "training.learning_rate": 0.01} -> "r=4_learning_rate=0.01" (a folder name)."""
    text = "_".join(f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in point.items())
    return re.sub(r"[^\w.+=-]", "-", text) or "base_config"


def _check_grid(path: Path, grid) -> set[str]:
    """The config keys a grid varies; refuses what the sweep sets itself and what is not a key."""
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid: write key: [value, value, ...] (a non-empty list per key)")
    varied = set()
    for key, values in grid.items():
        keys = [k for v in values for k in v] if all(isinstance(v, dict) for v in values) else [key]
        for k in keys:
            if k in SET_BY_THE_SWEEP:
                raise ConfigError(f"{path}: grid: {k}: set by the experiment ({SET_BY_THE_SWEEP[k]})")
            if k != TRAIN_SAMPLES and "." not in k:
                raise ConfigError(f"{path}: grid: {k}: not a config key (section.name, e.g. lora.r), "
                                  f"{TRAIN_SAMPLES}, or a list of mappings of config keys")
        if key == TRAIN_SAMPLES and not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(f"{path}: grid: {TRAIN_SAMPLES}: expected whole numbers > 0, got {values}")
        varied.update(keys)
    return varied


def _check_evaluate(path: Path, evaluate: dict) -> dict:
    for key, value in evaluate.items():
        if key not in EVALUATE_DEFAULTS:
            raise ConfigError(f"{path}: evaluate: {key}: unknown key; expected {', '.join(EVALUATE_DEFAULTS)}")
        if key == "baseline" and not isinstance(value, bool):
            raise ConfigError(f"{path}: evaluate: baseline: {value!r} must be true or false")
        least = 0 if key == "generate_samples" else 1  # 0: teacher forcing alone (self_cognition still generates)
        optional = key in ("max_samples", "generate_samples") and value is None
        if key != "baseline" and not (isinstance(value, int) and value >= least or optional):
            raise ConfigError(f"{path}: evaluate: {key}: {value!r} must be a whole number >= {least}")
    return {**EVALUATE_DEFAULTS, **evaluate}


def load_experiment(path: str | Path, cli_overrides: list[str] | None = None) -> Experiment:
    """Read and check an experiment YAML: every point's config must load before anything runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            near = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise ConfigError(f"{path}: {key}: unknown key" + (f"; did you mean {near[0]}?" if near else ""))
    base = raw.get("base_config")
    if base is not None and not Path(base).is_file():
        raise ConfigError(f"{path}: base_config: {base}: no such file (relative to the working directory "
                          f"{Path.cwd()})")
    grid = raw.get("grid") or {}
    varied = _check_grid(path, grid)
    cli_overrides = cli_overrides or []
    evaluate_overrides = dict(parse_override(t[len("evaluate."):]) for t in cli_overrides if t.startswith("evaluate."))
    overrides = [*(raw.get("overrides") or []), *(t for t in cli_overrides if not t.startswith("evaluate."))]
    for text in overrides:
        key = parse_override(text)[0]
        if key in SET_BY_THE_SWEEP:
            raise ConfigError(f"{path}: overrides: {key}: set by the experiment ({SET_BY_THE_SWEEP[key]})")
        if key in varied:
            raise ConfigError(f"{text}: {key} is varied by the grid of {path}")
    evaluate = _check_evaluate(path, {**(raw.get("evaluate") or {}), **evaluate_overrides})
    seeds = raw.get("seeds") or [load_config(base, overrides).training.seed]
    if not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds: expected a list of whole numbers, got {seeds}")
    baseline_only = bool(raw.get("baseline_only", False))
    if baseline_only:
        evaluate["baseline"] = False  # the run is the base model: a second pass would score it again
    reference, groups = raw.get("reference"), raw.get("groups") or {}
    if not (isinstance(groups, dict) and all(isinstance(t, list) and t and all(isinstance(x, str) for x in t)
                                             for t in groups.values())):
        raise ConfigError(f"{path}: groups: write name: [task, task, ...] (tasks as in the data's task field)")
    exp = Experiment(path.stem, base, overrides, grid, seeds, evaluate, baseline_only, reference, groups)
    if reference is not None:
        matches = [slug(p) for p in exp.points() if isinstance(reference, dict)
                   and all(p.get(k) == v for k, v in reference.items())]
        if len(matches) != 1:
            raise ConfigError(f"{path}: reference: {reference!r} must pick exactly one grid point "
                              f"(it picks {len(matches)}: {', '.join(matches) or 'none'})")
    slugs = [slug(p) for p in exp.points()]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"{path}: grid: two points share a folder name ({slugs}); rename a grid key")
    for point in exp.points():
        point_config(exp, point, seeds[0], Path("runs") / exp.name / slug(point) / f"seed{seeds[0]}")
    return exp


def point_config(exp: Experiment, point: dict, seed: int, folder: Path) -> Config:
    """The base config, then the overrides, then the point's values, then what the sweep sets."""
    raw = load_config(exp.base_config, exp.overrides).to_dict()
    for key, value in point.items():
        if key != TRAIN_SAMPLES:
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = value
    if TRAIN_SAMPLES in point:
        raw["data"]["train_file"] = str(folder.parent / "train.json")
    if exp.baseline_only:
        raw["training"]["method"] = "lora"  # see zero_step_run
    # A killed run continues from its last checkpoint; overwrite only clears a run that has none.
    raw["training"].update(seed=seed, resume="true" if (folder / "checkpoints").is_dir() else "false")
    raw["output"].update(dir=str(folder), overwrite=True)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"grid point {slug(point)}: {err}") from None


def write_train_subset(source: str, n: int, target: Path) -> None:
    """The first n rows of the train file, written once (atomically) for every seed of a point."""
    if target.is_file():
        return
    try:
        rows = json.loads(Path(source).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    if len(rows) < n:
        raise ConfigError(f"{TRAIN_SAMPLES}={n}: {source} holds only {len(rows)} rows")
    write_atomic(target, json.dumps(rows[:n], ensure_ascii=False, indent=1))


def zero_step_run(cfg: Config, folder: Path) -> None:
    """A run folder whose adapter was never trained: B = 0, so it computes the base model exactly."""
    import torch

    from zhlora.adapter import apply_lora, count_parameters, save_trained
    from zhlora.models import load_model, resolve_model_path
    from zhlora.training.setup import make_accelerator

    torch.manual_seed(cfg.training.seed)
    model, tokenizer = load_model(cfg.model)
    total = count_parameters(model)[1]
    save_trained(apply_lora(model, cfg), tokenizer, cfg, resolve_model_path(cfg.model.name), folder)
    save_config(cfg, folder / "config.yaml")
    precision = make_accelerator(cfg).mixed_precision  # as training would: evaluation's teacher forcing uses it
    summary = {"method": "base", "model": cfg.model.name, "steps": 0, "trainable_params": 0, "total_params": total,
               "mixed_precision": precision}
    write_json(folder / "train_summary.json", summary)


def reset_between_runs() -> None:
    """Make one process look fresh to the next train(): accelerate's state and the peak-memory marks."""
    import torch

    from zhlora.training.setup import reset_accelerate_state

    reset_accelerate_state()
    gc.collect()  # the last run's model, before the memory marks restart
    # train.py reports a high-water mark of the process; from here on it is this run's.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # not Linux
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS that getrusage reports


def check_same_config(folder: Path, cfg: Config) -> None:
    saved = folder / "config.yaml"
    if not saved.is_file():
        return
    before, now = load_config(saved).to_dict(), cfg.to_dict()
    changed = [f"{s}.{k}" for s in now for k in now[s]
               if f"{s}.{k}" not in ("output.dir", "training.resume") and before[s][k] != now[s][k]]
    if changed:
        raise ConfigError(f"{folder} was run with other values of {', '.join(changed)}; delete that folder "
                          "to run it again, or give this experiment another --output_dir")


def evaluation_is_current(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    results = json.loads(path.read_text(encoding="utf-8"))
    done, keys = results.get("settings", {}), ("max_samples", "max_new_tokens", "batch_size", "generate_samples")
    return all(done.get(k) == settings[k] for k in keys) and ("baseline" in results) == settings["baseline"]


def run_one(exp: Experiment, cfg: Config, folder: Path) -> str:
    """Train (unless done) and evaluate (unless done) one run folder; say what was done."""
    from zhlora.evaluate import RESULTS_FILE, evaluate_run
    from zhlora.train import TrainingError, train

    check_same_config(folder, cfg)
    trained = (folder / "train_summary.json").is_file()
    if trained and evaluation_is_current(folder / RESULTS_FILE, exp.evaluate):
        return "done before"
    if not trained:
        reset_between_runs()
        try:
            zero_step_run(cfg, folder) if exp.baseline_only else train(cfg)
        except TrainingError as err:  # the checkpoint is saved: the same command picks the sweep up again
            raise TrainingError(f"{err}\nRun the same command again to resume the sweep.") from err
    evaluate_run(folder, **exp.evaluate)
    return "evaluated" if trained else "trained and evaluated"


def collect(exp: Experiment, output_dir: Path) -> list[dict]:
    """One row per point: grid values, then mean and std over seeds of each metric, then costs
    (times and memory only from runs that had the CPU alone: experiment_compare.timed_costs)."""
    rows = []
    for point in exp.points():
        runs = []
        for seed in exp.run_seeds():
            folder = output_dir / slug(point) / f"seed{seed}"
            summary = json.loads((folder / "train_summary.json").read_text(encoding="utf-8"))
            results = json.loads((folder / "evaluation_results.json").read_text(encoding="utf-8"))
            grouped = {f"{m}@{g}": v for g, tasks in exp.groups.items() for m, v in group_scores(folder, tasks).items()}
            runs.append({**summary, **{m: results.get(m) for m in QUALITY}, **grouped})
        row = {"point": slug(point), **{k: _text(v) for k, v in point.items()}, "seeds": len(runs)}
        for name in [*QUALITY, *(f"{m}@{g}" for g in exp.groups for m in GROUPED)]:
            values = [r[name] for r in runs if r.get(name) is not None]
            row[f"{name}_mean"] = statistics.fmean(values) if values else None
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None  # sample std (n - 1)
        for name in SIZES:  # the same in every seed
            values = [r[name] for r in runs if r.get(name) is not None]
            row[name] = None if not values else values[0] if len(set(values)) == 1 else statistics.fmean(values)
        for key, value in timed_costs(runs).items():  # a range is one csv cell, "low~high" (no sign to confuse)
            row[key] = (None if value is None else f"{value[0]!r}~{value[1]!r}") if key.endswith("_range") else value
        rows.append(row)
    return rows


def comparisons(exp: Experiment, output_dir: Path) -> dict:
    """comparisons.json: every point against the reference point (experiment_compare.compare)."""
    reference = exp.reference_point()

    def folders(point):
        return [output_dir / slug(point) / f"seed{seed}" for seed in exp.run_seeds()]

    others = [p for p in exp.points() if p != reference]
    return {"reference": slug(reference), "seeds": exp.run_seeds(),
            "points": {slug(p): compare(folders(p), folders(reference)) for p in others},
            **({"groups": {g: {"tasks": tasks, "points": {slug(p): compare(folders(p), folders(reference), tasks)
                                                           for p in others}}
                           for g, tasks in exp.groups.items()}} if exp.groups else {})}


def run_experiment(path: str | Path, output_dir: str | Path | None = None,
                   overrides: list[str] | None = None) -> list[dict]:
    """Run every (point, seed) not yet done, then write results.csv, results.md and plots."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run a sweep as one process; to train a point on many GPUs, launch "
                          "training/train.py with torchrun yourself")
    exp = load_experiment(path, overrides)
    output_dir = Path(output_dir or Path("runs") / exp.name)
    points, seeds = exp.points(), exp.run_seeds()
    train_file = load_config(exp.base_config, exp.overrides).data.train_file
    print(f"[experiment] {exp.name}: {len(points)} points x {len(seeds)} seeds -> {output_dir}/")
    for p, point in enumerate(points, 1):
        for seed in seeds:
            folder = output_dir / slug(point) / f"seed{seed}"
            cfg = point_config(exp, point, seed, folder)
            if TRAIN_SAMPLES in point:
                write_train_subset(train_file, point[TRAIN_SAMPLES], Path(cfg.data.train_file))
            print(f"[experiment] point {p}/{len(points)} {slug(point)} seed {seed} ...")
            print(f"[experiment] {folder}: {run_one(exp, cfg, folder)}")
    rows = collect(exp, output_dir)
    command = " ".join(["zhlora experiment", str(path), *(overrides or [])])
    write_csv(rows, output_dir)
    written = plot_results(output_dir)  # plots read results.csv, as every plot reads a file
    write_markdown(exp, rows, output_dir, command)
    if len(points) > 1 and not exp.baseline_only:  # last: a run without predictions.jsonl costs only this file
        try:
            text = json.dumps(comparisons(exp, output_dir), ensure_ascii=False, indent=2) + "\n"
            write_if_changed(output_dir / "comparisons.json", text.encode())  # a rerun changes nothing on disk
        except (FileNotFoundError, ValueError) as err:
            print(f"[experiment] no comparisons.json: {err}")
    print(f"[experiment] -> {output_dir / 'results.csv'}, {output_dir / 'results.md'}"
          + "".join(f", {p.name}" for p in written))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="an experiment YAML, e.g. configs/experiments/r_ablation.yaml")
    parser.add_argument("--output_dir", default=None, help="default: runs/<experiment name>")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every point, e.g. training.max_steps=10")


def run(args: argparse.Namespace) -> int:
    if args.entry:  # its runs are trainings: the process takes the allocator training would (allocator.py)
        exp = load_experiment(args.experiment, args.overrides)
        allocator.use(load_config(exp.base_config, exp.overrides).training.allocator)
    run_experiment(args.experiment, args.output_dir, args.overrides)
    return 0
