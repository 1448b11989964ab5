"""第六步: chat with the fine-tuned model, interactive or batch.

    python examples/demo.py --model_path outputs --mode interactive

A thin door into `zhlora demo`.
"""
import sys

from zhlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
