"""Knowledge distillation: a student learns from a teacher's probabilities, not only the labels.

    zhlora distill --config configs/distill.yaml [key=value ...]

The loss (alpha * CE + (1 - alpha) * T^2 * KL on the answer tokens) is written in
zhlora/loss.py with the cross-entropy; this module holds the teacher.

The teacher is any model source or a run folder (a LoRA or full fine-tune); it must
share the student's tokenizer and output layer size (lm_head rows), else token i means
different things to the two.
With training.distill_top_k = k > 0 the teacher runs once, before training, over
the training rows the run will use, and only its top-k logits per answer token are
kept (on disk, in the output folder), so the teacher need not stay in memory: their
log-probabilities at temperature T and a (k+1)-th "tail" bucket, the probability of every
other token (1 - sum of the top-k). The student is coarsened to the same k+1 outcomes
(the teacher's top-k ids and "anything else") and the KL between the two coarsened
distributions is exact: 0 when the student equals the teacher, and never more than the
KL of the full distributions (merging outcomes cannot increase a KL).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from zhlora.config import Config, ConfigError
from zhlora.formatting import IGNORE_INDEX
from zhlora.loss import answer_logits, coarse, distill_loss_rows
from zhlora.training.batching import collate_padded

CACHE_FORMAT = "2"  # 2: log_probs with the tail bucket; format 1 (top-k logits, no tail) is made again


def teacher_coarse(logits, k: int, temperature: float):
    """(log_probs [n, k + 1], indices [n, k]) of teacher logits [n, vocab] at temperature T: what the
    cache keeps; the same computation as the student's side of the loss, so equal models give 0."""
    indices = logits.topk(k, dim=-1).indices
    return coarse(F.log_softmax(logits.float() / temperature, dim=-1), indices), indices


class Distiller:
    """Holds the teacher (or its cached top-k logits) and computes the distillation loss."""

    def __init__(self, cfg: Config, student_tokenizer, device, train_samples: list[dict], cache_path: Path,
                 needed_ids: set[int]):
        t = cfg.training
        self.alpha, self.temperature, self.device = t.distill_alpha, t.distill_temperature, device
        self.head_only = t.supervised_logits
        self.model = self.cache = None
        if t.distill_top_k <= 0:
            self.model = load_teacher(t.distill_teacher, student_tokenizer, device)
            self.teacher_rows = head_rows(self.model)
            return
        # Only the rows this run will train on: 100 steps x 8 rows need 800 of 1,800.
        # output.overwrite keeps the cache (it costs minutes to make), so it is trusted only
        # for the same teacher, top-k, temperature (the log-probs depend on it) and training rows,
        # and only in this format.
        fingerprint = cache_fingerprint(t.distill_teacher, t.distill_top_k, train_samples, self.temperature)
        self.cache, self.teacher_rows = {}, None
        if cache_path.is_file():
            with safe_open(str(cache_path), "pt") as f:
                metadata = f.metadata() or {}
            if metadata.get("fingerprint") == fingerprint and metadata.get("format") == CACHE_FORMAT:
                self.cache, self.teacher_rows = load_file(str(cache_path)), int(metadata["teacher_rows"])
            else:
                print(f"[distill] {cache_path} was made for another teacher, top-k, temperature, data or "
                      "cache format: making it again")
        missing = sorted(i for i in needed_ids if f"{i}.log_probs" not in self.cache)
        if missing:  # a first run, or a resumed run asked for more steps than were cached
            teacher = load_teacher(t.distill_teacher, student_tokenizer, device)
            self.teacher_rows = head_rows(teacher)
            self.cache.update(teacher_top_k(teacher, [train_samples[i] for i in missing], missing,
                                            student_tokenizer.pad_token_id, t.distill_top_k, device,
                                            temperature=self.temperature))
            del teacher  # the teacher's job is done: free its memory
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            save_file(self.cache, str(tmp), metadata={"fingerprint": fingerprint, "format": CACHE_FORMAT,
                                                      "teacher_rows": str(self.teacher_rows)})
            tmp.replace(cache_path)  # a kill while writing leaves the old cache, never half a file

    def loss(self, model, batch: dict, sample_ids: list[int]):
        # Student and teacher only at the answer positions, as compute_loss does.
        student, targets = answer_logits(model, batch, self.head_only)
        check_head_rows(self.teacher_rows, student.shape[-1])  # before any update: step 1 stops here
        if self.cache is not None:
            teacher = tuple(torch.cat([self.cache[f"{i}.{part}"] for i in sample_ids]).to(student.device)
                            for part in ("log_probs", "indices"))
        else:
            with torch.no_grad():
                teacher, _ = answer_logits(self.model, batch)
        return distill_loss_rows(student, teacher, targets, self.alpha, self.temperature)


