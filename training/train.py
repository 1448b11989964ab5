"""第三步: fine-tune with LoRA (or training.method=full).

    python training/train.py [--config configs/default.yaml] [key=value ...]

A thin door into `zhlora train` (zhlora/train.py does the work).
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], entry=True))
