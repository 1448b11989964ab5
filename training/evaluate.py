"""第四步: evaluate the fine-tuned model on the held-out test split (and the base model beside it).

    python training/evaluate.py --model_path outputs

A thin door into `zhlora evaluate`.
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
