"""What the training loop (zhlora/train.py) is built from, one concern per module:

    setup.py        before the first step: processes and precision, the output folder,
                    the checkpoint to resume, the encoded data
    batching.py     which samples each step draws: padding, length grouping, packing,
                    in an order a resumed run replays exactly
    checkpoint.py   checkpoints for an exact resume: atomic, no pickle
    tracking.py     training_history.jsonl, and TensorBoard or wandb if asked
    progressive.py  grow LoRA's rank while training (r=8 -> 16 -> 32)
    distill.py      the distillation teacher and its cached top-k (the loss is in zhlora/loss.py)
    compiling.py    training.torch_compile: each decoder layer compiled in place by inductor
    dropout.py      training.fast_dropout: LoRA dropout masks cut from 64-bit random words
"""
