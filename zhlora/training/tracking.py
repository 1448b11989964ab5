"""Training curves: an append-only JSONL file, plus TensorBoard or wandb if asked.

`training_history.jsonl` is the source of truth that plots read (plots never touch
live training state). One JSON object per line:
  {"step": 10, "epoch": 0.4, "loss": 1.83, "learning_rate": 0.0002, "grad_norm": 0.91,
   "tokens_per_s": 412.0, "supervised_tokens_per_s": 160.2}
  {"step": 50, "eval_loss": 1.52}
On resume, lines after the checkpoint's step are dropped, so no step appears twice.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from zhlora.config import ConfigError

# training.report_to value -> the module its logger imports (the pip package has the value's name)
LOGGER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def check_report_to(report_to: list[str]) -> None:
    """Import each logger that training.report_to asks for, before anything loads: a missing
    package is a one-line error naming the pip command, not a traceback minutes into a run."""
    for name in report_to:
        try:
            importlib.import_module(LOGGER_MODULES[name])
        except ImportError:
            raise ConfigError(f"training.report_to=[{name}] needs the {name} package: pip install {name}") from None


class Tracker:
    def __init__(self, output_dir: Path, report_to: list[str], config: dict, resume_step: int | None, enabled: bool):
        self.enabled = enabled  # only the main process writes in multi-process runs
        self.path = output_dir / "training_history.jsonl"
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        # train.build_run ran check_report_to first, so these imports are known to work.
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "runs"))
        if "wandb" in report_to:
            import wandb

            # Offline unless the user has a key: runs sync later with `wandb sync`.
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project="zhlora", dir=str(output_dir), config=config, mode=mode)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            if self.tensorboard:
                self.tensorboard.add_scalar(("eval/" if key.startswith("eval") else "train/") + key, value, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
