"""第二步: build data/chinese_instructions.json and the train/val/test splits.

    python data/prepare_data.py [--num_samples 3000] [--source my.json] [key=value ...]

A thin door into `zhlora prepare` (zhlora/prepare.py does the work).
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
