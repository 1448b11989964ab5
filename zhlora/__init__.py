"""zhlora: LoRA fine-tuning of causal language models on Chinese instruction data.

The library behind the guide's scripts (data/prepare_data.py, training/train.py, ...)
and the `zhlora` command. Start with README.md and docs/guide.md.
"""
__version__ = "0.1.0"
