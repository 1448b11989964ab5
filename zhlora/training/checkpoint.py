"""Checkpoints that resume exactly, are written atomically, and hold no pickle.

A checkpoint folder `checkpoints/checkpoint-STEP/` holds:
  trainable.safetensors   the trainable weights (LoRA A/B, or all weights for full)
  optimizer.safetensors   AdamW's exp_avg / exp_avg_sq / step per parameter
  rng.safetensors         each process's torch CPU (and CUDA) random state, for dropout:
                          `rank{r}.torch`, `rank{r}.cuda.{device}`
  trainer_state.json      step, epoch, position in the epoch, scheduler, each process's
                          python RNG, the settings that fix the batch stream

Everything is written into `.checkpoint-STEP.tmp/` and renamed into place at the
end, so a folder named checkpoint-STEP is always complete; a kill during the save
leaves only a .tmp folder, which is ignored and removed on the next save.
Safetensors holds tensors only, so loading a checkpoint cannot run code (unlike
torch.load on a pickle).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zhlora.config import ConfigError

KEEP_LAST = 2  # older checkpoints are deleted once a newer one is complete


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """AdamW's state as flat tensors keyed `state.{param index}.{name}`, plus param groups."""
    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, entry in state["state"].items() for k, v in entry.items()}
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def rng_state() -> dict:
    """This process's random state: torch's CPU generator, each visible CUDA device's, Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def save_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, trainer_state: dict,
                    rng_states: list[dict]) -> Path:
    """Write a checkpoint atomically; returns its final path.

    rng_states holds one rng_state() per process, by rank: with data parallelism every
    process draws dropout masks for its own batches, so their generators differ.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(trainable, tmp / "trainable.safetensors")
    opt_tensors, param_groups = optimizer_tensors(optimizer)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    rng = {}
    for rank, state in enumerate(rng_states):
        rng[f"rank{rank}.torch"] = state["torch"]
        rng.update({f"rank{rank}.cuda.{i}": s for i, s in enumerate(state.get("cuda", []))})
    save_tensors(rng, tmp / "rng.safetensors")
    meta = {**trainer_state, "scheduler": scheduler.state_dict(), "param_groups": param_groups,
            "python_rng": [_jsonable(state["python"]) for state in rng_states]}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    fsync_dir(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    for old in list_checkpoints(folder.parent)[:-KEEP_LAST]:
        shutil.rmtree(old)
    return folder


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (.tmp folders are never complete)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def load_checkpoint(folder: Path, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and process `rank`'s RNG; returns (trainable tensors, trainer_state)."""
    meta = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), meta["param_groups"])
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(folder / "rng.safetensors"))
    if f"rank{rank}.torch" not in rng:  # written before states were kept per process
        raise ConfigError(f"training.resume: {folder} holds no random state for process {rank}; "
                          "it cannot be resumed exactly: start over with output.overwrite=true")
    cuda = sorted((k for k in rng if k.startswith(f"rank{rank}.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    set_rng_state({"torch": rng[f"rank{rank}.torch"], "cuda": [rng[k] for k in cuda],
                   "python": _tuple(meta["python_rng"][rank])})
    return load_file(str(folder / "trainable.safetensors")), meta
