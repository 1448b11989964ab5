"""Knowledge distillation: a student learns from a teacher's probabilities, not only the labels.

    zhlora distill --config configs/distill.yaml [key=value ...]

On the supervised (answer) tokens only:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where x_T = softmax(logits / T). A temperature T > 1 flattens both distributions so
the student also learns which wrong answers the teacher finds nearly right; the T^2
keeps that term's gradients on the same scale as the cross-entropy (Hinton et al. 2015).

The teacher is any model source or a run folder (a LoRA or full fine-tune); it must
share the student's tokenizer, else token i means different things to the two.
With training.distill_top_k = k > 0 the teacher runs once, before training, over
the training rows the run will use, and only its top-k logits per answer token are
kept (on disk, in the output folder), so the teacher need not stay in memory; the
KL is then taken over those k tokens with the teacher's probabilities renormalised
among them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from zhlora.batching import collate_padded
from zhlora.config import Config, ConfigError
from zhlora.formatting import IGNORE_INDEX
from zhlora.models import answer_logits


def distill_loss_sum(student_logits, teacher, labels, alpha: float, temperature: float):
    """(summed loss over supervised tokens, their count) from whole-sequence logits [batch, length,
    vocab]; teacher = its whole-sequence logits, or (values, indices) [n, k] at the n answer tokens."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if not isinstance(teacher, tuple):
        teacher = teacher[:, :-1][mask]
    return distill_loss_rows(student_logits[:, :-1][mask], teacher, labels[mask], alpha, temperature)


def distill_loss_rows(student, teacher, targets, alpha: float, temperature: float):
    """The same from the answer positions only (what models.answer_logits returns): student
    [n, vocab], teacher [n, vocab] or (values, indices) [n, k], targets [n]."""
    student = student.float()
    ce_sum = F.cross_entropy(student, targets, reduction="sum")
    log_s = F.log_softmax(student / temperature, dim=-1)
    if isinstance(teacher, tuple):  # cached top-k: (values [n, k], indices [n, k])
        values, indices = teacher
        log_t = F.log_softmax(values.float() / temperature, dim=-1)
        log_s = log_s.gather(-1, indices)
    else:
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl_sum = (log_t.exp() * (log_t - log_s)).sum()
    return alpha * ce_sum + (1 - alpha) * temperature ** 2 * kl_sum, int(targets.numel())


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
            return
        # Only the rows this run will train on: 100 steps x 8 rows need 800 of 1,800.
        # output.overwrite keeps the cache (it costs minutes to make), so it is trusted only
        # for the same teacher, top-k and training rows.
        fingerprint = cache_fingerprint(t.distill_teacher, t.distill_top_k, train_samples)
        self.cache = {}
        if cache_path.is_file():
            with safe_open(str(cache_path), "pt") as f:
                same = (f.metadata() or {}).get("fingerprint") == fingerprint
            if same:
                self.cache = load_file(str(cache_path))
            else:
                print(f"[distill] {cache_path} was made for another teacher, top-k or data: making it again")
        missing = sorted(i for i in needed_ids if f"{i}.values" not in self.cache)
        if missing:  # a first run, or a resumed run asked for more steps than were cached
            teacher = load_teacher(t.distill_teacher, student_tokenizer, device)
            self.cache.update(teacher_top_k(teacher, [train_samples[i] for i in missing], missing,
                                            student_tokenizer.pad_token_id, t.distill_top_k, device))
            del teacher  # the teacher's job is done: free its memory
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            save_file(self.cache, str(tmp), metadata={"fingerprint": fingerprint})
            tmp.replace(cache_path)  # a kill while writing leaves the old cache, never half a file

    def loss(self, model, batch: dict, sample_ids: list[int]):
        # Student and teacher only at the answer positions, as compute_loss does.
        student, targets = answer_logits(model, batch, self.head_only)
        if self.cache is not None:
            teacher = (torch.cat([self.cache[f"{i}.values"] for i in sample_ids]).to(student.device),
                       torch.cat([self.cache[f"{i}.indices"] for i in sample_ids]).to(student.device))
        else:
            with torch.no_grad():
                teacher, _ = answer_logits(self.model, batch)
        return distill_loss_rows(student, teacher, targets, self.alpha, self.temperature)


def cache_fingerprint(teacher: str, top_k: int, train_samples: list[dict]) -> str:
    """A hash of what the cached logits depend on: the teacher's files and the training rows."""
    digest = hashlib.sha256(f"{top_k}".encode())
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
            digest.update(cache_fingerprint(resolve_model_path(base), top_k, []).encode())
    digest.update(f"|{path}".encode())  # a hub id or an embedded model name is known by its name
    for sample in train_samples:
        digest.update(repr((sample["input_ids"], sample["labels"])).encode())
    return digest.hexdigest()


def teacher_top_k(teacher, samples: list[dict], ids: list[int], pad_id: int, k: int, device,
                  batch_size: int = 16) -> dict:
    """{"i.values", "i.indices"}: the teacher's top-k logits at each answer token of sample i."""
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
        values, indices = logits.float().topk(k, dim=-1)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for j, v, i in zip(chunk, values.split(counts), indices.split(counts)):
            out[f"{ids[j]}.values"], out[f"{ids[j]}.indices"] = v.cpu(), i.cpu()
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

