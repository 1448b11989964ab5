"""The data of configs/experiments/datasets.yaml: three training sets, one shared test file.

    python experiments/datasets_data.py [--alpaca ../shared/datasets/alpaca_zh_demo.json] [--output_dir data/datasets]

Writes, into the output folder:
  train.json / val.json / test.json   zhlora prepare of both sources together: the generated tasks
                                      (3000 rows, as the quick start) and alpaca_zh_demo.json (the rows
                                      of another author: open questions, long answers; task "user")
  train_generated.json                the rows of train.json from the generated tasks alone
  train_alpaca_zh_demo.json           the rows of train.json from alpaca_zh_demo.json alone
  train_mixed.json                    train.json itself, under a name that says what it is

Why one split of the mixed rows and not three prepare runs: every point of the experiment is then
scored on the same test rows, and no test row is a training row of any point (prepare keeps a
question out of test when it is in train; three separate splits would not know of each other).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zhlora.config import load_config
from zhlora.data import write_json
from zhlora.prepare import prepare
from zhlora.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
ALPACA_ZH = REPO.parent / "shared" / "datasets" / "alpaca_zh_demo.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpaca", default=str(ALPACA_ZH), help="alpaca_zh_demo.json (LLaMA-Factory's demo data)")
    parser.add_argument("--output_dir", default="data/datasets")
    parser.add_argument("--config", default="configs/quick_start.yaml", help="its data settings and seed are used")
    args = parser.parse_args(argv)
    if not Path(args.alpaca).is_file():
        parser.error(f"--alpaca {args.alpaca}: no such file")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    prepare(cfg, [f"generated:{cfg.data.num_samples}", args.alpaca], output)
    train = json.loads((output / "train.json").read_text(encoding="utf-8"))
    parts = {"train_generated.json": [r for r in train if r["task"] in TASKS],
             "train_alpaca_zh_demo.json": [r for r in train if r["task"] not in TASKS], "train_mixed.json": train}
    for name, rows in parts.items():
        write_json(output / name, rows)
        print(f"[datasets] wrote {output / name} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
