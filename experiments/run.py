"""Run an experiment: a grid of settings x seeds, each trained and evaluated, compared in one table.

    python experiments/run.py configs/experiments/r_ablation.yaml [--output_dir runs/r_ablation] [key=value ...]

A thin door into `zhlora experiment` (zhlora/experiment.py does the work).
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]], entry=True))
