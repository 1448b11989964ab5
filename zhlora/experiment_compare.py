"""An experiment's verdicts, computed: every point against the reference point, each difference
with its 95% interval; "higher" or "lower" only when the interval excludes 0, else "same".

    exact_match, avg_similarity  paired over the same test rows: each row's score is first
                                 averaged over the point's seeds, then the row-by-row differences
                                 are bootstrapped (metrics.paired_bootstrap_ci). The rows are
                                 the headline's (SCORED_APART tasks left out, as in evaluate).
                                 This interval is the test questions' sampling error; another
                                 training seed moves the means too, which is why the table
                                 shows each mean's std over seeds and the loss verdict uses them.
    test_loss                    paired by seed (seed s of both points trains on the same batch
                                 order): mean difference ± t(0.975, n - 1) * sd / sqrt(n) over
                                 the n seeds; no interval from one seed.

Groups (an experiment's `groups`, e.g. the generated tasks and alpaca_zh_demo's open answers of
one mixed test file): the same comparisons over the rows of a group's tasks alone, the loss being
that group's own (evaluate writes each row's loss and answer tokens to predictions.jsonl).

Why rows and seeds both matter: the row interval says how sure 48 test questions make us; the
seed interval says how much another training run moves the number. The table gives the seeds'
std beside each mean, and the loss verdict rests on the seeds alone.

Costs follow the timing rule of the guide: seconds, tokens/s and peak memory come only from runs
that had the CPU to themselves (train_summary.json cpu_others_share, zhlora/cpu_share.py), as the
median of at least MIN_TIMED such runs with their range; otherwise they are left empty.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from zhlora.config import ConfigError
from zhlora.cpu_share import is_shared
from zhlora.metrics import SCORED_APART, paired_bootstrap_ci, token_mean_loss

PAIRED = {"exact_match": "exact_match", "avg_similarity": "similarity"}  # headline metric -> predictions field
GROUPED = ["exact_match", "avg_similarity", "rouge_l", "test_loss"]  # scored per group of tasks (group_scores)
MIN_TIMED = 3
TIMED = ["supervised_tokens_per_s", "seconds_per_step", "peak_memory_mb"]
# t(0.975, df) for the seed intervals: a 2-seed interval is wide (12.7 sd/sqrt 2) and says so.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    """t(0.975, df) from the table, rounding df down to a listed value (wider, never narrower); 1.96 past 30."""
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def prediction_lines(run: Path, tasks: list[str] | None = None) -> list[dict]:
    """A run's predictions.jsonl rows: those of `tasks` (a group), or the headline's (SCORED_APART left out)."""
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [r for r in rows if (r["task"] in tasks if tasks else r["task"] not in SCORED_APART)]


def group_scores(run: Path, tasks: list[str]) -> dict:
    """{GROUPED metric: value} over the test rows of these tasks only (an experiment's `groups`):
    means of the per-row scores, and the test loss of just these rows (every token weighs the same).
    A group scores exactly the tasks it lists, a SCORED_APART one too if it is listed."""
    rows = prediction_lines(run, tasks)
    if not rows:  # a misspelt task would otherwise give a column of blanks
        raise ConfigError(f"groups: {run}/predictions.jsonl has no test row of the tasks {tasks}")

    def mean(field):
        values = [float(r[field]) for r in rows if r.get(field) is not None]
        return statistics.fmean(values) if values else None

    return {"exact_match": mean("exact_match"), "avg_similarity": mean("similarity"), "rouge_l": mean("rouge_l"),
            "test_loss": token_mean_loss(rows)}


def row_scores(run: Path, tasks: list[str] | None = None) -> tuple[list[tuple], dict[str, list[float | None]]]:
    """(row keys, {metric: per-row score or None}) from a run's predictions.jsonl: the rows of
    `tasks`, or the headline rows."""
    rows = prediction_lines(run, tasks)
    keys = [(r["task"], r["instruction"], r.get("input", "")) for r in rows]
    return keys, {m: [None if r.get(f) is None else float(r[f]) for r in rows] for m, f in PAIRED.items()}


def seed_mean_rows(runs: list[Path], tasks: list[str] | None = None) -> tuple[list[tuple], dict[str, list]]:
    """Each row's score averaged over the runs (seeds); None where any run has no score for it."""
    keys, per_run = None, []
    for run in runs:
        k, scores = row_scores(run, tasks)
        if keys is not None and k != keys:
            raise ValueError(f"{run}: its test rows differ from the other seeds' (evaluate.max_samples changed?)")
        keys = k
        per_run.append(scores)
    means = {}
    for metric in PAIRED:
        columns = list(zip(*(s[metric] for s in per_run)))
        means[metric] = [None if None in col else statistics.fmean(col) for col in columns]
    return keys, means


def seed_interval(a: list[float], b: list[float]) -> dict | None:
    """Mean of a[s] - b[s] over the seeds both have, with its t interval; None from fewer than 2."""
    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"diff": mean, "ci": [mean - half, mean + half], "seeds": len(diffs)}


def verdict(ci) -> str:
    if ci is None:
        return "unknown"
    return "higher" if ci[0] > 0 else "lower" if ci[1] < 0 else "same"


def compare(point: list[Path], reference: list[Path], tasks: list[str] | None = None) -> dict:
    """{metric: {diff, ci, verdict, ...}} of point minus reference (run folders in seed order), over
    the headline rows, or over the rows of `tasks` alone (a group)."""
    keys_a, rows_a = seed_mean_rows(point, tasks)
    keys_b, rows_b = seed_mean_rows(reference, tasks)
    if keys_a != keys_b:
        raise ValueError(f"{point[0].parent} and {reference[0].parent} were scored on different test rows")
    out = {}
    for metric in PAIRED:
        pairs = [(x, y) for x, y in zip(rows_a[metric], rows_b[metric]) if x is not None and y is not None]
        ci = paired_bootstrap_ci([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None
        out[metric] = {"diff": statistics.fmean(x - y for x, y in pairs) if pairs else None, "ci": ci,
                       "rows": len(pairs), "verdict": verdict(ci), "paired_by": "row"}
    losses = [[group_scores(r, tasks)["test_loss"] if tasks else
               json.loads((r / "evaluation_results.json").read_text(encoding="utf-8")).get("test_loss")
               for r in runs] for runs in (point, reference)]
    # a diverged run (NaN or inf loss) has no loss to compare: it drops its seed from the pairing
    both = [(x, y) for x, y in zip(*losses) if x is not None and y is not None and math.isfinite(x + y)]
    seed = seed_interval([x for x, _ in both], [y for _, y in both])
    out["test_loss"] = {"diff": seed["diff"] if seed else None, "ci": seed["ci"] if seed else None,
                        "seeds": len(both), "verdict": verdict(seed["ci"] if seed else None), "paired_by": "seed"}
    return out


def timed_costs(summaries: list[dict]) -> dict:
    """{name: median, name_range: [low, high], timed_runs: n} of TIMED over the runs that had the CPU
    alone, when there are MIN_TIMED of them; the names are None otherwise."""
    alone = [s for s in summaries if not is_shared(s.get("cpu_others_share"))]
    out = {"timed_runs": len(alone)}
    for name in TIMED:
        values = [s[name] for s in alone if s.get(name) is not None]
        enough = len(values) >= MIN_TIMED
        out[name] = statistics.median(values) if enough else None
        out[f"{name}_range"] = [min(values), max(values)] if enough else None
    return out
