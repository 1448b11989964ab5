"""The tables `zhlora evaluate` prints (evaluate.py writes the numbers; this only shows them).

    print_table(results)            # one run: fine-tuned, baseline, delta, 95% CIs, then per task
    print_adapters_table(results)   # --adapters: one line per adapter, then exact match by task

Reads the dict evaluate_run / evaluate_adapters return (the same as evaluation_results.json);
a missing or non-finite number shows as "-".
"""
from __future__ import annotations

import math

from zhlora import metrics


def _cell(value, width: int = 11) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    # Large values (the perplexity of a model that has not learned the format) drop decimals,
    # and a leading space keeps columns apart whatever the width.
    return f" {value:>{width - 1}.{4 if abs(value) < 1e4 else 1}f}"


def print_table(results: dict) -> None:
    base, delta, delta_ci = results.get("baseline", {}), results.get("delta", {}), results.get("delta_ci", {})
    # the label goes last: Chinese characters are double width and would break the columns
    print(f"\n{'metric':<20}{'fine-tuned':>11}{'baseline':>11}{'delta':>11}   {'95% CI (fine-tuned)':<20}   "
          f"{'95% CI (delta, paired)':<22}   meaning")
    for key in metrics.DELTA_METRICS:
        ci, dci = results["ci"].get(key), delta_ci.get(key)
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        dci_text = f"[{dci[0]:+.4f}, {dci[1]:+.4f}]" if dci else ""
        print(f"{key:<20}{_cell(results[key])}{_cell(base.get(key))}{_cell(delta.get(key))}   {ci_text:<20}   "
              f"{dci_text:<22}   {metrics.metric_label(key, with_key=False)}")
    agree = results.get("forced_vs_generated", {})
    if agree.get("rows"):
        print(f"teacher-forced vs generated exact match: {agree['agree']}/{agree['rows']} generated rows agree")
    print_per_task(results)


def print_per_task(results: dict) -> None:
    """n, base -> fine-tuned exact match and the fine-tuned 95% Wilson interval, one line per task."""
    base = results.get("baseline", {})
    checkable = {t: row for t, row in results["per_task"].items() if "exact_match" in row}
    if checkable:
        print(f"\n{'exact match by task':<20}{'n':>5}{'baseline':>11}{'fine-tuned':>11}   95% CI (fine-tuned)")
        for task, row in checkable.items():
            base_row, ci = base.get("per_task", {}).get(task, {}), row.get("exact_match_ci")
            apart = "   (scored apart)" if task in metrics.SCORED_APART else ""
            print(f"{task:<20}{row['n']:>5}{_cell(base_row.get('exact_match'))}{_cell(row['exact_match'])}   "
                  + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + apart)


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