def head_rows(model) -> int:
    """How many vocabulary rows the output layer (lm_head) has: the size of the logits. out_features,
    not weight.shape: under DeepSpeed ZeRO-3 the weight is a 0-size shard."""
    from zhlora.models import unwrap

    return unwrap(model).get_output_embeddings().out_features


def check_head_rows(teacher_rows: int, student_rows: int) -> None:
    """Refuses output layers of different sizes: logit i must mean token i in both models."""
    if teacher_rows != student_rows:
        raise ConfigError(
            f"training.distill_teacher: the teacher's lm_head has {teacher_rows} vocabulary rows, the student's "
            f"{student_rows}; the tokenizers match, but distillation compares the logits row by row, so both "
            "output layers must have the same size (models pad lm_head differently: Qwen2.5-0.5B has 151936 "
            "rows, Qwen2.5-7B 152064)")


def cache_fingerprint(teacher: str, top_k: int, train_samples: list[dict], temperature: float = 1.0) -> str:
    """A hash of what the cached logits depend on: the teacher's files, top-k, the temperature
    (the cached log-probabilities are taken at it) and the training rows."""
    digest = hashlib.sha256(f"{top_k}|{temperature}".encode())
    path = Path(teacher)
    if path.exists():  # a run or model folder, or a model file: its files as they are now
        path = path.resolve()
        patterns = ("*.safetensors", "*.bin", "*.gguf", "config.json", "adapter_config.json", "tokenizer.json",
                    "config.yaml")  # weights and what says how to read them; not evaluation files
        files = [path] if path.is_file() else [f for pattern in patterns for f in sorted(path.glob(pattern))]
        for file in files:
            stat = file.stat()
            digest.update(f"|{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if (path / "config.yaml").is_file():  # a LoRA run: its base model's files too
            from zhlora.config import load_config
            from zhlora.models import resolve_model_path

            base = load_config(path / "config.yaml").model.name
            digest.update(cache_fingerprint(resolve_model_path(base), top_k, [], temperature).encode())
    digest.update(f"|{path}".encode())  # a hub id or an embedded model name is known by its name
    for sample in train_samples:
        digest.update(repr((sample["input_ids"], sample["labels"])).encode())
    return digest.hexdigest()


def teacher_top_k(teacher, samples: list[dict], ids: list[int], pad_id: int, k: int, device,
                  batch_size: int = 16, temperature: float = 1.0) -> dict:
    """{"i.log_probs", "i.indices"} (teacher_coarse) at each answer token of sample i: the teacher's
    top-k log-probabilities at temperature and the log of its tail bucket, and the top-k ids."""
    out = {}
    # Similar lengths together, so a batch carries little padding; right padding
    # leaves the logits of the real tokens unchanged.
    order = sorted(range(len(samples)), key=lambda j: len(samples[j]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=f"teacher top-{k}", unit="batch"):
        chunk = order[start:start + batch_size]
        batch = collate_padded([samples[j] for j in chunk], pad_id)
        with torch.no_grad():
            # The head only at answer positions: (N, vocab), not batch x length x vocab.
            logits, _ = answer_logits(teacher, {k: v.to(device) for k, v in batch.items()})
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        parts = [part.split(counts) for part in teacher_coarse(logits, k, temperature)]
        for row, j in enumerate(chunk):
            for name, pieces in zip(("log_probs", "indices"), parts):
                out[f"{ids[j]}.{name}"] = pieces[row].cpu()
    return out


def load_teacher(source: str, student_tokenizer, device):
    """A run folder (adapter or full) or any model source; refuses a different tokenizer."""
    from zhlora.generation import load_run
    from zhlora.models import load_model

    if (Path(source) / "config.yaml").is_file():
        teacher, tokenizer, _ = load_run(source, device=str(device))
    else:
        from zhlora.config import ModelConfig

        teacher, tokenizer = load_model(ModelConfig(name=source), device)
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"training.distill_teacher={source}: its tokenizer differs from the student's "
                          f"({len(tokenizer)} vs {len(student_tokenizer)} tokens); distillation compares "
                          "probabilities token by token, so both must use the same tokenizer")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

